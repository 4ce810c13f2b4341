"""Resident memory of one `normalize` run over many small frames (it should stay flat).

Writes a reference and N copies of a 320 x 240 synthetic target, normalizes them, and prints
the resident set size after frames 10, 50, 200 and N. Linux only (reads /proc/self/status).

    python bench/memory.py [--frames 500]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsg_gpu.pipeline import normalize  # noqa: E402
from nsg_gpu.synthetic import write_synthetic_set  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    root = Path(tempfile.mkdtemp())
    paths = write_synthetic_set(root / "in", n_frames=2, seed=25, width=320, height=240, n_stars=250)
    data, header = fits.getdata(paths[1]), fits.getheader(paths[1])
    frames = [paths[0]]
    for i in range(args.frames):
        path = root / "in" / f"copy_{i:04d}.fits"
        fits.PrimaryHDU(data, header=header).writeto(path)
        frames.append(path)
    marks = {11, 51, 201, args.frames + 1}
    samples = {}

    def progress(result, done, total):
        if done in marks:
            samples[done - 1] = round(rss_mb(), 1)

    started = time.perf_counter()
    run = normalize(frames, reference=paths[0], output_dir=root / "out", progress=progress)
    print(f"{len(run.frames)} frames ({len(run.failed)} failed) in {time.perf_counter() - started:.1f} s")
    print("resident MB after frames:", samples)


if __name__ == "__main__":
    main()
