"""The CUDA kernels without a GPU: registry, compile check, and every kernel run in host emulation.

Each kernel runs through its stage module's own kernel path (the code the CuPy backend runs),
launched by tests/emulation.py on NumPy buffers, and is compared with its NumPy twin.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from assertions import assert_close
from emulation import EmulatedLauncher
from kernel_cases import (
    SHAPES,
    apply_case,
    assert_same,
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
from nsg_gpu.noise import ksigma_noise, wavelet_layer_rows
from nsg_gpu.pixel_rejection import METHODS, Rejection
from nsg_gpu.samples import bin_medians, bin_statistics
from nsg_gpu.stars import find_peaks, matched_filter


class TinyGridLauncher(EmulatedLauncher):
    """A launch far smaller than the work: every thread loops over many items."""

    def config(self, name, n_items):
        super().config(name, n_items)  # the name must be registered
        return 3, 32


@pytest.fixture(
    params=[pytest.param("device", id="loader-geometry"), pytest.param("tiny", id="tiny-grid")], scope="module"
)
def launcher(request):
    """The emulated launcher, with the loader's grid for a 2-SM device or a 3x32 grid."""
    return EmulatedLauncher(multiprocessors=2) if request.param == "device" else TinyGridLauncher()


# -- registry and sources -------------------------------------------------------------------------
_ENTRY = re.compile(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', re.S)


def _source_entries(family):
    text = (kernels.kernels_dir() / f"{family}.cu").read_text()
    found = {}
    for name, params in _ENTRY.findall(text):
        parts = [" ".join(p.replace("__restrict__", "").split()) for p in params.split(",")]
        found[name] = tuple((p.rpartition(" ")[0].replace(" *", "*"), p.rpartition(" ")[2]) for p in parts)
    return text, found


@pytest.mark.parametrize("family", kernels.FAMILIES)
def test_registry_matches_the_sources(family):
    text, found = _source_entries(family)
    registered = {e.name: e.params for e in kernels.REGISTRY.values() if e.family == family}
    assert found == registered
    # The file opens with a comment naming its NumPy twins, and those exist.
    assert text.startswith("//")
    header = text.split("#include")[0]
    twins = re.findall(r"nsg_gpu(?:\.\w+)+", header.split("Launch contract")[0])
    assert twins, f"{family}.cu names no NumPy twin"
    for dotted in twins:
        module_name, _, attribute = dotted.rpartition(".")
        try:
            owner = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a method: module.Class.method
            module_name, _, cls = module_name.rpartition(".")
            owner = getattr(importlib.import_module(module_name), cls)
        assert hasattr(owner, attribute), f"{family}.cu names {dotted}, which does not exist"


def test_every_kernel_file_is_registered():
    files = sorted(p.stem for p in kernels.kernels_dir().glob("*.cu"))
    assert files == sorted(kernels.FAMILIES)


def test_loader_source_names_the_file():
    source = kernels.kernel_source("tps")
    first = source.splitlines()[0]
    assert first == f'#line 1 "{kernels.kernels_dir() / "tps.cu"}"'


def test_launch_config():
    assert kernels.launch_config("tps_eval_f32", 0, multiprocessors=4) == (1, kernels.BLOCK)
    assert kernels.launch_config("tps_eval_f32", 1000, multiprocessors=4) == (4, kernels.BLOCK)
    assert kernels.launch_config("tps_eval_f32", 10**9, multiprocessors=4) == (32, kernels.BLOCK)
    with pytest.raises(KeyError):
        kernels.launch_config("no_such_kernel", 10, multiprocessors=1)
    with pytest.raises(TypeError, match="takes 11 arguments"):
        kernels.kernel_arguments("tps_eval_f32", (1, 2))


def test_import_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import nsg_gpu, nsg_gpu.kernels, nsg_gpu.pipeline, nsg_gpu.cli\n"
        "from nsg_gpu.backend import cupy_status, select_backend\n"
        "usable, reason = cupy_status(); assert not usable and 'not importable' in reason\n"
        "assert select_backend('auto').name == 'numpy'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- compile check ----------------------------------------------------------------------------------
def test_compile_check_passes():
    """nvcc where it is on PATH, else NVRTC: fails, not skips, when neither exists."""
    results = kernels.compile_check()
    assert [r.family for r in results] == list(kernels.FAMILIES)
    for r in results:
        assert set(r.entries) == {e.name for e in kernels.REGISTRY.values() if e.family == r.family}


@pytest.mark.parametrize("compiler", ["nvcc", "nvrtc"])
def test_compile_check_with_each_compiler(compiler):
    found = kernels.available_compilers()
    if compiler not in found:
        pytest.skip(f"{compiler} is not installed here (the compile check uses the other one)")
    if compiler == found[0]:
        pytest.skip(f"{compiler} is the compile check's own choice here: test_compile_check_passes ran it")
    assert len(kernels.compile_check(compiler=compiler)) == len(kernels.FAMILIES)


@pytest.mark.parametrize("compiler", ["nvcc", "nvrtc"])
def test_compile_error_names_file_and_line(compiler, tmp_path):
    if compiler not in kernels.available_compilers():
        pytest.skip(f"{compiler} is not installed here")
    (tmp_path / "common.cuh").write_text((kernels.kernels_dir() / "common.cuh").read_text())
    (tmp_path / "broken.cu").write_text(
        '#include "common.cuh"\n\nextern "C" __global__ void broken_f32(float* out) {\n    out[0] = undefined_name;\n}\n'
    )
    with pytest.raises(kernels.KernelCompileError, match=r"broken\.cu\(4\): error"):
        kernels.compile_check(compiler=compiler, families=("broken",), directory=tmp_path)


# -- detect.cu ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES + [(61, 97)], ids=str)
@pytest.mark.parametrize("sigma", [0.9, 2.3])
def test_matched_filter_kernel(shape, sigma, launcher):
    image = star_image(shape, seed=sum(shape))
    residual = np.where(image > 0, image - 0.1, 0).astype(np.float32)
    expected = matched_filter(residual, sigma)
    actual = matched_filter(residual, sigma, launcher=launcher)
    assert_same(actual, expected, what="matched filter")


@pytest.mark.parametrize("shape", [(37, 53), (64, 33), (61, 97)], ids=str)
@pytest.mark.parametrize(("half", "margin"), [(1, 1), (2, 4), (3, 3)])
def test_find_peaks_kernel(shape, half, margin, launcher):
    image, matched = matched_case(shape, seed=7 + shape[0], sigma=1.3)
    threshold = 5 * 0.002 * 0.2
    expected = find_peaks(matched, image, half=half, threshold=threshold, margin=margin)
    actual = find_peaks(matched, image, half=half, threshold=threshold, margin=margin, launcher=launcher)
    assert set(np.unique(actual.view(np.uint8))) <= {0, 1}
    assert_same(actual, expected, what="peaks")
    assert expected.sum() >= 2


# -- samples.cu -----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("shape", "size", "stride"),
    [((45, 61), 5, 1), ((50, 50), 8, 1), ((37, 53), 13, 1), ((7, 5), 2, 1), ((50, 50), 8, 3), ((37, 53), 13, 4)],
    ids=str,
)
def test_bin_medians_kernel(channels, shape, size, stride, launcher):
    white = 1.0
    frame = sample_frame(channels, shape, seed=size + channels, white_level=white)
    grid = grid_for(shape, size)
    expected = bin_statistics(frame, grid, white, stride=stride)
    actual = bin_statistics(frame, grid, white, stride=stride, launcher=launcher)
    assert_same(actual[0], expected[0], what="medians")
    assert_same(actual[1].astype(np.int64), expected[1].astype(np.int64), what="no-data counts")
    if size in (5, 8) and stride == 1:  # these cases take every branch: empty bins, no-data regions, clean bins
        assert np.isnan(expected[0]).any() and (expected[1] > 0).any() and (expected[1] == 0).any()


@pytest.mark.parametrize("stride", [1, 3])
def test_bin_medians_equal_the_twin(stride):
    """The CPU's bin_medians (opening only the bins that can fail) equals the kernel's twin."""
    frame = sample_frame(3, (61, 97), seed=11)
    grid = grid_for((61, 97), 8)
    medians, valid = bin_medians(frame, grid, 1.0, stride=stride)
    twin, nodata = bin_statistics(frame, grid, 1.0, stride=stride)
    assert_same(medians, twin, what="medians")
    assert_same(valid, np.all(nodata < 0.01 * 64, axis=0), what="validity")
    assert (~valid).any() and valid.any()


def test_bin_medians_validity_is_unchanged():
    """bin_medians keeps its contract: NaN for empty bins, valid below 1 % no-data pixels."""
    frame = sample_frame(1, (45, 61), seed=3)
    grid = grid_for((45, 61), 5)
    medians, valid = bin_medians(frame, grid, 1.0)
    _, nodata = bin_statistics(frame, grid, 1.0)
    assert_same(valid, np.all(nodata < 0.25, axis=0))
    block = frame[0, grid.y0 + 5 * 4 : grid.y0 + 5 * 5, grid.x0 + 5 * 6 : grid.x0 + 5 * 7]
    usable = block[(block > 0) & (block < 1.0)]
    assert medians[0, 4, 6] == pytest.approx(float(np.median(usable)), abs=1e-7)


# -- tps.cu ---------------------------------------------------------------------------------------
def _tps_tolerance(spline, exact) -> float:
    """Node terms in float32: a few roundings (2^-22) of each term's coefficient, plus the output's."""
    return 2.0**-22 * np.abs(spline.coefficients).sum() + 2.0**-23 * np.abs(exact).max()


@pytest.mark.parametrize(("n_nodes", "shape"), [(3, (7, 5)), (40, (37, 53)), (130, (33, 65)), (70, (64, 33))], ids=str)
def test_tps_kernel_against_exact_evaluation(n_nodes, shape, launcher):
    spline = spline_case(seed=n_nodes, n_nodes=n_nodes, shape=shape)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    exact = spline(xx.astype(float), yy.astype(float))
    actual = spline.evaluate_image(h, w, launcher=launcher)
    assert actual.dtype == np.float32 and actual.shape == shape
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, exact, rtol=0, atol=_tps_tolerance(spline, exact))


def test_tps_kernel_plane(launcher):
    spline = spline_case(seed=5, n_nodes=20, shape=(9, 11), smoothness=4.0)
    assert spline.coefficients.size == 0
    assert_same(spline.evaluate_image(9, 11, launcher=launcher), spline.evaluate_image(9, 11, step=1))


def test_tps_kernel_accuracy_in_noise_units(launcher):
    """A realistic gradient (10 sigma, 300 nodes): the kernel is within 1e-4 sigma of exact."""
    rng = np.random.default_rng(12)
    h, w = 60, 90
    gx, gy = np.meshgrid(np.arange(2, w, 5.0), np.arange(2, h, 5.0))
    x, y = gx.ravel(), gy.ravel()
    z = 10 * np.sin(x / w * 2.5 + 0.3) * np.cos(y / h * 1.7) + 4 * x / w + rng.normal(0, 0.05, x.size)
    from nsg_gpu.spline import fit_surface_spline

    spline = fit_surface_spline(x, y, z, smoothness=-2)
    yy, xx = np.mgrid[0:h, 0:w]
    exact = spline(xx.astype(float), yy.astype(float))
    actual = spline.evaluate_image(h, w, launcher=launcher)
    assert np.abs(actual - exact).max() < 1e-4


# -- apply.cu -------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(7, 5), (37, 53), (64, 33)], ids=str)
@pytest.mark.parametrize("truncate", [False, True], ids=["raw", "truncated"])
@pytest.mark.parametrize("row_stride", [None, 1, 3], ids=["no-noise", "stride1", "stride3"])
def test_apply_kernel(channels, shape, truncate, row_stride, launcher):
    data, gradient, scale = apply_case(channels, shape, seed=channels + shape[0])
    before = data.copy()
    white = 0.8
    expected = apply_gradient(data, scale, gradient, white_level=white, truncate=truncate, row_stride=row_stride)
    actual = apply_gradient(
        data, scale, gradient, white_level=white, truncate=truncate, row_stride=row_stride, launcher=launcher
    )
    assert_same(actual[0], expected[0], what="output")
    assert actual[1] == expected[1]
    if row_stride is None:
        assert actual[2] is None and actual[3] is None
    else:
        assert_same(actual[2], expected[2], what="layer")
        assert_same(actual[3], expected[3], what="valid")
        assert expected[3].any() or min(shape) < 8
    assert_same(data, before, what="input untouched")


def test_apply_kernel_without_data(launcher):
    data = np.zeros((1, 9, 10), np.float32)
    out, high, _, _ = apply_gradient(data, [1.3], data + 0.5, white_level=1.0, truncate=True, launcher=launcher)
    assert high == 0.0 and not out.any()


@pytest.mark.parametrize("shape", SHAPES + [(61, 97)], ids=str)
@pytest.mark.parametrize("row_stride", [1, 2, 5])
def test_noise_layer_kernel(shape, row_stride, launcher):
    image = star_image(shape, seed=3 * shape[1])
    expected = wavelet_layer_rows(image, row_stride)
    actual = wavelet_layer_rows(image, row_stride, launcher=launcher)
    assert_same(actual[0], expected[0], what="layer")
    assert_same(actual[1], expected[1], what="valid")


def test_ksigma_noise_through_the_kernel_layer(launcher):
    rng = np.random.default_rng(8)
    image = (0.1 + rng.normal(0, 0.002, (120, 130))).astype(np.float32)
    image[:, :20] = 0
    layer, valid = wavelet_layer_rows(image, 1, launcher=launcher)
    from nsg_gpu.noise import B3_LAYER1_FRACTION, ksigma_clip

    assert ksigma_clip(layer[valid]) / B3_LAYER1_FRACTION == ksigma_noise(image)
    assert ksigma_noise(image) == pytest.approx(0.002, rel=0.05)


# -- stack.cu -------------------------------------------------------------------------------------
_STACK_FIELDS = ("master", "coverage", "low", "high", "flags", "frame_low", "frame_high")


def _assert_same_stack(actual, expected, what):
    for name in _STACK_FIELDS:
        assert_same(getattr(actual, name), getattr(expected, name), what=f"{what}: {name}")


@pytest.mark.parametrize("method", [*METHODS, "auto"])
@pytest.mark.parametrize("n_frames", [1, 2, 3, 5, 8, 13, 24, 41])
def test_reject_combine_kernel(method, n_frames, launcher):
    """Every method, bit for bit, from a single frame to more than 32 (heapsort instead of
    insertion sort), with borders, NaN, outliers, saturated ties and 0-2 frame pixels."""
    values, weights = stack_case(n_frames, 157, seed=n_frames)
    maps = dict(zip(("peak", "noise"), stack_maps(157, seed=n_frames)))
    if method in ("noise", "auto") and n_frames % 2:  # each frame's own noise, one 1e150 times the map's
        maps["noise_scale"] = np.random.default_rng(n_frames).uniform(0.4, 2.5, n_frames)
        maps["noise_scale"][-1] = 1e150
    before = values.copy()
    rejection = Rejection(method).resolve(n_frames)
    expected = reject_combine(values, weights, rejection, **maps)
    actual = reject_combine(values, weights, rejection, launcher=launcher, **maps)
    _assert_same_stack(actual, expected, f"{method}, {n_frames} frames")
    assert_same(values, before, what="input untouched")
    assert expected.coverage[13] == 0 and expected.master[13] == 0
    if method not in ("none", "linear") and n_frames >= 13:  # auto: winsorized or ESD here
        assert expected.low.sum() > 0 and expected.high.sum() > 0  # the rejection branches ran
    if method in ("noise", "auto") and 3 <= n_frames < 8:
        assert expected.high.sum() > 0


@pytest.mark.parametrize(
    "rejection",
    [
        pytest.param(Rejection("sigma", low=2.0, high=1.5, clip_low=False), id="sigma-high-only"),
        pytest.param(Rejection("winsorized", cutoff=0.0, clip_high=False), id="winsorized-no-cutoff-low-only"),
        pytest.param(Rejection("esd", esd_alpha=0.2, esd_outliers=0.5, esd_low_relaxation=2.0), id="esd-relaxed"),
        pytest.param(Rejection("esd", clip_low=False), id="esd-high-only"),
        pytest.param(Rejection("linear", low=2.0, high=1.5), id="linear-tight"),
        pytest.param(Rejection("percentile", low=0.0, high=0.0), id="percentile-zero"),
        pytest.param(Rejection("noise", low=2.0, high=1.0, signal_share=0.1, clip_low=False), id="noise-high-only"),
    ],
)
def test_reject_combine_kernel_options(rejection, launcher):
    values, weights = stack_case(17, 131, seed=3)
    maps = dict(zip(("peak", "noise"), stack_maps(131, seed=3)))
    rejection = rejection.resolve(17)
    expected = reject_combine(values, weights, rejection, **maps)
    actual = reject_combine(values, weights, rejection, launcher=launcher, **maps)
    _assert_same_stack(actual, expected, rejection.describe())
    if not rejection.clip_low:
        assert not expected.low.any()
    if not rejection.clip_high:
        assert not expected.high.any()


def test_reject_combine_kernel_keeps_a_pixel_whose_samples_all_fail(launcher):
    """Two samples far apart under percentile clipping: both would go; the pixel keeps them."""
    values = np.array([[0.1, 0.1], [0.3, 0.0]], np.float32)
    rejection = Rejection("percentile").resolve(2)
    expected = reject_combine(values, [1.0, 3.0], rejection)
    actual = reject_combine(values, [1.0, 3.0], rejection, launcher=launcher)
    _assert_same_stack(actual, expected, "all rejected")
    assert expected.master[0] == np.float32((0.1 * 1.0 + 0.3 * 3.0) / 4.0)
    assert expected.low[0] == expected.high[0] == 0


def test_info_names_the_backend_and_why():
    from nsg_gpu.backend import cupy_status, describe_backend

    usable, reason = cupy_status()
    lines = describe_backend("auto")
    if usable:
        assert lines[0].startswith("backend: cupy (asked: auto; a usable CUDA GPU was found")
        assert lines[1].startswith("GPU: ") and "GiB" in lines[1]
    else:
        assert lines[0] == f"backend: numpy (asked: auto; no usable GPU: {reason})"
        assert lines[1] == "GPU: none usable"
    assert lines[2].startswith("versions: ") and f"NumPy {np.__version__}" in lines[2]
    assert describe_backend("numpy")[0] == "backend: numpy (asked: numpy; asked for by name)"


def test_bin_medians_kernel_wide_range_and_tiny_counts(launcher):
    """Values over six decades (every byte of the float bits varies) and bins with 1 or 2 usable pixels."""
    rng = np.random.default_rng(21)
    frame = (10 ** rng.uniform(-6, 0, (1, 83, 121)) * 0.99).astype(np.float32)
    frame[0, :3, :] = 0  # the first bin row keeps few usable pixels
    grid = grid_for(frame.shape[1:], 40)
    frame[0, grid.y0 : grid.y0 + 40, grid.x0 : grid.x0 + 40] = 0
    frame[0, grid.y0 + 5, grid.x0 + 7] = 0.25  # one usable pixel
    frame[0, grid.y0 : grid.y0 + 40, grid.x0 + 40 : grid.x0 + 80] = 0
    frame[0, grid.y0 + 9, grid.x0 + 41 : grid.x0 + 43] = [0.5, 0.125]  # two
    expected = bin_statistics(frame, grid, 1.0)
    actual = bin_statistics(frame, grid, 1.0, launcher=launcher)
    assert expected[0][0, 0, 0] == np.float32(0.25) and expected[0][0, 0, 1] == np.float32(0.3125)
    assert_same(actual[0], expected[0], what="medians")
    assert_same(actual[1].astype(np.int64), expected[1].astype(np.int64), what="no-data counts")


# -- the whole pipeline through the emulated kernels ------------------------------------------------
def test_pipeline_through_emulated_kernels(monkeypatch):
    """normalize_frame with every image-sized stage on the (emulated) kernels equals the NumPy
    path evaluating the spline exactly: scale within 1e-5, output within 1e-3 of the noise."""
    from nsg_gpu import gradient
    from nsg_gpu.backend import NUMPY
    from nsg_gpu.io import Frame, FrameMeta
    from nsg_gpu.pipeline import normalize_frame
    from nsg_gpu.reference import prepare_reference
    from nsg_gpu.spline import evaluate_surfaces
    from nsg_gpu.synthetic import SyntheticField

    field = SyntheticField(width=512, height=384, n_frames=2, seed=5, n_stars=400)
    meta = FrameMeta(focal_length_mm=530.0, pixel_size_um=3.76)
    frames = [Frame(Path(f"frame_{k}.fits"), field.render(k), None, 1.0, meta) for k in range(2)]

    def exact(splines, height, width, *, step=16, xp=np, launcher=None, lattice=None):
        return evaluate_surfaces(splines, height, width, step=1, xp=xp, launcher=launcher)

    with monkeypatch.context() as patch:
        patch.setattr(gradient, "evaluate_surfaces", exact)
        reference = prepare_reference(frames[0], backend=NUMPY)
        expected = normalize_frame(reference, frames[1])
    launcher = EmulatedLauncher(multiprocessors=2)
    monkeypatch.setattr(kernels, "launcher_for", lambda on_gpu: launcher)
    emulated_reference = prepare_reference(frames[0], backend=NUMPY)
    actual = normalize_frame(emulated_reference, frames[1])
    assert {name for name, _ in launcher.launches} == {n for n, e in kernels.REGISTRY.items() if e.family != "stack"}
    assert len(emulated_reference.stars) == len(reference.stars)
    assert_close(emulated_reference.noise, reference.noise, "emulated_reference_noise")
    assert actual.samples == expected.samples and actual.star_pairs == expected.star_pairs
    assert_close(actual.scale, expected.scale, "emulated_scale")
    difference = np.abs(actual.data - expected.data).max(axis=(1, 2))
    assert np.all(difference <= 1e-3 * field.pixel_noise(1)), difference / field.pixel_noise(1)
    assert_close(actual.noise, expected.noise, "emulated_noise")
    assert actual.high == pytest.approx(expected.high, abs=1e-3 * field.pixel_noise(1)[0])
