"""Exceptions that name the file and the rule it broke, and third-party warnings kept quiet.

Every problem with one frame is a :class:`FrameError`; the pipeline records it against that
frame and goes on with the others. Messages say what to do, not only what went wrong.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
import warnings

__all__ = [
    "NSGError",
    "BackendUnavailableError",
    "ParameterError",
    "FrameError",
    "FrameReadError",
    "FrameShapeError",
    "FrameDataError",
    "TooFewStarsError",
    "TooFewSamplesError",
    "ReferenceFrameError",
    "UnforeseenFrameError",
    "OutputError",
    "StackError",
    "quiet_warnings",
]

#: Held while the process's warning filters are swapped (:func:`quiet_warnings`).
_FILTERS_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_warnings(*categories: type[Warning]):
    """Ignore warnings of ``categories`` (all where none are given) within the block.

    ``warnings.catch_warnings`` swaps the process's one list of filters, and restores it on
    leaving: two such blocks in threads that interleave (a reader and a writer) can leave the
    other thread's ignore undone while its block still runs, and a warning that was to be
    ignored then meets the caller's filters (an error under pytest). The lock keeps such blocks
    from interleaving."""
    with _FILTERS_LOCK, warnings.catch_warnings():
        if categories:
            for category in categories:
                warnings.simplefilter("ignore", category)
        else:
            warnings.simplefilter("ignore")
        yield


class NSGError(Exception):
    """Base class of the errors nsg-gpu raises on purpose."""


class BackendUnavailableError(NSGError):
    """The requested array backend cannot run on this machine."""


class ParameterError(NSGError, ValueError):
    """A parameter outside its range, or an option that cannot be used."""


class FrameError(NSGError):
    """A problem with one input frame; the run goes on with the others."""

    def __init__(self, path: object, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class FrameReadError(FrameError):
    """The file is missing, unreadable, not FITS, or holds no usable image."""


class FrameShapeError(FrameError):
    """The frame's axes or shape differ from what the reference requires."""


class FrameDataError(FrameError):
    """The pixel data cannot be normalized (all zero, wrong units, ...)."""


class TooFewStarsError(FrameError):
    """Too few usable stars or star pairs to measure a photometric scale."""


class TooFewSamplesError(FrameError):
    """Too few background samples to model the gradient."""


class ReferenceFrameError(FrameError):
    """The reference frame is missing or unusable; nothing can be normalized."""


class UnforeseenFrameError(FrameError):
    """An exception nsg-gpu did not foresee while working on one frame (a bug, or memory
    running out): that frame fails, named with the exception and the line that raised it,
    and the run goes on with the others."""

    def __init__(self, path: object, exc: BaseException):
        where = ""
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            last = frames[-1]
            where = f" at {os.path.basename(last.filename)}:{last.lineno} in {last.name}"
        detail = str(exc) or "(no message)"
        super().__init__(
            path,
            f"unexpected {type(exc).__name__}{where}: {detail} (a defect of nsg-gpu, not of the frame: please "
            "report it; NSG_DEBUG=1 raises it with its traceback)",
        )


class OutputError(NSGError):
    """An output could not be written (it is then absent, never partial)."""


class StackError(NSGError):
    """The stack cannot be made (no usable frame, a bad option, an output it cannot write)."""
