"""The best any photometry could do: the Cramer-Rao bound of each frame's scale on a synthetic set.

For every star the generator's noise-free profile in both frames (as captured, before
registration: pixel integration, Bayer cells, the frame's PSF and offset), its position and
background taken as known, and the variance of every pixel from the generator's noise map
(sky, star and read noise): the Fisher information of the star's flux is ``sum p^2 / var``,
and the scale's relative variance from one star ``1 / I_R + 1 / I_T`` (relative fluxes). Over
the stars under 0.7 of the range in both frames, the bound per channel is
``1 / sqrt(sum 1 / var)``. No unbiased estimator does better; ours states its uncertainty
(NSGSERR) next to it in ``bench/scale_errors.py``.

    python bench/scale_bound.py [--sets "undersampled seed 1,crowded"]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402
from scale_errors import SETS  # noqa: E402

from nsg_gpu.synthetic import SyntheticField  # noqa: E402

#: Half-size of the box (px) over which each star's information is summed.
BOX = 6
#: Stars peaking above this share of the range in either frame are left out (NSG's linear range).
LINEAR = 0.7


def star_information(field: SyntheticField, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``F^2 I`` (the inverse relative variance of each star's flux) per channel and star in
    frame ``k``, NaN for stars too near the edge, and each star's peak value."""
    spec = field.spec
    stars = field.stars(k, captured=True).astype(np.float64)
    variance = field.noise_map(k).astype(np.float64) ** 2
    transmission = np.asarray(field.frames[k].transmission)
    dy, dx = field.frames[k].shift
    info = np.full((field.channels, field.star_x.size), np.nan)
    peak = np.zeros(field.star_x.size)
    for s in range(field.star_x.size):
        xi, yi = int(round(field.star_x[s] + dx)), int(round(field.star_y[s] + dy))
        if not (BOX <= xi < spec.width - BOX and BOX <= yi < spec.height - BOX):
            continue
        box = (slice(None), slice(yi - BOX, yi + BOX + 1), slice(xi - BOX, xi + BOX + 1))
        light, var = stars[box], variance[box]
        for c in range(field.channels):
            profile = light[c] / field.star_flux[s, c]
            info[c, s] = (transmission[c] * field.star_flux[s, c]) ** 2 * np.sum(profile * profile / var[c])
        peak[s] = float((transmission[:, None, None] * light).max())
    return info, peak


def bound(field: SyntheticField, k: int, reference: tuple | None = None) -> tuple[np.ndarray, int]:
    """The relative standard error bound of frame ``k``'s scale per channel, and the stars."""
    info_r, peak_r = reference if reference is not None else star_information(field, 0)
    info_t, peak_t = star_information(field, k)
    use = np.isfinite(info_r[0]) & np.isfinite(info_t[0]) & (peak_r < LINEAR) & (peak_t < LINEAR)
    variance = 1 / info_r[:, use] + 1 / info_t[:, use]
    return 1 / np.sqrt(np.sum(1 / variance, axis=1)), int(use.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", help="comma-separated set names of bench/scale_errors.py (default: all)")
    args = parser.parse_args()
    print_machine(machine())
    for name in [n.strip() for n in args.sets.split(",")] if args.sets else list(SETS):
        field = SyntheticField(**SETS[name])
        reference = star_information(field, 0)
        for k in range(1, field.spec.n_frames):
            values, n = bound(field, k, reference)
            print(f"{name} frame {k}: {n} stars, bound " + ", ".join(f"{100 * v:.3f} %" for v in values), flush=True)


if __name__ == "__main__":
    main()
