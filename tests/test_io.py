"""Reading and writing frames: units, no-data pixels, errors naming the file, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from nsg_gpu.errors import FrameReadError, FrameShapeError, OutputError
from nsg_gpu.io import frame_stem, output_path, read_frame, write_frame
from nsg_gpu.keywords import NSGCards, set_nsg_keywords


def test_integer_frames_are_scaled_and_nonfinite_is_no_data(tmp_path):
    raw = np.array([[0, 1000], [65535, 30000]], dtype=np.float64)
    hdu = fits.PrimaryHDU((raw - 32768).astype(np.int16))
    hdu.header["BZERO"] = 32768
    hdu.header["BSCALE"] = 1
    hdu.writeto(tmp_path / "u16.fits")
    frame = read_frame(tmp_path / "u16.fits")
    assert frame.data.dtype == np.float32 and frame.data.shape == (1, 2, 2)
    np.testing.assert_array_equal(frame.data[0], raw)
    assert frame.white_level == 65535
    # A 16-bit camera's counts in a 32-bit integer file have the 16-bit file's white level;
    # counts beyond 16 bits, the type's.
    fits.PrimaryHDU(raw.astype(np.int32)).writeto(tmp_path / "i32.fits")
    wide = read_frame(tmp_path / "i32.fits")
    np.testing.assert_array_equal(wide.data, frame.data)
    assert wide.white_level == 65535
    fits.PrimaryHDU((raw * 4).astype(np.int32)).writeto(tmp_path / "i32-18bit.fits")
    assert read_frame(tmp_path / "i32-18bit.fits").white_level == 2**31 - 1
    # Float data in [0, 1] with a few pixels beyond 1 (a flat-divided saturated core) is data
    # in [0, 1]; float data in ADU holds its sky's noise above 1 in most pixels, even with its
    # sky subtracted.
    sky = np.random.default_rng(3).normal(0.01, 0.002, (256, 256)).astype(np.float32)
    sky[30:33, 30:33] = 1.08
    fits.PrimaryHDU(sky).writeto(tmp_path / "over.fits")
    assert read_frame(tmp_path / "over.fits").white_level == 1
    fits.PrimaryHDU(np.minimum(sky, 0.9) * 65535 - 655).writeto(tmp_path / "adu-float.fits")
    assert read_frame(tmp_path / "adu-float.fits").white_level == 65535
    fits.PrimaryHDU(np.array([[np.nan, 0.5], [np.inf, 0.2]], np.float32)).writeto(tmp_path / "nan.fits")
    np.testing.assert_array_equal(read_frame(tmp_path / "nan.fits").data[0], np.array([[0, 0.5], [0, 0.2]], np.float32))


def test_tile_compressed_and_gzipped_frames_read_as_the_plain_one(tmp_path):
    """A camera's 16-bit frame as a plain FITS, tile-compressed (``.fz``: the image in the
    first extension, the capture's cards in the primary header, which the image inherits)
    and gzipped: the same pixels, units and header facts."""
    raw = np.random.default_rng(4).integers(0, 65536, (30, 40)).astype(np.uint16)
    header = fits.Header({"EXPTIME": 30.0, "FILTER": "L"})
    fits.PrimaryHDU(raw, header).writeto(tmp_path / "plain.fits")
    fits.HDUList([fits.PrimaryHDU(header=header), fits.CompImageHDU(raw)]).writeto(tmp_path / "tiles.fits.fz")
    fits.PrimaryHDU(raw, header).writeto(tmp_path / "zipped.fits.gz")
    plain = read_frame(tmp_path / "plain.fits")
    np.testing.assert_array_equal(plain.data[0], raw.astype(np.float32))
    for name in ("tiles.fits.fz", "zipped.fits.gz"):
        other = read_frame(tmp_path / name)
        np.testing.assert_array_equal(other.data, plain.data)
        assert other.white_level == plain.white_level and other.meta.exposure == 30.0
        assert output_path(tmp_path / name, tmp_path / "o").name == f"{name.split('.')[0]}_nsg.fits"
    assert frame_stem("a.fz") == "a" and frame_stem("a.FIT.fz") == "a" and frame_stem("a.fts.gz") == "a"


def test_colour_planes_on_the_last_axis_are_named(tmp_path):
    fits.PrimaryHDU(np.ones((30, 40, 3), np.float32)).writeto(tmp_path / "planes_last.fits")
    with pytest.raises(FrameShapeError, match=r"3 planes on the first axis \(NAXIS3 = 3\), not the last"):
        read_frame(tmp_path / "planes_last.fits")


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.fits"
    bad.write_bytes(b"this is not a FITS file at all" * 100)
    with pytest.raises(FrameReadError, match="garbage.fits"):
        read_frame(bad)
    fits.PrimaryHDU(np.zeros((2, 3, 4), np.float32)).writeto(tmp_path / "cube.fits")
    with pytest.raises(FrameShapeError, match="3 planes"):
        read_frame(tmp_path / "cube.fits")
    with pytest.raises(FrameReadError, match="no such file"):
        read_frame(tmp_path / "missing.fits")


def test_write_is_atomic_and_keeps_header(tmp_path):
    header = fits.Header()
    header["CTYPE1"] = "RA---TAN"
    header["NSGS0"] = 9.0
    header.add_history("NSG.old: 1")
    header.add_history("calibrated")
    cards = NSGCards(reference_name="ref.fits", transmission=[0.5], snr=[0.8], weight=0.64, high=1.2, history=["x: 1"])
    header = set_nsg_keywords(header, cards)
    path = write_frame(tmp_path / "out.fits", np.ones((1, 4, 5), np.float32), header)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits"]
    with fits.open(path) as hdul:
        h = hdul[0].header
        assert h["NSGS0"] == 0.5 and h["NWEIGHT"] == pytest.approx(0.64) and h["CTYPE1"] == "RA---TAN"
        assert "NSGS1" not in h
        assert [str(v) for v in h["HISTORY"]] == ["calibrated", "NSG.x: 1"]
    assert output_path("/a/light_1.fits.gz", "/o").name == "light_1_nsg.fits"


def test_write_failure_leaves_nothing(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(OutputError):
        write_frame(blocked / "out.fits", np.ones((1, 2, 2), np.float32), fits.Header())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_pixel_anywhere_reads_as_zero(tmp_path, bad):
    """The reader's finite check (minimum and maximum) finds a lone NaN or infinity and
    zeroes it, as nan_to_num over the whole frame does; clean frames come back unchanged."""
    rng = np.random.default_rng(5)
    data = rng.uniform(-1, 2, (3, 40, 50)).astype(np.float32)
    fits.PrimaryHDU(data).writeto(tmp_path / "clean.fits")
    np.testing.assert_array_equal(read_frame(tmp_path / "clean.fits").data, data)
    dirty = data.copy()
    dirty[2, 39, 49] = bad
    fits.PrimaryHDU(dirty).writeto(tmp_path / "dirty.fits")
    expected = np.nan_to_num(dirty, nan=0.0, posinf=0.0, neginf=0.0)
    np.testing.assert_array_equal(read_frame(tmp_path / "dirty.fits").data, expected)


def test_quiet_warnings_holds_while_other_threads_quiet_theirs():
    """Four threads each ignore a warning they raise, 20 000 times, under filters that turn
    warnings into errors (as pytest's do): none escapes. With ``warnings.catch_warnings``
    alone, whose blocks swap the process's filters, 10-65 escaped in every such run."""
    import sys
    import threading
    import warnings

    from nsg_gpu.errors import quiet_warnings

    escaped = []

    def work():
        for _ in range(20_000):
            try:
                with quiet_warnings(UserWarning):
                    warnings.warn("ignored", UserWarning, stacklevel=1)
            except UserWarning as exc:
                escaped.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads = [threading.Thread(target=work) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not escaped
