"""Throughput: nsg normalize against a plain copy of the same frames (the I/O floor).

Generates a reference and N target frames with ``nsg_gpu.synthetic`` (cached in --cache, as
big frames take a while to render), then in one run times

- the copy floor: each target read with ``nsg_gpu.io.read_frame`` and written with
  ``nsg_gpu.io.write_frame`` (the reader and writer of a run, atomic write and fsync included);
- ``normalize`` (the function behind ``nsg normalize``) on the NumPy backend, and on CuPy
  where a GPU is usable, with the streaming executor;
- the same run frame after frame (no read-ahead or write-behind), for comparison,

and prints the per-frame time of each stage, the per-frame wall time of the run (from the
reference's completion to the last frame, divided by N), the ratio normalize/copy of the
per-frame wall times, and the CPU seconds each used (a check on a machine shared with other
work, where wall times stretch with the load).

    python bench/throughput.py [--frames 4] [--width 6248 --height 4176] [--colour]
                               [--cache DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine, print_machine  # noqa: E402

from nsg_gpu.backend import cupy_status, select_backend  # noqa: E402
from nsg_gpu.executors import InProcessExecutor  # noqa: E402
from nsg_gpu.io import read_frame, write_frame  # noqa: E402
from nsg_gpu.results import STAGES  # noqa: E402
from nsg_gpu.run import normalize  # noqa: E402
from nsg_gpu.synthetic import write_synthetic_set  # noqa: E402

#: Stars of the generator's default field (2000 x 1400), scaled to the frame's area.
STARS_PER_PIXEL = 3500 / (2000 * 1400)


def frame_set(cache: Path, *, width: int, height: int, colour: bool, frames: int, seed: int) -> list[Path]:
    """The reference and ``frames`` targets, rendered once into ``cache``."""
    kind = "colour" if colour else "mono"
    directory = cache / f"{width}x{height}-{kind}-n{frames + 1}-seed{seed}"
    truth = directory / "truth.json"
    if truth.exists():
        names = [f["name"] for f in json.loads(truth.read_text())["frames"]]
        paths = [directory / f"{name}.fits" for name in names]
        if all(p.exists() for p in paths):
            return paths
    started = time.perf_counter()
    n_stars = int(round(STARS_PER_PIXEL * width * height))
    paths = write_synthetic_set(
        directory, width=width, height=height, colour=colour, n_frames=frames + 1, seed=seed, n_stars=n_stars
    )
    print(f"generated {len(paths)} frames in {time.perf_counter() - started:.0f} s into {directory}")
    return paths


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its threads so far."""
    times = os.times()
    return times.user + times.system


def copy_floor(targets: list[Path], out: Path) -> dict:
    """Read and write every target with the run's own reader and writer."""
    reads, writes = [], []
    cpu = _cpu_seconds()
    for path in targets:
        started = time.perf_counter()
        frame = read_frame(path)
        mid = time.perf_counter()
        write_frame(out / path.name, frame.data, frame.header)
        reads.append(mid - started)
        writes.append(time.perf_counter() - mid)
        del frame
    per_frame = [r + w for r, w in zip(reads, writes)]
    return {
        "cpu_per_frame_s": (_cpu_seconds() - cpu) / len(targets),
        "read_s": statistics.mean(reads),
        "write_s": statistics.mean(writes),
        "per_frame_s": statistics.mean(per_frame),
        "per_frame_all_s": per_frame,
    }


def timed_run(paths: list[Path], out: Path, backend, executor) -> dict:
    """One normalize run; per-frame wall time from the reference's completion to the end."""
    marks = {}

    def progress(result, done, total):
        marks[done] = time.perf_counter()

    started = time.perf_counter()
    cpu = _cpu_seconds()
    run = normalize(paths, reference=paths[0], output_dir=out, backend=backend, executor=executor, progress=progress)
    finished = time.perf_counter()
    cpu = _cpu_seconds() - cpu
    targets = [f for f in run.frames if f.status == "ok"]
    if run.failed:
        raise SystemExit(f"the run failed: {[f.error for f in run.failed]}")
    stages = {s: statistics.mean(f.timings.get(s, 0.0) for f in targets) for s in STAGES}
    return {
        "total_s": finished - started,
        "reference_s": marks[1] - started,
        "per_frame_s": (finished - marks[1]) / len(targets),
        "stages_s": stages,
        "stage_sum_s": sum(stages.values()),
        "frames": len(targets),
        "cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=4, help="target frames (a reference is added); default 4")
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--colour", action="store_true", help="3-channel frames instead of mono")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "nsg-bench-frames", help="where frames are kept"
    )
    parser.add_argument("--backends", default="numpy,cupy", help="comma-separated; cupy only where usable")
    parser.add_argument(
        "--modes",
        default="serial,streamed1,streamed",
        help="executors to time, in this order: serial (frame after frame), streamed (read-ahead, "
        "write-behind, default compute threads), streamed1 (the same with one compute thread)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    info = machine()
    print_machine(info)
    kind = "colour" if args.colour else "mono"
    print(f"frames: {args.frames} targets + 1 reference, {args.width} x {args.height} {kind} float32")
    paths = frame_set(
        args.cache, width=args.width, height=args.height, colour=args.colour, frames=args.frames, seed=args.seed
    )
    work = Path(tempfile.mkdtemp(prefix="nsg-throughput-", dir=args.cache))
    report = {"machine": info, "geometry": {"width": args.width, "height": args.height, "colour": args.colour}}
    try:
        copy = copy_floor(paths[1:], work / "copy")
        report["copy"] = copy
        print(
            f"\ncopy floor: {copy['per_frame_s']:.2f} s per frame "
            f"(read {copy['read_s']:.2f} s, write {copy['write_s']:.2f} s)"
        )
        runs = {}
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if name == "cupy" and not cupy_status()[0]:
                print(f"cupy: skipped ({cupy_status()[1]})")
                continue
            backend = select_backend(name)
            executors = {
                "serial": lambda: InProcessExecutor(threads=False),
                "streamed": InProcessExecutor,
                "streamed1": lambda: InProcessExecutor(compute_threads=1),
            }
            for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
                executor = executors[mode]()
                label = f"{name}-{mode}"
                while label in runs:
                    label += "'"
                out = work / label
                figures = timed_run(paths, out, backend, executor)
                figures["ratio_to_copy"] = figures["per_frame_s"] / copy["per_frame_s"]
                runs[label] = figures
                shutil.rmtree(out, ignore_errors=True)
        report["runs"] = runs
        report["load_average_after"] = machine()["load_average_1_5_15"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nper-frame seconds by stage (mean over targets; in a streamed run read and write overlap compute)")
    header = f"{'stage':<12}" + "".join(f"{name:>16}" for name in runs)
    print(header)
    for stage in STAGES:
        print(f"{stage:<12}" + "".join(f"{r['stages_s'][stage]:>16.3f}" for r in runs.values()))
    print(f"{'sum':<12}" + "".join(f"{r['stage_sum_s']:>16.3f}" for r in runs.values()))
    print(f"{'wall/frame':<12}" + "".join(f"{r['per_frame_s']:>16.3f}" for r in runs.values()))
    print(f"{'reference':<12}" + "".join(f"{r['reference_s']:>16.3f}" for r in runs.values()))
    print(f"{'/ copy':<12}" + "".join(f"{r['ratio_to_copy']:>16.2f}" for r in runs.values()))
    print(f"{'CPU s, run':<12}" + "".join(f"{r['cpu_s']:>16.1f}" for r in runs.values()))
    print(f"(copy: {copy['cpu_per_frame_s']:.2f} CPU s per frame)")
    print(f"\nload average after: {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
