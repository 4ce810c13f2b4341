"""The gradient stage end to end: the residual against the noise-free reference the generator made."""

from __future__ import annotations

import numpy as np
import pytest

from nsg_gpu.synthetic import block_residual

RESIDUAL_MARGIN = 0.1  # pixel-noise units above what the perfect normalization leaves


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mono_set", "colour_set"])
def test_residual_gradient_close_to_perfect(name, request):
    """Block-median residual against the noise-free reference is within 0.1 sigma of perfect."""
    s = request.getfixturevalue(name)
    reference = s.field.noise_free(0)
    noise = s.field.pixel_noise(0)
    for k in range(1, len(s.paths)):
        data_in = s.field.render(k)
        covered = np.all(data_in != 0, axis=0)
        perfect = s.field.perfect_normalization(k, data_in)
        out, _ = s.output(k)
        ours = block_residual(out, reference, covered) / noise
        best = block_residual(perfect, reference, covered) / noise
        assert np.all(ours <= best + RESIDUAL_MARGIN), f"frame {k}: ours {ours}, perfect {best}"


@pytest.mark.slow
def test_gradient_is_actually_removed(mono_set):
    """Without the gradient model the residual would be several sigma: the test can fail."""
    s = mono_set
    k = 1
    data_in = s.field.render(k)
    covered = np.all(data_in != 0, axis=0)
    m = s.field.frames[k].scale(s.field.reference)[:, None, None]
    scaled_only = np.where(data_in != 0, m * data_in, 0)
    offset = np.median((scaled_only - s.field.noise_free(0))[:, covered])
    residual = block_residual(scaled_only - offset, s.field.noise_free(0), covered) / s.field.pixel_noise(0)
    assert residual.max() > 1.0
