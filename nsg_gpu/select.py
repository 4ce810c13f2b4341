"""Choosing a reference frame automatically (``--reference auto``).

NSG leaves the choice to the user; the usual advice is a frame with low noise, many stars,
full coverage and a simple gradient. The rule here, applied to every candidate frame:

1. **Coverage.** Frames whose share of pixels with data is below 98 % of the best frame's are
   not candidates: a reference with a registration border would cost every target the
   samples and stars in that border.
2. **Gradient.** Frames whose background gradient (the 5-95 % range of a smooth background
   model, in units of the frame's noise) is more than twice the median of the candidates are
   dropped, unless that would drop all.
3. **Signal-to-noise.** Of the rest, the frame with the highest star signal-to-noise wins:
   the summed flux of its 50 brightest unsaturated stars divided by its pixel noise. It
   favours transparent sky, good seeing, low background and long exposures alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FrameError, ReferenceFrameError
from .io import read_frame
from .noise import ksigma_noise
from .stars import detect_stars, detection_image, smooth_background

__all__ = ["ReferenceScore", "score_frame", "choose_reference"]


@dataclass
class ReferenceScore:
    """The figures the reference choice uses, for one frame."""

    path: Path
    coverage: float
    noise: float
    star_snr: float
    gradient: float
    stars: int
    error: str | None = None


def score_frame(path: str | os.PathLike, *, detection_sigma: float = 5.0) -> ReferenceScore:
    """Measure coverage, noise, star signal-to-noise and gradient strength of a frame."""
    frame = read_frame(path)
    image = detection_image(frame.data)
    valid = image > 0
    coverage = float(np.count_nonzero(valid)) / image.size
    noise = ksigma_noise(image)
    stars = detect_stars(frame.data, detection_sigma=detection_sigma)
    unsaturated = stars.peak < 0.7 * float(image.max())
    flux = np.sort(stars.flux[unsaturated])[::-1][:50]
    star_snr = float(flux.sum() / noise) if noise > 0 else 0.0
    background = smooth_background(image, valid, scale=max(image.shape) / 16.0, factor=8)
    values = background[valid]
    gradient = float(np.subtract(*np.percentile(values, [95, 5])) / noise) if noise > 0 and values.size else 0.0
    return ReferenceScore(Path(path), coverage, noise, star_snr, gradient, len(stars))


def choose_reference(paths: Sequence[str | os.PathLike], *, detection_sigma: float = 5.0) -> tuple[Path, str]:
    """Pick the reference among ``paths`` by the rule of this module.

    Returns
    -------
    path : Path
    reason : str
        One line saying why, for the log and results.json.

    Raises
    ------
    ReferenceFrameError
        No frame could be read and measured.
    """
    scores = []
    for p in paths:
        try:
            scores.append(score_frame(p, detection_sigma=detection_sigma))
        except FrameError:
            continue
    scores = [s for s in scores if s.stars > 0 and s.noise > 0]
    if not scores:
        raise ReferenceFrameError(
            paths[0] if paths else "auto", "no frame could be measured to choose a reference from"
        )
    best_coverage = max(s.coverage for s in scores)
    candidates = [s for s in scores if s.coverage >= 0.98 * best_coverage]
    median_gradient = float(np.median([s.gradient for s in candidates]))
    calm = [s for s in candidates if s.gradient <= 2 * median_gradient + 1e-9]
    candidates = calm or candidates
    best = max(candidates, key=lambda s: s.star_snr)
    reason = (
        f"highest star signal-to-noise ({best.star_snr:.0f}) of {len(candidates)} candidate(s) with "
        f"coverage {best.coverage:.1%} and gradient {best.gradient:.1f} sigma "
        f"(of {len(scores)} frames measured)"
    )
    return best.path, reason
