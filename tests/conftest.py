"""Shared fixtures: synthetic sets with known truth, normalized once per session."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy import special

from nsg_gpu.run import normalize
from nsg_gpu.synthetic import SyntheticField, write_synthetic_set

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ngc7023"


#: At most this many test processes: each holds a few full-size synthetic sets at once.
MAX_TEST_PROCESSES = 4


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Spread the tests over the cores this process may use (pytest-xdist, which the ``test``
    extra installs), each worker taking the next test as it frees; ``-n N`` chooses, ``-n 0``
    runs them in this process. Without pytest-xdist they run here, one after another."""
    option = config.option
    if not config.pluginmanager.hasplugin("xdist") or getattr(option, "numprocesses", None) is not None:
        return
    if option.usepdb or option.collectonly or hasattr(config, "workerinput"):
        return  # a worker runs its tests itself
    option.numprocesses = "auto"
    if option.dist == "no":
        option.dist = "worksteal"


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """The cores this process may use (``taskset`` counts), up to MAX_TEST_PROCESSES; on one
    core 0, so the tests run in this process without a worker's start-up.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides where it is set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 2 else min(cores, MAX_TEST_PROCESSES)


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests where no GPU is usable, unless NSG_REQUIRE_GPU=1 demands one."""
    from nsg_gpu.backend import cupy_status

    usable, reason = cupy_status()
    if usable:
        return
    if os.environ.get("NSG_REQUIRE_GPU") == "1":
        return  # pytest_runtest_setup fails them
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"no usable GPU: {reason}"))


def pytest_runtest_setup(item):
    """With NSG_REQUIRE_GPU=1 a ``gpu`` test without a usable GPU is an error, not a skip."""
    from nsg_gpu.backend import cupy_status

    usable, reason = cupy_status()
    if "gpu" in item.keywords and not usable and os.environ.get("NSG_REQUIRE_GPU") == "1":
        pytest.fail(f"NSG_REQUIRE_GPU=1 but {reason}", pytrace=False)


def mutation_fuzz(test):
    """Run ``test(..., position, length, fill, truncate)`` over hypothesis's byte mutations of a
    file (FUZZ_EXAMPLES of them, 60 by default), for :func:`read_mutated`."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    return settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )(
        given(
            position=st.floats(0, 1),
            length=st.integers(1, 64),
            fill=st.binary(min_size=1, max_size=64),
            truncate=st.booleans(),
        )(test)
    )


def read_mutated(source: Path, directory: Path, *, position: float, length: int, fill: bytes, truncate: bool):
    """Overwrite ``length`` bytes of ``source`` at ``position`` (0-1) with ``fill``, or truncate
    it there, and read the result: a Frame, or FrameError, never another exception."""
    from nsg_gpu.errors import FrameError
    from nsg_gpu.io import read_frame

    blob = bytearray(source.read_bytes())
    start = int(position * (len(blob) - 1))
    if truncate:
        blob = blob[:start]
    else:
        blob[start : start + length] = (fill * (length // len(fill) + 1))[:length]
    target = directory / f"mutated{source.suffix}"
    target.write_bytes(bytes(blob))
    try:
        frame = read_frame(target)
    except FrameError:
        return None
    assert frame.data.dtype == np.float32 and np.all(np.isfinite(frame.data))
    return frame


class NormalizedSet:
    """A synthetic set on disk, its truth, and the run that normalized it."""

    def __init__(self, root: Path, *, frames_of: NormalizedSet | None = None, **spec):
        """Write the frames of ``spec`` under ``root``, or take those ``frames_of`` wrote, and
        normalize them into ``root / "out"``."""
        if frames_of is None:
            self.field = SyntheticField(**spec)
            self.paths = write_synthetic_set(root / "in", self.field.spec)
            self.truth = json.loads((root / "in" / "truth.json").read_text())
        else:
            self.field, self.paths, self.truth = frames_of.field, frames_of.paths, frames_of.truth
        self.run = normalize(self.paths, reference=self.paths[0], output_dir=root / "out")
        self.out_dir = root / "out"

    def input(self, k: int) -> np.ndarray:
        """Frame ``k`` as written, ``(channels, h, w)``: ``field.render(k)`` to the bit (float32
        in FITS), without rendering it again."""
        data = np.asarray(fits.getdata(self.paths[k]), np.float32)
        return data[None] if data.ndim == 2 else data

    def background_noise(self, k: int) -> np.ndarray:
        """``field.background_noise(k)`` (float32 per channel) as truth.json records it, exactly."""
        return np.asarray(self.truth["frames"][k]["background_noise"], np.float32)

    def output(self, k: int) -> tuple[np.ndarray, fits.Header]:
        with fits.open(self.run.frames[k].output) as hdul:
            data = np.asarray(hdul[0].data, np.float32)
            header = hdul[0].header.copy()
        return (data[None] if data.ndim == 2 else data), header


#: What the engine is built to reach: 1/NSGS within this (relative) of the true scale.
SCALE_TARGET = 0.005


def integrated_gaussians(shape, x, y, fwhm: float, flux: float) -> np.ndarray:
    """Gaussian stars of ``fwhm`` and ``flux`` at ``(x, y)`` integrated over square pixels
    (exactly, by the error function), on a zero image of ``shape``; each star is drawn
    within 6 px of its pixel, so stars of a few pixels' FWHM or less."""
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    image = np.zeros(shape)
    for xi, yi in zip(x, y):
        i0, j0 = max(int(xi) - 6, 0), max(int(yi) - 6, 0)
        i1, j1 = min(int(xi) + 8, shape[1]), min(int(yi) + 8, shape[0])
        across = np.diff(0.5 * special.erf((np.arange(i0, i1 + 1) - 0.5 - xi) / (math.sqrt(2) * sigma)))
        down = np.diff(0.5 * special.erf((np.arange(j0, j1 + 1) - 0.5 - yi) / (math.sqrt(2) * sigma)))
        image[j0:j1, i0:i1] += flux * np.outer(down, across)
    return image


def scale_errors(s: NormalizedSet) -> np.ndarray:
    """Relative error of 1/NSGSc against the true scale, per target frame and channel."""
    errors = []
    for k in range(1, len(s.paths)):
        data, header = s.output(k)
        truth = s.field.frames[k].scale(s.field.reference)
        measured = np.array([1.0 / header[f"NSGS{c}"] for c in range(data.shape[0])])
        errors.append(measured / truth - 1)
    return np.array(errors)


#: The generator's defaults: reference FWHM 2.8 px, the next frame 4.2 px, the others random
#: in 2.5-4.5 px; transmissions 0.45-1.0; gradients up to 10 sigma; about 3500 stars.
MONO_SPEC = dict(width=2000, height=1400, n_frames=5, seed=1)


@pytest.fixture(scope="session")
def mono_set(tmp_path_factory) -> NormalizedSet:
    """Mono 2000x1400 frames from the generator's defaults, normalized to frame 0."""
    return NormalizedSet(tmp_path_factory.mktemp("mono"), **MONO_SPEC)


@pytest.fixture(scope="session")
def colour_set(tmp_path_factory) -> NormalizedSet:
    """Colour 2000x1400 frames with per-channel transmission, normalized to frame 0."""
    return NormalizedSet(
        tmp_path_factory.mktemp("colour"),
        width=2000,
        height=1400,
        n_frames=3,
        seed=11,
        colour=True,
        fwhms=[2.8, 4.2, 3.3],
        transmissions=[0.9, 0.5, 1.0],
    )
