"""Scaling: time per frame and peak memory of one normalize run for N = 10, 50 and 200 frames.

Writes a reference and one small synthetic target, copies the target N times, and runs
``normalize`` (the function behind ``nsg normalize``) over them, each N in a fresh Python
process so that its peak resident set (VmHWM) is its own. Per-frame time should be constant
in N and the peak memory flat (the streaming executor holds a bounded number of frames).
Linux only (reads /proc/self/status).

    python bench/scaling.py [--counts 10,50,200] [--width 640 --height 480] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine, peak_rss_mb, print_machine  # noqa: E402


def one_run(directory: Path, count: int) -> dict:
    """Normalize the reference and ``count`` copies of the target (in this process)."""
    from nsg_gpu.run import normalize

    frames = [directory / "reference.fits"] + [directory / f"copy_{i:04d}.fits" for i in range(count)]
    marks = {}

    def progress(result, done, total):
        marks[done] = time.perf_counter()

    started = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix=f"out{count}-", dir=directory))
    run = normalize(frames, reference=frames[0], output_dir=out, progress=progress)
    finished = time.perf_counter()
    return {
        "frames": count,
        "failed": len(run.failed),
        "total_s": finished - started,
        "per_frame_s": (finished - marks[1]) / count,
        "peak_rss_mb": peak_rss_mb(),
    }


def prepare(directory: Path, count: int, width: int, height: int) -> None:
    from astropy.io import fits

    from nsg_gpu.synthetic import write_synthetic_set

    paths = write_synthetic_set(directory / "set", n_frames=2, seed=25, width=width, height=height, n_stars=400)
    (directory / "reference.fits").write_bytes(paths[0].read_bytes())
    data, header = fits.getdata(paths[1]), fits.getheader(paths[1])
    for i in range(count):
        fits.PrimaryHDU(data, header=header).writeto(directory / f"copy_{i:04d}.fits", overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--counts", default="10,50,200", help="frame counts, comma-separated")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(Path(args.child[0]), int(args.child[1]))))
        return

    info = machine()
    print_machine(info)
    counts = [int(c) for c in args.counts.split(",")]
    print(f"frames: 1 reference + N copies of one target, {args.width} x {args.height} mono float32")
    results = []
    with tempfile.TemporaryDirectory(prefix="nsg-scaling-") as tmp:
        directory = Path(tmp)
        prepare(directory, max(counts), args.width, args.height)
        for count in counts:
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(directory), str(count)],
                check=True,
                capture_output=True,
                text=True,
            )
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            results.append(figures)
            print(
                f"N = {count:4d}: {figures['per_frame_s']:.3f} s per frame, peak RSS {figures['peak_rss_mb']:.1f} MB"
                f"{'' if not figures['failed'] else ', ' + str(figures['failed']) + ' failed'}"
            )
    first, last = results[0], results[-1]
    rss_change = last["peak_rss_mb"] / first["peak_rss_mb"] - 1
    time_change = last["per_frame_s"] / first["per_frame_s"] - 1
    print(
        f"N = {last['frames']} against N = {first['frames']}: peak RSS {rss_change:+.1%}, "
        f"time per frame {time_change:+.1%}"
    )
    info["load_average_after"] = machine()["load_average_1_5_15"]
    print(f"load average after: {info['load_average_after']}")
    if args.json:
        report = {"machine": info, "geometry": {"width": args.width, "height": args.height}, "runs": results}
        report["peak_rss_change"] = rss_change
        report["per_frame_time_change"] = time_change
        args.json.write_text(json.dumps(report, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
