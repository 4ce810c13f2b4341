"""Samples disturbed in one frame: a trail found by its bright pixels and clipped away."""

from __future__ import annotations

import numpy as np

from nsg_gpu.outliers import bright_counts, clipped_medians, nanmedian_last, one_frame_outliers, reject_outlier_samples
from nsg_gpu.samples import bin_medians, make_grid


def test_a_trail_in_one_frame_is_found_and_clipped_away():
    rng = np.random.default_rng(5)
    grid = make_grid(200, 300, 25)
    sky = 0.1 + 0.0002 * np.arange(300)[None, :]
    reference = (sky + rng.normal(0, 0.002, (200, 300)))[None].astype(np.float32)
    target = (sky + rng.normal(0, 0.002, (200, 300)))[None].astype(np.float32)
    yy, xx = np.mgrid[0:200, 0:300]
    line = np.abs(yy - 0.5 * xx - 20) / np.hypot(1, 0.5)
    target[0] += (0.03 * np.exp(-0.5 * (line / 1.2) ** 2)).astype(np.float32)
    for star in ((60, 40), (150, 220)):  # in both frames: not a one-frame outlier
        bump = 0.05 * np.exp(-0.5 * ((yy - star[0]) ** 2 + (xx - star[1]) ** 2) / 1.5**2)
        reference[0] += bump.astype(np.float32)
        target[0] += bump.astype(np.float32)
    noise = np.array([0.002])
    m_ref, _ = bin_medians(reference, grid, 1.0)
    m_tgt, _ = bin_medians(target, grid, 1.0)
    odd = one_frame_outliers(
        bright_counts(target, grid, m_tgt, noise, 1.0), bright_counts(reference, grid, m_ref, noise, 1.0)
    )
    centre_line = np.abs(grid.centre_y[:, None] - 0.5 * grid.centre_x[None, :] - 20) / np.hypot(1, 0.5)
    assert np.all(odd[centre_line < 4]) and not np.any(odd[centre_line > 3 * grid.size])
    cells = np.argwhere(odd)
    plain = m_tgt[0][odd] - m_ref[0][odd]
    clipped = clipped_medians(target, grid, cells, 1.0)[0] - clipped_medians(reference, grid, cells, 1.0)[0]
    sample_noise = 0.002 * 1.25 / grid.size
    assert np.median(plain) > 4 * sample_noise  # the trail raises the plain medians
    assert abs(np.median(clipped)) < 1.5 * sample_noise
    values = (m_tgt - m_ref).copy()
    values[0, 3, 4] += 50 * sample_noise  # one sample far out of its neighbourhood
    kept = reject_outlier_samples(values, np.ones(values.shape[1:], bool))
    assert not kept[3, 4] and kept.sum() >= kept.size - 3


def test_nanmedian_by_one_sort_is_numpys_to_the_bit():
    """Rows of odd and even counts, short rows (NumPy's masked path) and long ones (its loop
    over rows), a row of NaN alone, and ties."""
    import warnings

    rng = np.random.default_rng(12)
    for shape in [(40, 3, 1444), (25, 1, 300), (6, 2, 7), (3, 1, 1)]:
        values = np.round(rng.normal(size=shape), 2)  # rounding makes ties
        values[rng.random(shape) < 0.3] = np.nan
        values[0, 0] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.nanmedian(values, axis=-1)
        np.testing.assert_array_equal(nanmedian_last(values), expected)
