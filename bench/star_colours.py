"""The stars' colours in each real colour frame alone: whether its channels can scale alike.

A frame's channel transmissions against the reference can agree only if its camera sees each
star's colour as the reference's camera does. For every frame of ../shared/data/ngc7023 this
prints the median red-to-green and blue-to-green flux ratios of its stars with bootstrap
errors (``tests/independent.py``: ``star_colours``, sep alone, 5 px apertures, stars at
signal-to-noise 10 or more in every channel) and the sky's median per channel. No frame is
compared with another and nothing comes from ``nsg_gpu``.

    python bench/star_colours.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "tests"), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402
from independent import NGC7023, read_planes, star_colours  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no options
    print_machine(machine())
    frames = sorted(NGC7023.glob("*.fits*"))
    if not frames:
        print(f"no frames at {NGC7023}")
        return
    for path in frames:
        planes = read_planes(path)
        colours = star_colours(planes)
        (rg, bg), (erg, ebg) = colours.median(), colours.log_error()
        sky = ", ".join(f"{float(np.median(p[p > 0])):.4f}" for p in planes)
        print(
            f"{path.name}: {colours.logs.shape[1]} of {colours.detected} stars; R/G {rg:.3f} +- {erg * rg:.3f}, "
            f"B/G {bg:.3f} +- {ebg * bg:.3f}; sky R, G, B {sky}",
            flush=True,
        )


if __name__ == "__main__":
    main()
