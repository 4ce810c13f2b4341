"""nsg-gpu: NormalizeScaleGradient for stacks of astronomical frames, on the GPU or the CPU.

The library in one call::

    import nsg_gpu
    run = nsg_gpu.normalize(["a.fits", "b.fits"], reference="a.fits", output_dir="out")

and per frame in memory with :func:`prepare_reference` and :func:`normalize_frame`;
:func:`stack` integrates the normalized frames into a master.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    FrameDataError,
    FrameError,
    FrameReadError,
    FrameShapeError,
    NSGError,
    ReferenceFrameError,
    TooFewSamplesError,
    TooFewStarsError,
)
from .params import Parameters  # noqa: E402
from .pipeline import normalize, normalize_frame, prepare_reference  # noqa: E402
from .stack import stack  # noqa: E402

__all__ = [
    "__version__",
    "Parameters",
    "normalize",
    "normalize_frame",
    "prepare_reference",
    "stack",
    "NSGError",
    "FrameError",
    "FrameReadError",
    "FrameShapeError",
    "FrameDataError",
    "TooFewStarsError",
    "TooFewSamplesError",
    "ReferenceFrameError",
]
