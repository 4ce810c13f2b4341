"""Star detection against the generator's true stars."""

from __future__ import annotations

import numpy as np
import pytest

from nsg_gpu.stars import detect_stars
from nsg_gpu.synthetic import SyntheticField


def test_detection_finds_true_stars_and_fwhm():
    field = SyntheticField(width=800, height=600, n_frames=2, n_stars=600, seed=5, fwhms=[3.0, 4.2], borders=False)
    truth_xy = np.column_stack([field.star_x, field.star_y])
    for k in (0, 1):
        catalog = detect_stars(field.render(k))
        bright = catalog.take(np.arange(min(60, len(catalog))))
        distance = np.min(
            np.hypot(*(bright.x[:, None] - truth_xy[None, :, 0], bright.y[:, None] - truth_xy[None, :, 1])), axis=1
        )
        assert np.median(distance) < 0.3
        assert catalog.fwhm == pytest.approx(field.frames[k].fwhm, rel=0.15)
