"""The NumPy/CuPy switch: the backend inferred from arrays, CuPy refused without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from nsg_gpu.backend import NUMPY, get_backend, select_backend
from nsg_gpu.errors import BackendUnavailableError


def test_backend_inferred_from_arrays_and_cupy_refused_without_gpu():
    assert get_backend(np.zeros(3)) is NUMPY
    assert select_backend("numpy") is NUMPY
    from nsg_gpu.backend import cupy_status

    if not cupy_status()[0]:
        with pytest.raises(BackendUnavailableError, match="not usable"):
            select_backend("cupy")
        assert select_backend("auto") is NUMPY
