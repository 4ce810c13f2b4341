"""Array backends: NumPy everywhere, CuPy where a usable CUDA GPU exists.

Library functions infer the backend from the arrays they are given (:func:`get_backend`);
only the edges (command line, benchmarks, tests) pick one by name (:func:`select_backend`).
There is no global "current backend" and nothing is swapped at import time, so
``import nsg_gpu`` works on machines without CuPy. Host/device copies go through
:meth:`Backend.asarray` and :meth:`Backend.to_host` so that they can be found by name.

:func:`single_threaded_blas` runs the host's dense linear algebra on one BLAS/OpenMP thread:
LAPACK's blocked factorizations round differently at different thread counts, and the same
frames must give the same bytes however the run was executed. The run's parallelism comes
from frames (:mod:`nsg_gpu.executors`), so one BLAS thread per frame also keeps a few cores
from being oversubscribed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.ndimage
from threadpoolctl import threadpool_limits

from . import kernels
from .errors import BackendUnavailableError

__all__ = [
    "Backend",
    "NUMPY",
    "BACKEND_NAMES",
    "cupy_status",
    "get_backend",
    "select_backend",
    "describe_backend",
    "single_threaded_blas",
]

BACKEND_NAMES = ("auto", "numpy", "cupy")


@dataclass(frozen=True)
class Backend:
    """One array library together with its ``ndimage`` counterpart.

    Parameters
    ----------
    name : str
        ``"numpy"`` or ``"cupy"``.

    xp : module
        The array module (``numpy`` or ``cupy``).

    ndimage : module
        ``scipy.ndimage`` or ``cupyx.scipy.ndimage``.
    """

    name: str
    xp: ModuleType
    ndimage: ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """Move ``array`` onto this backend (a host-to-device copy for CuPy)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_host(self, array: Any) -> np.ndarray:
        """Return ``array`` as a NumPy array (a device-to-host copy for CuPy)."""
        if self.is_gpu:
            return self.xp.asnumpy(array)
        return np.asarray(array)


NUMPY = Backend("numpy", np, scipy.ndimage)


@functools.lru_cache(maxsize=1)
def cupy_status() -> tuple[bool, str]:
    """Tell whether CuPy is importable *and* a CUDA device is usable.

    Returns
    -------
    usable : bool
        True when CuPy imports and ``cupy.is_available()`` is true.

    reason : str
        One line saying why (or on which device) for ``nsg info`` and error messages.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA installation
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc}); install nsg-gpu[gpu]"
    try:
        available = bool(cupy.is_available())
    except Exception as exc:
        return False, f"CuPy is installed but CUDA failed ({type(exc).__name__}: {exc})"
    if not available:
        return False, "CuPy is installed but no usable CUDA GPU was found"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception:
        name = "CUDA device"
    return True, f"CuPy {cupy.__version__} on {name}"


@functools.lru_cache(maxsize=1)
def _cupy_backend() -> Backend:
    import cupy
    import cupyx.scipy.ndimage

    return Backend("cupy", cupy, cupyx.scipy.ndimage)


def select_backend(name: str = "auto") -> Backend:
    """Choose a backend by name, for the edges of the program.

    Parameters
    ----------
    name : {"auto", "numpy", "cupy"}
        ``"auto"`` picks CuPy when a usable GPU exists and NumPy otherwise.

    Raises
    ------
    BackendUnavailableError
        ``"cupy"`` was asked for where no usable GPU exists, or ``name`` is unknown.
    """
    name = name.lower()
    if name not in BACKEND_NAMES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "numpy":
        return NUMPY
    usable, reason = cupy_status()
    if name == "cupy" and not usable:
        raise BackendUnavailableError(f"--backend cupy is not usable here: {reason}")
    return _cupy_backend() if usable else NUMPY


def get_backend(*arrays: Any) -> Backend:
    """Infer the backend from array arguments: CuPy if any of them is a CuPy array."""
    for array in arrays:
        module = type(array).__module__
        if module.startswith("cupy"):
            return _cupy_backend()
    return NUMPY


def describe_backend(asked: str = "auto") -> list[str]:
    """Lines for ``nsg info``: the backend chosen for ``asked`` and why, the GPU, the versions.

    Raises
    ------
    BackendUnavailableError
        As :func:`select_backend`.
    """
    import platform

    import scipy

    chosen = select_backend(asked)
    usable, reason = cupy_status()
    if chosen.is_gpu:
        why = f"a usable CUDA GPU was found ({reason})"
    elif asked.lower() == "numpy":
        why = "asked for by name"
    else:
        why = f"no usable GPU: {reason}"
    lines = [f"backend: {chosen.name} (asked: {asked}; {why})"]
    versions = [f"NumPy {np.__version__}", f"SciPy {scipy.__version__}", f"Python {platform.python_version()}"]
    if usable:
        d = kernels.describe_device()
        gib = 1024.0**3
        lines.append(
            f"GPU: {d['name']}, compute capability {d['compute_capability']}, {d['multiprocessors']} multiprocessors, "
            f"{d['memory_total_bytes'] / gib:.1f} GiB ({d['memory_free_bytes'] / gib:.1f} GiB free)"
        )
        versions = [f"CuPy {d['cupy']}", f"CUDA runtime {d['cuda_runtime']}", f"driver {d['cuda_driver']}", *versions]
    else:
        lines.append("GPU: none usable")
        try:
            import cupy

            versions.insert(0, f"CuPy {cupy.__version__}")
        except Exception:
            versions.insert(0, "CuPy not installed")
    lines.append("versions: " + ", ".join(versions))
    return lines


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limit = None


@contextlib.contextmanager
def single_threaded_blas():
    """Run the enclosed host computations with one BLAS and one OpenMP thread.

    Re-entrant and shared by threads: the first to enter sets the limit and the last to leave
    restores what was there, so that two frames computed at once both run under it.
    """
    global _blas_users, _blas_limit
    with _blas_lock:
        if _blas_users == 0:
            _blas_limit = contextlib.ExitStack()
            _blas_limit.enter_context(threadpool_limits(limits=1))
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limit.close()
                _blas_limit = None
