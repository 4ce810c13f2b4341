"""Atomic writes: complete or absent, with the mode the umask gives, temporaries cleared."""

from __future__ import annotations

import os
import stat

import pytest

from nsg_gpu.atomic import AtomicGroup, remove_stale_temporaries, write_bytes
from nsg_gpu.errors import OutputError


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = write_bytes(tmp_path / "results.csv", b"a,b\n")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)
    assert path.read_bytes() == b"a,b\n"


def test_a_failed_write_leaves_nothing_and_stale_temporaries_are_removed(tmp_path):
    def fail(handle, name):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    from nsg_gpu.atomic import atomic_write

    with pytest.raises(OutputError, match="No space left"):
        atomic_write(tmp_path / "frame_nsg.fits", fail)
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".frame_nsg.fits.abc123.tmp"
    stale.write_bytes(b"left by a killed run")
    other = tmp_path / "other_nsg.fits"
    other.write_bytes(b"complete")
    remove_stale_temporaries([tmp_path / "frame_nsg.fits", other])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_nsg.fits"]


def test_a_group_of_files_is_written_all_or_none(tmp_path):
    """AtomicGroup: nothing appears until every file is written; a failed write, an error in
    the block or a path taken by a folder leaves none of them, nor any temporary."""
    old = tmp_path / "a.fits"
    old.write_bytes(b"old")

    def fail(handle, name):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="b.csv: cannot be written"):
        with AtomicGroup() as group:
            group.write(old, lambda handle, _: handle.write(b"new"))
            assert old.read_bytes() == b"old"
            group.write(tmp_path / "b.csv", fail)
    with pytest.raises(RuntimeError):
        with AtomicGroup() as group:
            group.write(old, lambda handle, _: handle.write(b"new"))
            raise RuntimeError("stop")
    (tmp_path / "c.csv").mkdir()
    with pytest.raises(OutputError, match="c.csv: cannot be written"):
        with AtomicGroup() as group:
            group.write(old, lambda handle, _: handle.write(b"new"))
            group.write(tmp_path / "c.csv", lambda handle, _: handle.write(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fits", "c.csv"] and old.read_bytes() == b"old"
    with AtomicGroup() as group:
        group.write(old, lambda handle, _: handle.write(b"new"))
        group.write(tmp_path / "d.csv", lambda handle, _: handle.write(b"d"))
    assert old.read_bytes() == b"new" and (tmp_path / "d.csv").read_bytes() == b"d"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fits", "c.csv", "d.csv"]
