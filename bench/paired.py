"""Before and after: ``normalize`` from this checkout and from another, in turn, each run a fresh process.

A single run of ``bench/throughput.py`` cannot tell a 20 % change on a machine whose speed
drifts between runs (a shared VM). Here the two checkouts run one after the other, A B A B
..., each run a new ``python`` process that imports ``nsg_gpu`` from its checkout and
normalizes the same cached frames (``throughput.frame_set``: a reference and N targets) with
the default executor; a plain ``astropy.io.fits`` copy of the targets (read to float32,
``writeto``) runs in the same rounds, the floor. After one warm-up round, every round gives
each run's wall and CPU seconds per target after the reference (its own clock) and the whole
process's wall; the medians and ranges are printed, and the ratios this/baseline pair by pair
(their median: the figure to quote).

    python bench/paired.py --baseline PATH [--runs 7] [--frames 4] [--width 6248 --height 4176]
                           [--colour] [--scenario NAME] [--cache DIR] [--json FILE]

PATH is a checkout of the commit to compare against (``git worktree add PATH COMMIT``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from _machine import machine, print_machine  # noqa: E402
from throughput import frame_set  # noqa: E402

#: One run, in its own process: argv = checkout, output directory, frame paths.
_NORMALIZE = """
import json, sys, time
checkout, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, checkout)
import nsg_gpu
from pathlib import Path
assert Path(nsg_gpu.__file__).resolve().is_relative_to(Path(checkout).resolve()), nsg_gpu.__file__
from nsg_gpu.run import normalize
marks = {}
def progress(result, done, total):
    marks[done] = (time.perf_counter(), time.process_time())
run = normalize(paths, reference=paths[0], output_dir=out, progress=progress, overwrite=True)
end = (time.perf_counter(), time.process_time())
failed = [f.error for f in run.frames if f.status not in ("ok", "reference")]
assert not failed, failed
n = len(paths) - 1
print(json.dumps({"wall_per_target_s": (end[0] - marks[1][0]) / n, "cpu_per_target_s": (end[1] - marks[1][1]) / n}))
"""

#: The plain copy, in its own process: ``throughput.copy_floor`` (astropy read to float32 and
#: write, the floor every speed figure is held against); argv = bench folder, output, paths.
_COPY = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from throughput import copy_floor
floor = copy_floor([Path(p) for p in sys.argv[3:]], Path(sys.argv[2]), plain=True)
print(json.dumps({"wall_per_target_s": floor["per_frame_s"], "cpu_per_target_s": floor["cpu_per_frame_s"]}))
"""


def _run(code: str, args: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"a run failed:\n{done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_wall_s"] = wall
    return figures


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the commit to compare against")
    parser.add_argument("--runs", type=int, default=7, help="rounds counted after one warm-up; default 7")
    parser.add_argument("--frames", type=int, default=4, help="target frames (a reference is added); default 4")
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--colour", action="store_true", help="3-channel frames instead of mono")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--scenario", help="a generator scenario's frames (bench/throughput.py --scenario), e.g. field-dependent-psf"
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nsg-bench-frames")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not (args.baseline / "nsg_gpu" / "__init__.py").is_file():
        raise SystemExit(f"{args.baseline} is not a checkout of nsg-gpu (no nsg_gpu/__init__.py)")
    print_machine(machine())
    paths = [
        str(p)
        for p in frame_set(
            args.cache,
            width=args.width,
            height=args.height,
            colour=args.colour,
            frames=args.frames,
            seed=args.seed,
            scenario=args.scenario,
        )
    ]
    this = str(_HERE.parent)
    rows: dict[str, list[dict]] = {"this": [], "baseline": [], "copy": []}
    with tempfile.TemporaryDirectory(prefix="nsg-paired-") as tmp:
        for round_ in range(args.runs + 1):
            figures = {
                "this": _run(_NORMALIZE, [this, f"{tmp}/this", *paths]),
                "baseline": _run(_NORMALIZE, [str(args.baseline), f"{tmp}/baseline", *paths]),
                "copy": _run(_COPY, [str(_HERE), f"{tmp}/copy", *paths[1:]]),
            }
            if round_:  # the first round warms the page cache and the imports
                for name, value in figures.items():
                    rows[name].append(value)
    print(
        f"{args.frames} targets of {args.width} x {args.height} {args.scenario or ('colour' if args.colour else 'mono')}, "
        f"{args.runs} rounds; median (min-max)"
    )
    for name in rows:
        print(
            f"{name:>9}: wall per target {_summary([r['wall_per_target_s'] for r in rows[name]])} s, "
            f"CPU per target {_summary([r['cpu_per_target_s'] for r in rows[name]])} s, "
            f"whole process {_summary([r['process_wall_s'] for r in rows[name]])} s"
        )
    ratios = {}
    for key in ("wall_per_target_s", "cpu_per_target_s", "process_wall_s"):
        pairs = [a[key] / b[key] for a, b in zip(rows["this"], rows["baseline"])]
        floor = [a[key] / b[key] for a, b in zip(rows["this"], rows["copy"])] if key != "process_wall_s" else None
        ratios[key] = {"this/baseline": pairs, "this/copy": floor}
        line = f"this/baseline {key}: {_summary(pairs)}"
        if floor:
            line += f"; this/copy: {_summary(floor)}"
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": vars(args)
                    | {"baseline": str(args.baseline), "cache": str(args.cache), "json": str(args.json)},
                    "runs": rows,
                    "ratios": ratios,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
