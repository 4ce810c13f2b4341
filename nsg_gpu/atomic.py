"""Atomic writes: every output file of a run is complete or absent.

Frames, results, the report and the plots are all written here: to a temporary file beside
the output, synced once, and renamed over it, with the mode a plain ``open()`` would give. A
killed run leaves at most temporary files, which the next run removes
(:func:`remove_stale_temporaries`); only this module knows their names.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path

from .errors import NSGError, OutputError

__all__ = ["AtomicGroup", "atomic_write", "write_bytes", "write_text", "remove_stale_temporaries"]


def _os_reason(error: OSError, directory: Path) -> str:
    if error.errno is not None:
        return os.strerror(error.errno)
    # A short write (astropy reports it without an errno) on a device with no room left.
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return str(error)
    if free < 1 << 20:
        return f"No space left on device ({free // 1024} KiB free)"
    return str(error)


def _umask() -> int:
    """The process's umask, read without changing it where the system shows it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


def _temporary_name(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: str | os.PathLike, fill) -> Path:
    """Write a file atomically: ``fill(handle, name)`` writes a temporary file beside
    ``path``, which is synced once and renamed over ``path``.

    ``path`` is then either the complete new file or untouched. The file gets the mode a plain
    ``open()`` would give it (0666 less the umask). ``fill`` may write to the open binary
    ``handle`` or, for writers that take a file name, to ``name``.

    Raises
    ------
    OutputError
        The directory is not writable or the disk is full; no partial file is left.
    """
    path = Path(path)
    tmp_name = _staged(path, fill)
    try:
        os.replace(tmp_name, path)
    except OSError as exc:
        os.unlink(tmp_name)
        raise OutputError(f"{path}: cannot be written ({_os_reason(exc, path.parent)})") from exc
    return path


class AtomicGroup:
    """Files that are written together or not at all: each is written to a temporary file
    beside it and synced (:meth:`write`), and once all are written they are renamed over
    their paths one after another (:meth:`commit`; a path taken by a folder stops it before
    the first rename); a failure before that leaves none of them (:meth:`discard`). Use as a
    context manager: it commits when the block ends without an error, else discards."""

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path]] = []

    def write(self, path: str | os.PathLike, fill) -> Path:
        """Stage ``path`` (``fill`` as for :func:`atomic_write`)."""
        path = Path(path)
        self._staged.append((_staged(path, fill), path))
        return path

    def commit(self) -> None:
        try:
            for _, path in self._staged:  # what would stop a rename, before any is made
                if path.is_dir():
                    raise OutputError(f"{path}: cannot be written (Is a directory)")
            while self._staged:
                tmp_name, path = self._staged[0]
                try:
                    os.replace(tmp_name, path)
                except OSError as exc:
                    raise OutputError(f"{path}: cannot be written ({_os_reason(exc, path.parent)})") from exc
                del self._staged[0]
        finally:
            self.discard()  # what was not renamed

    def discard(self) -> None:
        for tmp_name, _ in self._staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        self._staged = []

    def __enter__(self) -> AtomicGroup:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def _staged(path: Path, fill) -> str:
    """``fill`` a temporary file beside ``path``, synced; its name. On a failure no
    temporary file is left (:class:`OutputError` where the directory is not writable or
    the disk is full)."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_name(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            fill(handle, tmp_name)
            handle.flush()
            os.fsync(handle.fileno())
        staged, tmp_name = tmp_name, None
        return staged
    except NSGError:
        raise
    except Exception as exc:
        # astropy can mask the OSError of a full disk behind an error of its own clean-up;
        # report the OSError.
        cause = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OutputError(f"{path}: cannot be written ({_os_reason(cause, path.parent)})") from exc
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda handle, _: handle.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (:func:`atomic_write`)."""
    return write_bytes(path, text.encode())


def remove_stale_temporaries(outputs, folders=()) -> None:
    """Delete the temporary files that a killed run left beside these outputs, and any in
    ``folders`` (folders of our files alone: the plots); never a complete file: those have
    their final names."""
    patterns = [(Path(out).parent, f"{glob.escape(_temporary_name(Path(out)))}*.tmp") for out in outputs]
    patterns += [(Path(folder), ".*.*.tmp") for folder in folders]
    for parent, pattern in patterns:
        for stale in parent.glob(pattern):
            try:
                stale.unlink()
            except OSError:
                pass
