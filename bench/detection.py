"""Star detection on a resampled frame, where the hot-pixel tests run.

Takes the first target of bench/throughput.py's set (rendered once into --cache), registers it
as a registration would (a cubic spline shift of (0.31, -0.44) px, clamped at 1e-6 and 1, its
no-data border kept), and times ``nsg_gpu.stars.detect_stars`` on it --repeats times (the
first call also builds the point test's templates), beside the same frame not resampled,
where those tests do not run.

    python bench/detection.py [--cache DIR] [--width 6248 --height 4176] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine, print_machine  # noqa: E402
from throughput import frame_set  # noqa: E402

from nsg_gpu.io import read_frame  # noqa: E402
from nsg_gpu.stars import detect_stars  # noqa: E402

SHIFT = (0.31, -0.44)


def registered(data: np.ndarray) -> np.ndarray:
    """``data`` (channels, h, w) shifted by :data:`SHIFT` with a cubic spline, as a
    registration resamples a frame: clamped, and no data where it had none."""
    out = np.stack([ndi.shift(plane.astype(np.float64), SHIFT, order=3, mode="nearest") for plane in data])
    out = np.clip(out, 1e-6, 1).astype(np.float32)
    out[:, ndi.binary_dilation((data == 0).any(axis=0), iterations=2)] = 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "nsg-bench-frames", help="where frames are kept"
    )
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_machine(machine())
    paths = frame_set(args.cache, width=args.width, height=args.height, colour=False, frames=4, seed=3)
    plain = np.asarray(read_frame(paths[1]).data)
    for name, data in (("not resampled", plain), ("resampled", registered(plain))):
        for _ in range(args.repeats):
            started = time.perf_counter()
            stars = detect_stars(data)
            print(
                f"{name}: {time.perf_counter() - started:.2f} s, {len(stars)} detections, FWHM {stars.fwhm:.2f} px",
                flush=True,
            )


if __name__ == "__main__":
    main()
