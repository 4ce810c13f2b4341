"""One assertion helper for the tests, with every tolerance from one table.

:func:`assert_close` checks the array namespace, then dtype and shape, then values, so that a
test comparing a CuPy result with its NumPy twin, or a stage with an analytic value, fails on
the first thing that differs and says which.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TOLERANCES", "assert_close"]

#: ``(rtol, atol)`` by what is compared. Exact where the computation is the same arithmetic.
TOLERANCES = {
    "exact": (0.0, 0.0),
    # A CUDA kernel against its NumPy twin where both do the same float32 arithmetic.
    "kernel": (0.0, 0.0),
    # The whole frame on the GPU against the NumPy path: scales and noise through other
    # summation orders (float32 reductions on the device).
    "gpu_scale": (1e-5, 0.0),
    "gpu_noise": (1e-4, 0.0),
    "gpu_reference_noise": (1e-6, 0.0),
    # Host emulation of the kernels against the NumPy path.
    "emulated_scale": (1e-5, 0.0),
    "emulated_noise": (1e-5, 0.0),
    "emulated_reference_noise": (1e-6, 0.0),
    # A surface spline against an analytic plane or SciPy's RBF interpolator (float64).
    "spline_plane": (0.0, 1e-9),
    "spline_rbf": (0.0, 1e-8),
}


def _namespace(array) -> str:
    return type(array).__module__.split(".")[0]


def assert_close(actual, expected, kind: str = "exact", *, what: str = "", same_namespace: bool = False) -> None:
    """``actual`` equals ``expected`` within the tolerance of ``kind`` (:data:`TOLERANCES`).

    Array namespace (when ``same_namespace``), dtype and shape first, then values, NaN equal to
    NaN. CuPy arrays are brought to the host for the values.
    """
    rtol, atol = TOLERANCES[kind]
    if same_namespace:
        assert _namespace(actual) == _namespace(expected), f"{what}: {_namespace(actual)} != {_namespace(expected)}"
    actual = actual.get() if hasattr(actual, "get") and not isinstance(actual, np.ndarray) else actual
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.dtype.kind in "fc" or expected.dtype.kind in "fc":
        assert actual.dtype.kind == expected.dtype.kind, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    else:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if rtol == 0 and atol == 0:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what, equal_nan=True)
