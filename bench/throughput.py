"""Throughput: nsg normalize against a plain copy of the same frames (the I/O floor).

Generates a reference and N target frames with ``nsg_gpu.synthetic`` (cached in --cache, as
big frames take a while to render), then in one run times

- the copy floor, the user's: each target read with a plain ``astropy.io.fits`` open to
  float32 and written with ``astropy.io.fits.writeto`` (no checks, no fsync); the ratios are
  against it;
- beside it, the same copy with the run's own reader and writer (``nsg_gpu.io.read_frame``,
  ``nsg_gpu.io.write_frame``: checks, atomic write and fsync included);
- ``normalize`` (the function behind ``nsg normalize``) on the NumPy backend, and on CuPy
  where a GPU is usable: frame after frame (``serial``), and the default streaming run pinned
  to 1, 2 and all cores (``cores1``, ``cores2``, ``cores``: the CPU affinity, which the
  executor sizes its compute threads by); ``procs`` for one worker process per core
  (``ProcessExecutor``, for many cores),

and prints the per-frame time of each stage, the per-frame wall time of the run (from the
reference's completion to the last frame, divided by N), the ratios normalize/copy of the
per-frame wall times, the CPU seconds each used (a check on a machine shared with other
work, where wall times stretch with the load; per frame: those after the reference) and
the peak resident set of each run.

    python bench/throughput.py [--frames 4] [--width 6248 --height 4176] [--colour] [--scenario NAME]
                               [--cache DIR] [--modes serial,cores1,cores2,cores] [--photometry aperture]
                               [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine, print_machine  # noqa: E402

from nsg_gpu.backend import cupy_status, select_backend  # noqa: E402
from nsg_gpu.executors import InProcessExecutor, ProcessExecutor, usable_cores  # noqa: E402
from nsg_gpu.io import read_frame, write_frame  # noqa: E402
from nsg_gpu.params import Parameters  # noqa: E402
from nsg_gpu.results import STAGES  # noqa: E402
from nsg_gpu.run import normalize  # noqa: E402
from nsg_gpu.synthetic import SyntheticSpec, write_synthetic_set  # noqa: E402

#: Stars of the generator's default field (2000 x 1400), scaled to the frame's area.
STARS_PER_PIXEL = 3500 / (2000 * 1400)


def frame_set(
    cache: Path, *, width: int, height: int, colour: bool, frames: int, seed: int, scenario: str | None = None
) -> list[Path]:
    """The reference and ``frames`` targets, rendered once into ``cache``; with ``scenario``,
    that generator scenario's frames (its PSFs, registration, colour and star density) at
    this size."""
    if scenario is not None:
        spec = SyntheticSpec.from_scenario(scenario)
        directory = cache / f"{width}x{height}-{scenario}-n{frames + 1}-seed{seed}"
        n_stars = int(round(spec.n_stars * width * height / (spec.width * spec.height)))
        overrides = dict(scenario=scenario, width=width, height=height, n_stars=n_stars)
    else:
        kind = "colour" if colour else "mono"
        directory = cache / f"{width}x{height}-{kind}-n{frames + 1}-seed{seed}"
        n_stars = int(round(STARS_PER_PIXEL * width * height))
        overrides = dict(width=width, height=height, colour=colour, n_stars=n_stars)
    truth = directory / "truth.json"
    if truth.exists():
        names = [f["name"] for f in json.loads(truth.read_text())["frames"]]
        paths = [directory / f"{name}.fits" for name in names]
        if all(p.exists() for p in paths):
            return paths
    started = time.perf_counter()
    paths = write_synthetic_set(directory, n_frames=frames + 1, seed=seed, **overrides)
    print(f"generated {len(paths)} frames in {time.perf_counter() - started:.0f} s into {directory}")
    return paths


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its threads so far, and of its worker
    processes that have ended."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _plain_read(path: Path):
    with fits.open(path, memmap=False) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32), hdul[0].header


def _plain_write(path: Path, data, header) -> None:
    fits.writeto(path, data, header, overwrite=True)


def _own_read(path: Path):
    frame = read_frame(path)
    return frame.data, frame.header


def _own_write(path: Path, data, header) -> None:
    write_frame(path, data, header)


def copy_floor(targets: list[Path], out: Path, *, plain: bool = True) -> dict:
    """Read and write every target: with plain astropy calls (the user's floor: read to
    float32, write, no checks, no fsync), or with the run's own reader and writer."""
    read, write = (_plain_read, _plain_write) if plain else (_own_read, _own_write)
    out.mkdir(parents=True, exist_ok=True)
    for path in targets:  # the inputs in the page cache, as the runs after this find them
        path.read_bytes()
    reads, writes = [], []
    cpu = _cpu_seconds()
    for path in targets:
        started = time.perf_counter()
        data, header = read(path)
        mid = time.perf_counter()
        write(out / path.name, data, header)
        reads.append(mid - started)
        writes.append(time.perf_counter() - mid)
        del data
    per_frame = [r + w for r, w in zip(reads, writes)]
    return {
        "cpu_per_frame_s": (_cpu_seconds() - cpu) / len(targets),
        "read_s": statistics.mean(reads),
        "write_s": statistics.mean(writes),
        "per_frame_s": statistics.mean(per_frame),
        "per_frame_all_s": per_frame,
    }


def timed_run(
    paths: list[Path], out: Path, backend, executor, cores: set[int] | None = None, params: Parameters | None = None
) -> dict:
    """One normalize run; per-frame wall time from the reference's completion to the end.

    ``cores``: run pinned to these cores (the calling thread's CPU affinity, which the
    executor's threads inherit and by which it sizes itself)."""
    held = os.sched_getaffinity(0) if cores is not None else None
    if cores is not None:
        os.sched_setaffinity(0, cores)
    try:
        return _timed_run(paths, out, backend, executor, params)
    finally:
        if held is not None:
            os.sched_setaffinity(0, held)


def _peak_rss_mb(reset: bool = False) -> float | None:
    """This process's peak resident set (VmHWM, MB); ``reset`` starts a new peak (Linux)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed_run(paths: list[Path], out: Path, backend, executor, params: Parameters | None = None) -> dict:
    marks = {}

    cpu_marks = {}

    def progress(result, done, total):
        marks[done] = time.perf_counter()
        cpu_marks[done] = _cpu_seconds()

    resident = _peak_rss_mb(reset=True)
    started = time.perf_counter()
    cpu = _cpu_seconds()
    run = normalize(
        paths, reference=paths[0], output_dir=out, params=params, backend=backend, executor=executor, progress=progress
    )
    finished = time.perf_counter()
    cpu_targets = _cpu_seconds() - cpu_marks[1]
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
        "cpu_per_frame_s": cpu_targets / len(targets),
        "rss_before_mb": resident,
        "peak_rss_mb": _peak_rss_mb(),
        # the largest of any worker process so far (procs modes)
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
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
        "--scenario",
        help="a generator scenario's frames (e.g. undersampled-sparse-mono: registered stars of about a pixel) "
        "at this size, with its star density; default: the generator's defaults (not resampled)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "nsg-bench-frames", help="where frames are kept"
    )
    parser.add_argument("--backends", default="numpy,cupy", help="comma-separated; cupy only where usable")
    parser.add_argument(
        "--modes",
        default="serial,cores1,cores2,cores",
        help="executors to time, in this order: serial (frame after frame), streamed (read-ahead, "
        "write-behind, default compute threads), streamed1 and streamed2 (the same with one and two "
        "compute threads), coresN (the default streaming run pinned to N cores), cores (on all), "
        "procsN and procs (ProcessExecutor with N processes on N cores, or on all)",
    )
    parser.add_argument("--photometry", default="psf", help="psf (the default) or aperture")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    info = machine()
    print_machine(info)
    kind = args.scenario or ("colour" if args.colour else "mono")
    print(f"frames: {args.frames} targets + 1 reference, {args.width} x {args.height} {kind} float32")
    paths = frame_set(
        args.cache,
        width=args.width,
        height=args.height,
        colour=args.colour,
        frames=args.frames,
        seed=args.seed,
        scenario=args.scenario,
    )
    work = Path(tempfile.mkdtemp(prefix="nsg-throughput-", dir=args.cache))
    colour = SyntheticSpec.from_scenario(args.scenario).colour if args.scenario else args.colour
    report = {
        "machine": info,
        "geometry": {"width": args.width, "height": args.height, "colour": colour, "scenario": args.scenario},
        "photometry": args.photometry,
    }
    try:
        copy = copy_floor(paths[1:], work / "copy")
        own = copy_floor(paths[1:], work / "copy-own", plain=False)
        shutil.rmtree(work / "copy", ignore_errors=True)
        shutil.rmtree(work / "copy-own", ignore_errors=True)
        report["copy"] = copy
        report["copy_own_io"] = own
        print(
            f"\ncopy floor (plain astropy): {copy['per_frame_s']:.3f} s per frame "
            f"(read {copy['read_s']:.3f} s, write {copy['write_s']:.3f} s, {copy['cpu_per_frame_s']:.3f} CPU s)"
        )
        print(
            f"copy with nsg's reader and writer: {own['per_frame_s']:.3f} s per frame "
            f"(read {own['read_s']:.3f} s, write {own['write_s']:.3f} s, {own['cpu_per_frame_s']:.3f} CPU s; "
            f"{own['per_frame_s'] / copy['per_frame_s']:.2f}x the plain copy)"
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
                "streamed2": lambda: InProcessExecutor(compute_threads=2),
            }
            available = sorted(os.sched_getaffinity(0))
            for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
                cores = None
                if mode.startswith(("cores", "procs")):
                    kind, count = mode[:5], int(mode[5:]) if mode[5:] else len(available)
                    if count > len(available):
                        print(f"{mode}: skipped (this process may use {len(available)} cores)")
                        continue
                    cores = set(available[:count])
                    executor = InProcessExecutor() if kind == "cores" else ProcessExecutor(processes=count)
                    mode = f"{kind}{count}"
                else:
                    executor = executors[mode]()
                label = f"{name}-{mode}"
                if cores is not None and label in runs:
                    continue  # "cores" on a machine of that many cores
                while label in runs:
                    label += "'"
                out = work / label
                figures = timed_run(paths, out, backend, executor, cores, Parameters(photometry=args.photometry))
                figures["cores"] = len(cores) if cores is not None else usable_cores()
                figures["ratio_to_copy"] = figures["per_frame_s"] / copy["per_frame_s"]
                figures["ratio_to_own_copy"] = figures["per_frame_s"] / own["per_frame_s"]
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
    print(f"{'/ nsg copy':<12}" + "".join(f"{r['ratio_to_own_copy']:>16.2f}" for r in runs.values()))
    print(f"{'CPU s, run':<12}" + "".join(f"{r['cpu_s']:>16.1f}" for r in runs.values()))
    print(f"{'CPU s/frame':<12}" + "".join(f"{r['cpu_per_frame_s']:>16.2f}" for r in runs.values()))
    frame_mb = args.width * args.height * (3 if colour else 1) * 4 / 2**20
    print(
        f"{'peak RSS MB':<12}"
        + "".join(f"{r['peak_rss_mb']:>16.0f}" if r["peak_rss_mb"] else f"{'-':>16}" for r in runs.values())
    )
    print(
        f"{'  in frames':<12}"
        + "".join(
            f"{(r['peak_rss_mb'] - r['rss_before_mb']) / frame_mb:>16.1f}" if r["peak_rss_mb"] else f"{'-':>16}"
            for r in runs.values()
        )
        + f"   (peak above the start of the run, in frames of {frame_mb:.0f} MB)"
    )
    print(
        f"{'worker RSS':<12}"
        + "".join(f"{r['worker_peak_rss_mb']:>16.0f}" for r in runs.values())
        + "   (procs: the largest worker process so far)"
    )
    print(
        f"(copy floor, plain astropy: {copy['per_frame_s']:.3f} s and {copy['cpu_per_frame_s']:.3f} CPU s per frame; "
        f"with nsg's reader and writer: {own['per_frame_s']:.3f} s)"
    )
    print(f"\nload average after: {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
