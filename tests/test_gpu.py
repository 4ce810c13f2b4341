"""The CUDA kernels and the whole pipeline on a GPU, against the NumPy twins.

Every test here carries the ``gpu`` marker: skipped with the reason where no GPU is usable,
a failure under NSG_REQUIRE_GPU=1 (tests/conftest.py). Run them on a GPU machine as
described in kernels/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from assertions import assert_close
from kernel_cases import (
    SHAPES,
    apply_case,
    grid_for,
    matched_case,
    sample_frame,
    spline_case,
    stack_case,
    stack_maps,
    star_image,
)

from nsg_gpu import kernels
from nsg_gpu.apply import apply_gradient
from nsg_gpu.combine import reject_combine
from nsg_gpu.noise import wavelet_layer_rows
from nsg_gpu.pixel_rejection import METHODS, Rejection
from nsg_gpu.samples import bin_statistics
from nsg_gpu.stars import find_peaks, matched_filter

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    """The cupy module (imported only where the GPU tests run)."""
    import cupy

    return cupy


class PoisoningLauncher(kernels.DeviceLauncher):
    """The CuPy launcher, filling every output with NaN or 0xA5 bytes before the launch."""

    def __call__(self, name, config, args):
        entry = kernels.REGISTRY[name]
        for (kind, _), value in zip(entry.params, args):
            if kind.endswith("*") and not kind.startswith("const") and value is not None:
                if value.dtype.kind == "f":
                    value.fill(np.nan)
                else:
                    value.view(np.uint8).fill(0xA5)
        super().__call__(name, config, args)


@pytest.fixture(scope="module")
def device(cp):
    """A launcher on the current device that poisons outputs first."""
    return PoisoningLauncher()


def _host(array):
    import cupy

    assert isinstance(array, cupy.ndarray), f"expected a CuPy array, got {type(array)}"
    return cupy.asnumpy(array)


def test_every_kernel_compiles_once_per_device(cp):
    kernels._module.cache_clear()
    for _ in range(2):
        for name in kernels.REGISTRY:
            kernels.function(name)
    assert kernels._module.cache_info().misses == len(kernels.FAMILIES)


@pytest.mark.parametrize("shape", SHAPES + [(61, 97), (1031, 2053)], ids=str)
@pytest.mark.parametrize("sigma", [0.9, 2.3])
def test_matched_filter_on_gpu(cp, device, shape, sigma):
    image = star_image(shape, seed=sum(shape))
    residual = np.where(image > 0, image - 0.1, 0).astype(np.float32)
    expected = matched_filter(residual, sigma)
    actual = _host(matched_filter(cp.asarray(residual), sigma, launcher=device))
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("shape", [(37, 53), (64, 33), (61, 97), (1031, 2053)], ids=str)
@pytest.mark.parametrize(("half", "margin"), [(1, 1), (2, 4), (3, 3)])
def test_find_peaks_on_gpu(cp, device, shape, half, margin):
    image, matched = matched_case(shape, seed=7 + shape[0], sigma=1.3)
    threshold = 5 * 0.002 * 0.2
    expected = find_peaks(matched, image, half=half, threshold=threshold, margin=margin)
    actual = find_peaks(
        cp.asarray(matched), cp.asarray(image), half=half, threshold=threshold, margin=margin, launcher=device
    )
    np.testing.assert_array_equal(_host(actual.view(cp.uint8)), expected.view(np.uint8))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("shape", "size", "stride"),
    [((45, 61), 5, 1), ((50, 50), 8, 1), ((37, 53), 13, 1), ((700, 1001), 31, 1), ((700, 1001), 64, 2)],
    ids=str,
)
def test_bin_medians_on_gpu(cp, device, channels, shape, size, stride):
    frame = sample_frame(channels, shape, seed=size + channels)
    grid = grid_for(shape, size)
    expected = bin_statistics(frame, grid, 1.0, stride=stride)
    medians, nodata = bin_statistics(cp.asarray(frame), grid, 1.0, stride=stride, launcher=device)
    np.testing.assert_array_equal(_host(medians), expected[0])
    np.testing.assert_array_equal(_host(nodata), expected[1])


@pytest.mark.parametrize(("n_nodes", "shape"), [(3, (7, 5)), (130, (33, 65)), (2000, (301, 403))], ids=str)
def test_tps_on_gpu(cp, device, n_nodes, shape):
    spline = spline_case(seed=n_nodes, n_nodes=n_nodes, shape=shape)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    exact = spline(xx.astype(float), yy.astype(float))
    actual = _host(spline.evaluate_image(h, w, xp=cp, launcher=device))
    # float32 node terms and the device's lg2.approx (relative error about 2^-22).
    tolerance = 2.0**-21 * np.abs(spline.coefficients).sum() + 2.0**-23 * np.abs(exact).max()
    np.testing.assert_allclose(actual, exact, rtol=0, atol=tolerance)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(7, 5), (64, 33), (517, 263)], ids=str)
@pytest.mark.parametrize("truncate", [False, True], ids=["raw", "truncated"])
@pytest.mark.parametrize("row_stride", [None, 1, 3], ids=["no-noise", "stride1", "stride3"])
def test_apply_on_gpu(cp, device, channels, shape, truncate, row_stride):
    data, gradient, scale = apply_case(channels, shape, seed=channels + shape[0])
    expected = apply_gradient(data, scale, gradient, white_level=0.8, truncate=truncate, row_stride=row_stride)
    out, high, layer, valid = apply_gradient(
        cp.asarray(data),
        scale,
        cp.asarray(gradient),
        white_level=0.8,
        truncate=truncate,
        row_stride=row_stride,
        launcher=device,
    )
    np.testing.assert_array_equal(_host(out), expected[0])
    assert high == expected[1]
    if row_stride is not None:
        np.testing.assert_array_equal(_host(layer), expected[2])
        np.testing.assert_array_equal(_host(valid), expected[3])


@pytest.mark.parametrize("shape", SHAPES + [(1031, 2053)], ids=str)
@pytest.mark.parametrize("row_stride", [1, 5])
def test_noise_layer_on_gpu(cp, device, shape, row_stride):
    image = star_image(shape, seed=3 * shape[1])
    expected = wavelet_layer_rows(image, row_stride)
    layer, valid = wavelet_layer_rows(cp.asarray(image), row_stride, launcher=device)
    np.testing.assert_array_equal(_host(layer), expected[0])
    np.testing.assert_array_equal(_host(valid), expected[1])


# -- the whole pipeline ---------------------------------------------------------------------------
def _exact_numpy_gradient(monkeypatch) -> list:
    """Make the NumPy path evaluate the spline at every pixel, as the GPU does; the list
    returned counts the evaluations, so a test can tell the patch took effect."""
    from nsg_gpu import gradient

    original = gradient.evaluate_surfaces
    calls = []

    def exact(splines, height, width, *, step=16, xp=np, launcher=None, lattice=None):
        calls.append(xp)
        return original(splines, height, width, step=1 if xp is np else step, xp=xp, launcher=launcher)

    monkeypatch.setattr(gradient, "evaluate_surfaces", exact)
    return calls


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(dict(width=640, height=448, n_frames=3, seed=5, n_stars=500), id="mono"),
        pytest.param(
            dict(width=640, height=448, n_frames=2, seed=6, n_stars=500, colour=True, transmissions=[1.0, 0.6]),
            id="colour",
        ),
        pytest.param(
            dict(width=640, height=448, n_frames=3, seed=5, n_stars=500, sky_about_zero=True), id="sky-about-0"
        ),
    ],
)
def test_pipeline_cupy_equals_numpy(cp, spec, monkeypatch):
    """Scales within 1e-5 relative, outputs within 1e-3 of the pixel noise (exact gradient on both);
    ``sky_about_zero``: each frame less its sky's median, measured with a pedestal
    (``reference.as_measured``) on both."""
    from nsg_gpu.backend import NUMPY, select_backend
    from nsg_gpu.io import Frame, FrameMeta
    from nsg_gpu.pipeline import normalize_frame
    from nsg_gpu.reference import prepare_reference
    from nsg_gpu.synthetic import SyntheticField

    calls = _exact_numpy_gradient(monkeypatch)
    spec = dict(spec)
    about_zero = spec.pop("sky_about_zero", False)
    field = SyntheticField(**spec)
    frames = []
    for k in range(spec["n_frames"]):
        data = field.render(k)
        if about_zero:
            data = np.where(data != 0, data - np.median(data[data != 0]), 0).astype(np.float32)
        meta = FrameMeta(focal_length_mm=530.0, pixel_size_um=3.76)
        frames.append(Frame(Path(f"frame_{k}.fits"), data, None, 1.0, meta))
    gpu = select_backend("cupy")
    ref_numpy = prepare_reference(frames[0], backend=NUMPY)
    ref_cupy = prepare_reference(frames[0], backend=gpu)
    assert len(ref_cupy.stars) == len(ref_numpy.stars)
    assert (ref_cupy.pedestal > 0) == (ref_numpy.pedestal > 0) == about_zero
    assert_close(ref_cupy.noise, ref_numpy.noise, "gpu_reference_noise")
    for k in range(1, spec["n_frames"]):
        expected = normalize_frame(ref_numpy, frames[k])
        actual = normalize_frame(ref_cupy, frames[k])
        assert isinstance(actual.data, cp.ndarray)
        assert_close(actual.scale, expected.scale, "gpu_scale")
        noise = field.pixel_noise(k)
        difference = np.abs(_host(actual.data) - expected.data).max(axis=(1, 2))
        assert np.all(difference <= 1e-3 * noise), f"frame {k}: {difference / noise} of the pixel noise"
        assert_close(actual.noise, expected.noise, "gpu_noise")
        assert actual.samples == expected.samples and actual.star_pairs == expected.star_pairs
    assert np in calls and len(calls) == 2 * (spec["n_frames"] - 1)  # the NumPy gradient was the exact one


@pytest.mark.parametrize("method", [*METHODS, "auto"])
@pytest.mark.parametrize(("n_frames", "n_pixels"), [(1, 157), (5, 1031), (24, 20011), (41, 3001), (300, 517)], ids=str)
def test_reject_combine_on_gpu(cp, device, method, n_frames, n_pixels):
    values, weights = stack_case(n_frames, n_pixels, seed=n_frames)
    peak, noise = stack_maps(n_pixels, seed=n_frames)
    share = np.random.default_rng(n_frames).uniform(0.4, 2.5, n_frames)  # each frame's own noise
    rejection = Rejection(method).resolve(n_frames)
    expected = reject_combine(values, weights, rejection, peak=peak, noise=noise, noise_scale=share)
    actual = reject_combine(
        cp.asarray(values),
        weights,
        rejection,
        peak=cp.asarray(peak),
        noise=cp.asarray(noise),
        noise_scale=share,
        launcher=device,
    )
    for name in ("master", "coverage", "low", "high", "flags", "frame_low", "frame_high"):
        np.testing.assert_array_equal(_host(getattr(actual, name)), getattr(expected, name), err_msg=name)


def test_stack_on_gpu_equals_numpy(cp, tmp_path):
    """nsg stack with --backend cupy and numpy: the same master, byte for byte."""
    from astropy.io import fits

    from nsg_gpu.stacking import stack

    rng = np.random.default_rng(2)
    paths = []
    for k in range(22):
        data = (0.1 + rng.normal(0, 0.002, (300, 410))).astype(np.float32)
        data[:, : 3 * k] = 0
        path = tmp_path / f"f{k:02d}.fits"
        fits.PrimaryHDU(data, fits.Header([("NWEIGHT", 1.0 + k / 10)])).writeto(path)
        paths.append(path)
    stack(paths, tmp_path / "gpu.fits", backend="cupy", maps="hdus")
    stack(paths, tmp_path / "cpu.fits", backend="numpy", maps="hdus")
    assert (tmp_path / "gpu.fits").read_bytes() == (tmp_path / "cpu.fits").read_bytes()


def test_a_filled_border_on_gpu_as_on_the_cpu(cp):
    """reference.as_measured on a CuPy frame whose border is filled with one value (and a
    sky lowered below 0): the same pixels as NumPy's."""
    from nsg_gpu.backend import select_backend
    from nsg_gpu.io import Frame
    from nsg_gpu.reference import as_frame, as_measured

    rng = np.random.default_rng(5)
    data = (0.1 + rng.normal(0, 0.003, (3, 120, 160))).astype(np.float32)
    data[:, :, :30] = np.float32(0.05)
    data[:, :20, :] = np.float32(0.05)
    for values in (data, data - np.float32(0.1)):
        host, host_pedestal = as_measured(Frame.from_array(values))
        device, device_pedestal = as_measured(as_frame(Frame.from_array(values), select_backend("cupy")))
        assert not host.data[:, :, :30].any() and host_pedestal == device_pedestal
        np.testing.assert_array_equal(cp.asnumpy(device.data), host.data)


def test_cli_info_names_the_gpu(cp):
    from typer.testing import CliRunner

    from nsg_gpu.cli import app

    result = CliRunner().invoke(app, ["info", "--backend", "cupy"])
    assert result.exit_code == 0, result.output
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    assert "backend: cupy" in result.output and name in result.output
