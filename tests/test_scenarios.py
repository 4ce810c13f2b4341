"""End to end on the realistic scenarios: registered targets, pixel-integrated PSFs, sparse,
undersampled and crowded fields; scale, gradient and weight against the generator's truth."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SCALE_TARGET, scale_errors

from nsg_gpu.synthetic import block_residual

RESIDUAL_MARGIN = 0.1  # pixel-noise units above what the perfect normalization leaves


# -- scenarios: registered targets, pixel-integrated PSFs, sparse, undersampled and crowded fields --
#: The scenarios at a size the suite affords (the same density of stars as the presets).
SCENARIO_SETS = {
    "undersampled-sparse-colour": dict(scenario="undersampled-sparse-colour", n_frames=4, seed=1),
    "field-dependent-psf": dict(scenario="field-dependent-psf", width=1200, height=800, n_stars=1200, n_frames=3),
    "crowded": dict(scenario="crowded", width=1200, height=800, n_stars=8700, n_frames=3),
}
#: Where our scale misses the target today, with what was measured (flips to a failure when fixed).
SCALE_SHORT = {
    "undersampled-sparse-colour": "64-74 pairs in the best channel on the plain-aperture fallback, but red and "
    "blue fluxes scattered by the Bayer cells (one photosite each): errors of -1.3 to +5.4 %, honest against "
    "their stated uncertainties (test_scenario_scale_uncertainty_is_honest); the Cramer-Rao bound of these scales is 0.24-0.36 % "
    "(bench/scale_bound.py), so that even an ideal photometry meets 0.5 % in all nine only about 4 times in 10",
}


@pytest.fixture(scope="module", params=list(SCENARIO_SETS))
def scenario_set(request, tmp_path_factory):
    """A scenario's frames, normalized to frame 0 (the unresampled reference)."""
    from conftest import NormalizedSet

    name = request.param
    return name, NormalizedSet(tmp_path_factory.mktemp(name), **SCENARIO_SETS[name])


def _normalized(s) -> list[int]:
    """The target frames the run normalized (a frame can fail, e.g. for too few star pairs)."""
    return [k for k in range(1, len(s.paths)) if s.run.frames[k].status == "ok"]


def _true_weight(s, k: int, scale=None) -> float:
    """``mean_c (sigma_R / (sigma_T m))^2`` with the background noise before registration."""
    m = s.field.frames[k].scale(s.field.reference) if scale is None else np.asarray(scale)
    return float(np.mean((s.background_noise(0) / (s.background_noise(k) * m)) ** 2))


@pytest.mark.slow
def test_scenario_scale_within_half_percent(scenario_set, request):
    name, s = scenario_set
    if name in SCALE_SHORT:
        request.applymarker(pytest.mark.xfail(strict=True, reason=SCALE_SHORT[name]))
    assert s.run.ok, [f.error for f in s.run.failed]
    errors = scale_errors(s)
    assert np.all(np.abs(errors) < SCALE_TARGET), f"relative scale errors:\n{errors}"


@pytest.mark.slow
def test_scenario_scale_uncertainty_is_honest(scenario_set):
    """NSGSERR against the truth: the error over the stated uncertainty has an RMS of at most
    2 over the set's frames and channels, and none beyond 4; on the undersampled set (12
    values, uncertainties from the pairs' scatter) an RMS of at least 0.5 as well."""
    name, s = scenario_set
    errors = scale_errors(s)
    z = []
    for k in range(1, len(s.paths)):
        _, header = s.output(k)
        for c in range(errors.shape[1]):
            transmission, uncertainty = header[f"NSGS{c}"], header[f"NSGSERR{c}"]
            z.append(errors[k - 1, c] * transmission / uncertainty)
    rms = float(np.sqrt(np.mean(np.square(z))))
    assert rms <= 2 and np.max(np.abs(z)) < 4, z
    if name == "undersampled-sparse-colour":
        assert rms >= 0.5, z


@pytest.mark.slow
def test_scenario_residual_gradient_close_to_perfect(scenario_set):
    _, s = scenario_set
    reference = s.field.noise_free(0)
    noise = s.field.pixel_noise(0)
    assert _normalized(s)
    for k in _normalized(s):
        data_in = s.input(k)
        covered = np.all(data_in != 0, axis=0)
        ours = block_residual(s.output(k)[0], reference, covered) / noise
        best = block_residual(s.field.perfect_normalization(k, data_in), reference, covered) / noise
        assert np.all(ours <= best + RESIDUAL_MARGIN), f"frame {k}: ours {ours}, perfect {best}"


@pytest.mark.slow
def test_scenario_weight_within_ten_percent(scenario_set):
    """NWEIGHT against ``(sigma_R / (sigma_T m))^2`` with the noise before registration."""
    _, s = scenario_set
    for k in _normalized(s):
        truth = _true_weight(s, k)
        assert s.run.frames[k].weight == pytest.approx(truth, rel=0.10), f"frame {k} {s.field.frames[k].shift}"


@pytest.mark.slow
def test_scenario_weight_noise_within_three_percent(scenario_set):
    """With our own scale in the truth, what is left is the noise estimate: within 3 % at every
    registration offset, where a per-pixel noise estimate is off by 14-63 %."""
    _, s = scenario_set
    for k in _normalized(s):
        truth = _true_weight(s, k, scale=s.run.frames[k].scale)
        assert s.run.frames[k].weight == pytest.approx(truth, rel=0.03), f"frame {k} {s.field.frames[k].shift}"


@pytest.mark.slow
def test_auto_reference_among_resampled_frames(tmp_path):
    """The undersampled colour scenario without the frame it was registered to: every frame
    was resampled, so ``--reference auto`` takes a resampled one, whose hot pixels the
    registration spread into blobs of two to four pixels. They once set its catalogue (FWHM
    1.60 px, mostly hot pixels among its brightest detections), and all four targets were
    refused as unregistered ("only 1 of the reference's 50 brightest stars ... are found").
    Now every frame is normalized, each channel's transmission against the truth within 3 of
    its stated uncertainty (within 1.5 here)."""
    import json

    from typer.testing import CliRunner

    from nsg_gpu.cli import app
    from nsg_gpu.io import read_frame
    from nsg_gpu.resampling import interpolation_kernel
    from nsg_gpu.synthetic import write_synthetic_set

    paths = write_synthetic_set(tmp_path / "in", scenario="undersampled-sparse-colour", n_frames=6, seed=2)[1:]
    truth = {
        f["name"]: np.array(f["transmission"])
        for f in json.loads((tmp_path / "in" / "truth.json").read_text())["frames"]
    }
    result = CliRunner().invoke(app, ["normalize", *map(str, paths), "--reference", "auto", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["frames"]
    assert sorted(r["status"] for r in rows) == ["ok"] * 4 + ["reference"]
    reference = next(r for r in rows if r["status"] == "reference")
    assert interpolation_kernel(read_frame(reference["file"]).data) is not None  # a resampled reference
    base = truth[reference["file"].rsplit("/", 1)[-1].removesuffix(".fits")]
    for row in rows:
        if row["status"] == "ok":
            expected = truth[row["file"].rsplit("/", 1)[-1].removesuffix(".fits")] / base
            for c in range(3):
                error = row[f"transmission_{c}"] / expected[c] - 1
                assert abs(error) < 3 * row[f"transmission_error_{c}"] / row[f"transmission_{c}"], (
                    row["file"],
                    c,
                    error,
                )
