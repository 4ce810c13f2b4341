"""nsg-gpu: NormalizeScaleGradient for stacks of astronomical frames, on the GPU or the CPU.

The library in one call::

    import nsg_gpu
    run = nsg_gpu.normalize(["a.fits", "b.fits"], reference="a.fits", output_dir="out")

and per frame in memory with :func:`prepare_reference` and :func:`normalize_frame`;
:func:`stack` integrates the normalized frames into a master. The modules read bottom-up in
the order of the data: ``io`` and ``params``; ``stars``, ``photometry``, ``psf``;
``reference``; ``scale``; ``samples``, ``spline``, ``gradient``; ``apply``, ``noise``;
``pipeline`` (one frame); ``jobs``; ``executors``, ``cluster``; ``run`` (a whole run); the
results files, plots and report; ``stacking`` (integration); ``cli``.
"""

# interrupts first: a worker process of a cluster nsg started ignores Ctrl-C from here on.
from . import interrupts, synthetic  # noqa: F401
from .errors import (
    FrameDataError,
    FrameError,
    FrameReadError,
    FrameShapeError,
    NSGError,
    ReferenceFrameError,
    TooFewSamplesError,
    TooFewStarsError,
)
from .io import Frame, read_frame
from .params import Parameters
from .pipeline import normalize_frame
from .reference import prepare_reference
from .results import FrameResult, RunResult
from .run import normalize
from .stacking import stack
from .version import __version__

__all__ = [
    "__version__",
    "Frame",
    "FrameResult",
    "Parameters",
    "RunResult",
    "normalize",
    "normalize_frame",
    "prepare_reference",
    "read_frame",
    "stack",
    "synthetic",
    "NSGError",
    "FrameError",
    "FrameReadError",
    "FrameShapeError",
    "FrameDataError",
    "TooFewStarsError",
    "TooFewSamplesError",
    "ReferenceFrameError",
]
