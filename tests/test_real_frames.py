"""Real Seestar S50 frames of NGC 7023 (../shared/data/ngc7023), where present."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from conftest import SHARED_DATA

from nsg_gpu.io import read_frame
from nsg_gpu.run import normalize

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real frames not present at {SHARED_DATA}")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """All six frames normalized to the first 10 s frame."""
    frames = sorted(SHARED_DATA.glob("*.fits.gz"))
    out = tmp_path_factory.mktemp("ngc7023")
    return frames, normalize(frames, reference=frames[0], output_dir=out), out


def test_all_frames_normalize(real_run):
    frames, run, _ = real_run
    assert run.ok, [f.error for f in run.failed]
    assert len(run.frames) == len(frames)


def test_twenty_second_frames_have_transmission_about_2_4(real_run):
    _, run, _ = real_run
    long = [f for f in run.frames if "20.0s" in f.path]
    assert len(long) == 2
    for f in long:
        assert 2.0 < f.transmission[0] < 2.9, f.transmission


def _background_rms(image, reference, covered, block=32):
    diff = np.where(covered, image - reference, np.nan)
    h, w = diff.shape
    b = diff[: h // block * block, : w // block * block].reshape(h // block, block, w // block, block)
    b = b.transpose(0, 2, 1, 3).reshape(h // block, w // block, -1)
    full = np.mean(np.isfinite(b), axis=-1) > 0.9
    medians = np.nanmedian(b[full], axis=-1)
    return float(np.sqrt(np.mean((medians - np.median(medians)) ** 2)))


def test_background_matches_better_than_global_scale_and_offset(real_run):
    frames, run, _ = real_run
    reference = read_frame(frames[0]).data
    for result in run.frames[1:]:
        target = read_frame(result.path).data
        with fits.open(result.output) as hdul:
            ours = np.asarray(hdul[0].data, np.float32)
        covered = np.all(target != 0, axis=0) & np.all(reference != 0, axis=0)
        for c in range(3):
            m = result.scale[c]
            offset = np.median(reference[c][covered]) - m * np.median(target[c][covered])
            global_fit = m * target[c] + offset
            assert _background_rms(ours[c], reference[c], covered) < _background_rms(global_fit, reference[c], covered)
