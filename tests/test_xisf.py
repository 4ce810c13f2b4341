"""XISF frames: read through the ``xisf`` package, normalized, written back with keywords and properties."""

from __future__ import annotations

import numpy as np
import pytest
import xisf
from astropy.io import fits
from conftest import mutation_fuzz, read_mutated

from nsg_gpu.errors import FrameReadError
from nsg_gpu.io import read_frame
from nsg_gpu.run import normalize
from nsg_gpu.synthetic import SyntheticField

SMALL = dict(width=700, height=500, n_stars=900, n_frames=2)

PROPERTY = {"id": "Observation:Object:Name", "type": "String", "value": "Synthetic field"}


def _keywords(header: fits.Header) -> dict:
    """FITS keywords as PixInsight stores them in XISF: strings quoted, numbers as text."""
    out = {}
    for card in header.cards:
        value = f"'{card.value}'" if isinstance(card.value, str) else repr(card.value)
        out.setdefault(card.keyword, []).append({"value": value, "comment": card.comment})
    return out


def _write_xisf_set(directory, field: SyntheticField, rendered: list | None = None) -> list:
    """The field's frames (``rendered`` already, or rendered here) as XISF (channels last in
    memory, planar on disk), as PixInsight writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, frame in enumerate(field.frames):
        path = directory / f"{frame.name}.xisf"
        data = (field.render(k) if rendered is None else rendered[k]).transpose(1, 2, 0)  # (height, width, channels)
        metadata = {"FITSKeywords": _keywords(field.header(k)), "XISFProperties": {PROPERTY["id"]: dict(PROPERTY)}}
        xisf.XISF.write(str(path), np.ascontiguousarray(data), image_metadata=metadata, codec="zlib", shuffle=True)
        paths.append(path)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("colour", [pytest.param(False, id="mono"), pytest.param(True, id="rgb")])
def test_xisf_round_trip(tmp_path, colour):
    """XISF in, XISF out: the same pixels as the FITS path, keywords and properties carried."""
    field = SyntheticField(seed=31, colour=colour, **SMALL)
    rendered = [field.render(k) for k in range(len(field.frames))]
    paths = _write_xisf_set(tmp_path / "in", field, rendered)
    # The reader gives back exactly what was written, channel by channel.
    frame = read_frame(paths[1])
    np.testing.assert_array_equal(frame.data, rendered[1])
    assert frame.header["FILTER"] == ("OSC" if colour else "L") and frame.meta.exposure == 120.0
    assert frame.properties[PROPERTY["id"]]["value"] == PROPERTY["value"]
    run = normalize(paths, reference=paths[0], output_dir=tmp_path / "out", output_format="xisf")
    assert run.ok, [f.error for f in run.frames]
    # The same frames as FITS give the same normalized pixels.
    fits_paths = []
    for k, frame_truth in enumerate(field.frames):
        fits_paths.append(tmp_path / "fits" / f"{frame_truth.name}.fits")
        fits_paths[-1].parent.mkdir(exist_ok=True)
        fits.PrimaryHDU(rendered[k][0] if not colour else rendered[k], field.header(k)).writeto(fits_paths[-1])
    fits_run = normalize(fits_paths, reference=fits_paths[0], output_dir=tmp_path / "fits_out")
    channels = 3 if colour else 1
    for ours, theirs in zip(run.frames, fits_run.frames):
        assert ours.output.endswith("_nsg.xisf")
        metadata: dict = {}
        data = xisf.XISF.read(ours.output, image_metadata=metadata)  # independent reader
        assert data.shape == (500, 700, channels) and data.dtype == np.float32
        expected = fits.getdata(theirs.output).astype(np.float32)
        np.testing.assert_array_equal(data.transpose(2, 0, 1), expected.reshape(channels, 500, 700))
        keywords = {name: entries[0]["value"] for name, entries in metadata["FITSKeywords"].items()}
        assert keywords["NSGREF"] == "light_000.xisf"
        for c in range(channels):
            assert float(keywords[f"NSGS{c}"]) == pytest.approx(theirs.transmission[c], rel=1e-4)
            assert f"NSGSNR{c}" in keywords
        assert float(keywords["NWEIGHT"]) == pytest.approx(theirs.weight, rel=1e-5)
        assert keywords["OBJECT"] == "SYNTHETIC" and float(keywords["EXPTIME"]) == 120.0
        assert keywords["CTYPE1"] == "RA---TAN"
        assert metadata["XISFProperties"][PROPERTY["id"]]["value"] == PROPERTY["value"]
    # A rerun reads the XISF outputs' NSGHASH and keeps them.
    again = normalize(paths, reference=paths[0], output_dir=tmp_path / "out", output_format="xisf")
    assert all(f.resumed for f in again.frames)


def test_the_same_frame_written_twice_is_the_same_bytes(tmp_path):
    """The xisf package stamps XISF:CreationTime with the clock; ours is the capture time."""
    from nsg_gpu.io import write_frame

    data = np.random.default_rng(2).random((3, 20, 30)).astype(np.float32)
    header = fits.Header({"DATE-OBS": "2024-07-30T22:44:36.25", "EXPTIME": 10.0})
    first = write_frame(tmp_path / "a.xisf", data, header).read_bytes()
    second = write_frame(tmp_path / "b.xisf", data, header).read_bytes()
    assert first == second and b'"XISF:CreationTime" type="String">2024-07-30T22:44:36.250000<' in first
    np.testing.assert_array_equal(read_frame(tmp_path / "a.xisf").data, data)


def test_integer_xisf_keeps_its_white_level(tmp_path):
    values = np.random.default_rng(3).integers(100, 60000, (40, 50, 1)).astype(np.uint16)
    path = tmp_path / "int.xisf"
    xisf.XISF.write(str(path), values)
    frame = read_frame(path)
    assert frame.white_level == 65535.0 and frame.data.dtype == np.float32
    np.testing.assert_array_equal(frame.data[0], values[..., 0].astype(np.float32))


def test_normal_pixel_storage_is_read_as_interleaved(tmp_path):
    """An XISF file written here by hand, samples interleaved (pixelStorage="Normal")."""
    height, width = 30, 40
    rgb = np.random.default_rng(4).uniform(0.01, 1, (height, width, 3)).astype("<f4")
    position = 4096
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><xisf version="1.0" xmlns="http://www.pixinsight.com/xisf">'
        f'<Image geometry="{width}:{height}:3" sampleFormat="Float32" colorSpace="RGB" pixelStorage="Normal" '
        f'location="attachment:{position}:{rgb.nbytes}"><FITSKeyword name="FILTER" value="\'OSC\'" comment=""/>'
        "</Image><Metadata/></xisf>"
    ).encode()
    head = b"XISF0100" + len(xml).to_bytes(4, "little") + bytes(4) + xml
    path = tmp_path / "normal.xisf"
    path.write_bytes(head + bytes(position - len(head)) + rgb.tobytes())
    frame = read_frame(path)
    np.testing.assert_array_equal(frame.data, rgb.transpose(2, 0, 1))
    assert frame.meta.filter == "OSC"


def _damage(kind: str, good: bytes) -> bytes:
    if kind == "not-xisf":
        return b"SIMPLE  =                    T" + b" " * 200
    if kind == "header-cut":
        return good[:40]
    if kind == "data-cut":
        return good[: len(good) - 5000]
    if kind == "garbage-header":
        return good[:16] + b"\x00<not xml" + good[25:]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["not-xisf", "header-cut", "data-cut", "garbage-header"])
def test_corrupt_xisf_is_a_clear_read_error(tmp_path, kind):
    good = tmp_path / "good.xisf"
    xisf.XISF.write(str(good), np.full((60, 80, 1), 0.1, np.float32))
    bad = tmp_path / "light_bad.xisf"
    bad.write_bytes(_damage(kind, good.read_bytes()))
    with pytest.raises(FrameReadError, match=r"light_bad\.xisf: cannot be read as XISF"):
        read_frame(bad)


def test_corrupt_xisf_fails_alone_in_a_run(tmp_path):
    field = SyntheticField(seed=32, **SMALL)
    paths = _write_xisf_set(tmp_path / "in", field)
    bad = tmp_path / "in" / "light_bad.xisf"
    bad.write_bytes(paths[1].read_bytes()[:3000])
    run = normalize([*paths, bad], reference=paths[0], output_dir=tmp_path / "out")
    assert [f.status for f in run.frames] == ["reference", "ok", "failed"]
    assert "light_bad.xisf: cannot be read as XISF" in run.frames[2].error


@mutation_fuzz
def test_xisf_reader_never_fails_unexpectedly(tmp_path_factory, position, length, fill, truncate):
    """Mutated or truncated XISF files are read or rejected with FrameError, nothing else."""
    source = tmp_path_factory.getbasetemp() / "fuzz_source.xisf"
    if not source.exists():
        keywords = {"EXPTIME": [{"value": "10.", "comment": ""}], "FILTER": [{"value": "'L'", "comment": ""}]}
        data = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
        xisf.XISF.write(str(source), data, image_metadata={"FITSKeywords": keywords}, xisf_metadata={})
    read_mutated(
        source, tmp_path_factory.mktemp("fuzz"), position=position, length=length, fill=fill, truncate=truncate
    )


def test_optics_and_exposure_from_xisf_properties_where_keywords_lack_them(tmp_path):
    """An XISF frame that states its optics and exposure as XISF properties only (pixel size
    in um, focal length in m, exposure in s) is read with them, as NSG reads them, where they
    fell back to 6 um and 1000 mm and no exposure; a FITS keyword, where present, comes first."""
    from nsg_gpu.io import read_meta

    data = np.random.default_rng(3).uniform(0.1, 0.2, (40, 60)).astype(np.float32)
    properties = {
        "Instrument:Sensor:XPixelSize": {"id": "Instrument:Sensor:XPixelSize", "type": "Float32", "value": 3.76},
        "Instrument:Telescope:FocalLength": {
            "id": "Instrument:Telescope:FocalLength",
            "type": "Float32",
            "value": 0.53,
        },
        "Instrument:ExposureTime": {"id": "Instrument:ExposureTime", "type": "Float32", "value": 60.0},
    }
    for name, header in (("bare", fits.Header()), ("keyed", fits.Header([("FOCALLEN", 800.0), ("EXPTIME", 30.0)]))):
        path = tmp_path / f"{name}.xisf"
        metadata = {"FITSKeywords": _keywords(header), "XISFProperties": properties}
        xisf.XISF.write(str(path), data[:, :, None], image_metadata=metadata)
        for meta in (read_frame(path).meta, read_meta(path)):
            optics = (meta.pixel_size_um, meta.focal_length_mm, meta.exposure)
            expected = (3.76, 530.0, 60.0) if name == "bare" else (3.76, 800.0, 30.0)
            assert optics == pytest.approx(expected, rel=1e-6), (name, optics)
