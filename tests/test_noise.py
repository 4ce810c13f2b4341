"""The k-sigma noise estimate and NSG's weight against white noise of known sigma."""

from __future__ import annotations

import numpy as np
import pytest

from nsg_gpu.noise import ksigma_noise, weight_from_noise


def test_ksigma_noise_of_white_noise_and_weight():
    rng = np.random.default_rng(4)
    image = (0.1 + rng.normal(0, 0.002, (500, 600))).astype(np.float32)
    image[:, :50] = 0
    assert ksigma_noise(image) == pytest.approx(0.002, rel=0.03)
    snr, weight = weight_from_noise([0.002], [0.004], [0.5])
    assert snr[0] == pytest.approx(1.0) and weight == pytest.approx(1.0)
