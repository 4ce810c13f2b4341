"""FITS and XISF frames in and out: reading, header metadata, output names and atomic writes.

Frames are held channels-first, ``(channels, height, width)`` float32, whatever their layout on
disk (2-D mono, or 3-D colour with three planes). Integer data are scaled by BZERO/BSCALE to
physical values; non-finite pixels become 0, which means "no data" throughout nsg-gpu. An
output is written atomically (:mod:`nsg_gpu.atomic`), so a reader never sees a partial file,
and an input is never opened for writing.

XISF files (PixInsight's format, ``.xisf``) are read and written with the ``xisf`` package:
their planar channels become the frame's channels, their FITS keywords its header, and their
XISF properties ride along in :attr:`Frame.properties` into an XISF output.
"""

from __future__ import annotations

import contextlib
import datetime
import io as _io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from .atomic import atomic_write
from .errors import FrameReadError, FrameShapeError, NSGError, quiet_warnings

__all__ = [
    "float_card",
    "FITS_SUFFIXES",
    "XISF_SUFFIXES",
    "OUTPUT_FORMATS",
    "Frame",
    "FrameMeta",
    "read_frame",
    "read_meta",
    "is_stack_master",
    "MASTER_CARD",
    "MASTER_REASON",
    "read_output_header",
    "meta_from_header",
    "write_frame",
    "output_path",
    "frame_stem",
    "expand_frames",
    "FRAME_SUFFIXES",
    "STRUCTURAL_CARDS",
]

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".fits.gz", ".fit.gz", ".fts.gz")
XISF_SUFFIXES = (".xisf",)
#: Name of the card that marks a master (or map) written by nsg stack: never a frame.
MASTER_CARD = "NSGSTACK"
#: Why such a file is not taken as a frame.
MASTER_REASON = "is a master written by nsg stack, not a frame"
#: What a directory given as frames contributes.
FRAME_SUFFIXES = FITS_SUFFIXES + XISF_SUFFIXES
#: Output formats of ``normalize`` and the file suffix of each.
OUTPUT_FORMATS = {"fits": ".fits", "xisf": ".xisf"}

#: Cards that describe the array layout; astropy writes them from the data itself.
STRUCTURAL_CARDS = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|"
    r"CHECKSUM|DATASUM|Z[A-Z0-9]*)$"
)


@dataclass
class FrameMeta:
    """Header facts nsg-gpu uses: optics for the Auto rules, and columns of the results."""

    exposure: float | None = None
    focal_length_mm: float | None = None
    pixel_size_um: float | None = None
    filter: str | None = None
    date_obs: str | None = None
    altitude: float | None = None
    airmass: float | None = None
    noise: tuple[float, ...] | None = None  # NOISE00..02, one per channel
    bayer_pattern: str | None = None  # BAYERPAT or COLORTYP: a one-shot-colour camera's cells


@dataclass
class Frame:
    """One light frame in memory.

    Attributes
    ----------
    path : Path
        Where it was read from.

    data : ndarray
        ``(channels, height, width)`` float32; 0 marks pixels without data.

    header : astropy.io.fits.Header
        The image header, structural cards included as read (an XISF file's FITS keywords).

    white_level : float
        The value of a saturated pixel in the frame's units: 1.0 for data normalized to
        [0, 1], the largest integer of the stored type for integer data (65535 for a 16-bit
        camera's counts in a wider type); see :func:`_white_level`.

    properties : dict or None
        An XISF file's image properties, as the ``xisf`` package reads them; written back
        into an XISF output. None for FITS.
    """

    path: Path
    data: Any
    header: fits.Header
    white_level: float
    meta: FrameMeta = field(default_factory=FrameMeta)
    properties: dict | None = None

    @classmethod
    def from_array(cls, data, *, name: str = "array", header: fits.Header | None = None) -> Frame:
        """A frame from host data ``(height, width)`` or ``(channels, height, width)``, as
        :func:`read_frame` would hold it: float32, channels first, non-finite pixels 0.

        Raises
        ------
        FrameShapeError
            Not a 2-D mono or 3-plane colour image.
        """
        path = Path(name)
        data = np.array(data, dtype=np.float32)
        if data.ndim == 2:
            data = data[np.newaxis]
        elif data.ndim != 3 or data.shape[0] not in (1, 3):
            raise FrameShapeError(path, shape_problem(tuple(data.shape)))
        _zero_non_finite(data)
        header = header.copy() if header is not None else fits.Header()
        return cls(path, data, header, _white_level(header, data), meta_from_header(header))

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])


def shape_problem(shape: tuple) -> str:
    """What is wrong with an image of ``shape`` (NumPy's order) as a frame."""
    text = f"has shape {shape}; frames must be 2-D mono or 3-D colour with 3 planes"
    if len(shape) == 3 and shape[-1] in (1, 3) and shape[0] not in (1, 3):
        text += " on the first axis (NAXIS3 = 3), not the last"
    return text


def frame_stem(path: str | os.PathLike) -> str:
    """The file name without its FITS or XISF suffixes (``a.fits.gz`` and ``a.fits.fz`` give
    ``a``)."""
    name = Path(path).name
    lower = name.lower()
    compressed = (".fits.fz", ".fit.fz", ".fts.fz")  # a tile-compressed file's usual names
    for suffix in sorted(FITS_SUFFIXES + compressed + XISF_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def output_path(
    path: str | os.PathLike, output_dir: str | os.PathLike, postfix: str = "_nsg", *, output_format: str = "fits"
) -> Path:
    """``<output_dir>/<input stem><postfix>.fits`` (``.xisf`` for the XISF output format)."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    return Path(output_dir) / f"{frame_stem(path)}{postfix}{OUTPUT_FORMATS[output_format]}"


def _is_xisf(path: Path) -> bool:
    return path.name.lower().endswith(XISF_SUFFIXES)


def _first_image_hdu(hdul: fits.HDUList, path: Path):
    for hdu in hdul:
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            if hdu.header.get("NAXIS", 0) >= 2 or (hdu.data is not None and hdu.data.ndim >= 2):
                return hdu
    raise FrameReadError(path, "holds no image (no HDU with two or more axes)")


#: Cards that describe an HDU's own layout, never inherited from the primary header.
_STRUCTURAL = (
    "SIMPLE", "BITPIX", "NAXIS", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "BSCALE", "BZERO", "BLANK",
    "CHECKSUM", "DATASUM", "EXTNAME", "EXTVER", "INHERIT",
)  # fmt: skip


def _image_header(hdul: fits.HDUList, hdu) -> fits.Header:
    """The image HDU's header (a copy), with the primary header's cards it lacks where the
    image lies in an extension: a tile-compressed file (fpack) or an observatory's
    multi-extension file keeps the exposure, filter and time in the primary header (FITS's
    ``INHERIT`` convention)."""
    header = hdu.header.copy()
    if hdu is hdul[0]:
        return header
    for card in hdul[0].header.cards:
        key = card.keyword
        if not key or key in ("COMMENT", "HISTORY") or key.startswith(_STRUCTURAL) or key in header:
            continue
        header.append(card, end=True)
    return header


def _card(header: fits.Header, key: str):
    """A card's value, or None when it is missing or cannot be parsed (a damaged header)."""
    try:
        return header.get(key)
    except Exception:
        return None


def float_card(header: fits.Header, *keys: str) -> float | None:
    """The first of ``keys`` whose card holds a finite number, as a float; None if none does
    (missing, text, a boolean, not finite)."""
    for key in keys:
        value = _card(header, key)
        if value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(number):
            return number
    return None


def meta_from_header(header: fits.Header) -> FrameMeta:
    """The header facts nsg-gpu uses (exposure, optics, filter, time, altitude, noise)."""
    noise = []
    for c in range(3):
        value = float_card(header, f"NOISE0{c}")
        if value is None or value <= 0:
            break
        noise.append(value)
    filt = _card(header, "FILTER")
    date = _card(header, "DATE-OBS")
    return FrameMeta(
        exposure=float_card(header, "EXPOSURE", "EXPTIME", "ELAPTIME"),
        focal_length_mm=float_card(header, "FOCALLEN"),
        pixel_size_um=float_card(header, "XPIXSZ"),
        filter=str(filt).strip() if filt is not None else None,
        date_obs=str(date).strip() if date is not None else None,
        altitude=float_card(header, "ALTITUDE", "OBJCTALT", "CENTALT"),
        airmass=float_card(header, "AIRMASS"),
        noise=tuple(noise) if noise else None,
        bayer_pattern=_bayer_pattern(header),
    )


#: XISF's own properties for what meta_from_header reads from FITS cards, where the file's
#: FITS keywords lack it: (FrameMeta field, property id, factor to our unit).
XISF_META_PROPERTIES = (
    ("pixel_size_um", "Instrument:Sensor:XPixelSize", 1.0),  # um
    ("focal_length_mm", "Instrument:Telescope:FocalLength", 1000.0),  # m
    ("exposure", "Instrument:ExposureTime", 1.0),  # s
)


def xisf_meta(header: fits.Header, properties: dict | None) -> FrameMeta:
    """:func:`meta_from_header` of an XISF file's FITS keywords, completed from its XISF
    properties (:data:`XISF_META_PROPERTIES`) where a keyword is missing."""
    meta = meta_from_header(header)
    for name, key, factor in XISF_META_PROPERTIES:
        prop = (properties or {}).get(key)
        if getattr(meta, name) is not None or not isinstance(prop, dict):
            continue
        try:
            value = float(prop.get("value")) * factor
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            setattr(meta, name, value)
    return meta


def _bayer_pattern(header: fits.Header) -> str | None:
    """The colour cells a one-shot-colour camera's header names (``BAYERPAT``, or MaxIm's
    ``COLORTYP`` where it names cells, e.g. ``RGGB``), or None."""
    for key in ("BAYERPAT", "COLORTYP"):
        value = _card(header, key)
        if isinstance(value, str) and re.fullmatch(r"[RGB]{4}", value.strip().upper()):
            return value.strip().upper()
    return None


def _zero_non_finite(data: np.ndarray) -> None:
    """Set NaN and infinite pixels to 0 (no data), in place. A finite minimum and maximum
    (NaN propagates through both) show there are none: two passes where ``nan_to_num`` makes
    several, and it runs only where they find some."""
    if data.size and np.isfinite(np.min(data)) and np.isfinite(np.max(data)):
        return
    np.nan_to_num(data, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


#: The white level of 16-bit data: of a 16-bit file, and of data in 32-bit files (integer or
#: floating point) that does not exceed it.
SIXTEEN_BIT_WHITE = 65535.0


def _white_level(header: fits.Header, data: np.ndarray) -> float:
    """Saturation value in physical units, from the header as stored (before scaling); for
    float data, 1 for data in [0, 1] (a few pixels beyond it allowed), 65535 for data in ADU
    up to it, and the brightest pixel beyond."""
    bitpix = int(header.get("BITPIX", -32))
    if bitpix > 0:
        top = 255 if bitpix == 8 else 2 ** (bitpix - 1) - 1
        white = float(top) * float(header.get("BSCALE", 1.0)) + float(header.get("BZERO", 0.0))
        if white > SIXTEEN_BIT_WHITE and data.size and float(np.max(data)) <= SIXTEEN_BIT_WHITE:
            # A 16-bit camera's counts in a 32- or 64-bit integer file: the camera's white, as
            # the same counts in a 16-bit file have it (the linear range, the truncation and
            # NSG's [0, 1] rules are read against it).
            return SIXTEEN_BIT_WHITE
        return white
    finite_max = float(np.max(data)) if data.size else 0.0
    if finite_max <= 1.0 or _normalized_with_overshoot(data):
        return 1.0
    if finite_max <= SIXTEEN_BIT_WHITE:
        return SIXTEEN_BIT_WHITE
    return finite_max


#: Float data whose pixels holding data are at or under 1 but for this share are data in
#: [0, 1]: a flat-divided saturated core or a calibration's overshoot beyond 1 leaves them
#: so, where data in ADU holds its sky's noise (a few ADU at least) above 1 in half its pixels.
OVERSHOOT_SHARE = 0.01


def _normalized_with_overshoot(data: np.ndarray) -> bool:
    """Whether float data with pixels beyond 1 is all the same data in [0, 1], read on every
    8th row and column."""
    sample = data[..., ::8, ::8]
    covered = sample[sample != 0]
    return bool(covered.size) and float(np.mean(covered > 1.0)) <= OVERSHOOT_SHARE


def _check_file(path: Path) -> None:
    """Raise :class:`FrameReadError` unless ``path`` is a file that can be opened."""
    if path.is_dir():
        if not any(p.is_file() and p.name.lower().endswith(FRAME_SUFFIXES) for p in path.iterdir()):
            raise FrameReadError(path, "is a directory holding no FITS or XISF frame")
        raise FrameReadError(path, "is a directory, not a frame")
    if not path.is_file():
        raise FrameReadError(path, "no such file")


def _fits_reason(path: Path, error: Exception) -> str:
    """Why a file cannot be read as FITS, in our words (astropy's hints are for its API)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(80)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if start[:2] == b"\x1f\x8b" and not path.name.endswith(".gz"):
        return "is gzip-compressed but not named .gz"
    if not start.startswith(b"SIMPLE") and start[:2] != b"\x1f\x8b":
        return "is not a FITS file (it does not start with a FITS header)" if start else "is empty"
    return f"cannot be read as FITS: truncated or corrupt ({type(error).__name__})"


def expand_frames(paths) -> list[Path]:
    """The frames that ``paths`` name: a directory stands for its FITS and XISF files (sorted
    by name, not recursive; one without any is kept, to fail as one); anything else is kept as
    given, to be read or to fail alone."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(FRAME_SUFFIXES))
            out.extend(found or [path])  # a directory without frames fails alone, named
        else:
            out.append(path)
    return out


def is_stack_master(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a FITS master or map written by nsg stack (its :data:`MASTER_CARD`);
    False for anything that cannot be read as FITS (its reading says why)."""
    path = Path(path)
    if not path.is_file() or _is_xisf(path):
        return False
    try:
        with quiet_warnings(AstropyUserWarning):
            return MASTER_CARD in fits.getheader(path)
    except Exception:
        return False


def read_meta(path: str | os.PathLike) -> FrameMeta:
    """Read only the header facts of a frame (no pixel data)."""
    path = Path(path)
    _check_file(path)
    if _is_xisf(path):
        _, header, _, properties = _read_xisf(path, pixels=False)
        return xisf_meta(header, properties)
    try:
        with (
            quiet_warnings(AstropyUserWarning),  # the reading says what is wrong
            open(path, "rb") as handle,
            fits.open(handle, memmap=False) as hdul,
        ):
            return meta_from_header(_image_header(hdul, _first_image_hdu(hdul, path)))
    except FrameReadError:
        raise
    except Exception as exc:
        raise FrameReadError(path, _fits_reason(path, exc)) from exc


def read_frame(path: str | os.PathLike) -> Frame:
    """Read a registered light frame.

    Parameters
    ----------
    path : str or path-like
        A FITS file (``.fits``, ``.fit``, ``.fts``, tile-compressed ``.fz``, or gzipped), or
        an XISF file (``.xisf``, mono or RGB, planar or normal pixel storage).

    Returns
    -------
    Frame
        Data as ``(channels, height, width)`` float32 with non-finite pixels set to 0.

    Raises
    ------
    FrameReadError
        Missing, unreadable or corrupt file, or no image in it.

    FrameShapeError
        Not a 2-D mono or 3-plane colour image.
    """
    path = Path(path)
    _check_file(path)
    if _is_xisf(path):
        data, header, white_level, properties = _read_xisf(path)
        return Frame(path, data, header, white_level, xisf_meta(header, properties), properties)
    try:
        with quiet_warnings(AstropyUserWarning):
            # The file object is ours to close: astropy leaves its own handle open when a
            # damaged file makes it fail half-way.
            with open(path, "rb") as handle, fits.open(handle, memmap=False) as hdul:
                hdu = _first_image_hdu(hdul, path)
                # Copy the header before touching the data: astropy rewrites BITPIX/BZERO
                # when it scales integer data, and they tell the white level.
                header = _image_header(hdul, hdu)
                data = np.asarray(hdu.data)
    except (FrameReadError, FrameShapeError):
        raise
    except Exception as exc:
        raise FrameReadError(path, _fits_reason(path, exc)) from exc
    if data.ndim == 2:
        data = data[np.newaxis]
    elif data.ndim != 3 or data.shape[0] not in (1, 3):
        raise FrameShapeError(path, shape_problem(tuple(data.shape)))
    data = np.array(data, dtype=np.float32)  # a copy: the input file's buffer is never touched
    _zero_non_finite(data)
    meta = meta_from_header(header)
    return Frame(path=path, data=data, header=header, white_level=_white_level(header, data), meta=meta)


# -- XISF ---------------------------------------------------------------------------------------
#: White level of XISF's integer sample formats (PixInsight maps them to [0, 1] by these).
_XISF_INTEGER_WHITE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.uint32): 4294967295.0}


_FITS_INTEGER = re.compile(r"^[+-]?\d+$")
_FITS_REAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([EeDd][+-]?\d+)?$")


def _keyword_value(text: str):
    """A FITS keyword value as XISF stores it (text, quotes already removed) back to a type."""
    text = text.strip()
    if text in ("T", "F"):
        return text == "T"
    if _FITS_INTEGER.match(text):
        return int(text)
    if _FITS_REAL.match(text):
        return float(text.replace("D", "E").replace("d", "e"))
    return text


def _header_from_keywords(keywords: dict) -> fits.Header:
    header = fits.Header()
    # Long or odd names become HIERARCH cards or are skipped: a third-party header's quirk.
    with quiet_warnings():
        for name, entries in keywords.items():
            if STRUCTURAL_CARDS.match(name):
                continue
            for entry in entries:
                value, comment = entry.get("value", ""), entry.get("comment", "")
                try:
                    if name in ("HISTORY", "COMMENT"):
                        header.append((name, (value + " " + comment).strip()), end=True)
                    else:
                        header.append((name, _keyword_value(value), comment), end=True)
                except (ValueError, KeyError):
                    continue
    return header


def _keywords_from_header(header: fits.Header) -> dict:
    keywords: dict[str, list] = {}
    for card in header.cards:
        name = card.keyword
        if not name or STRUCTURAL_CARDS.match(name):
            continue
        value = card.value
        if name in ("HISTORY", "COMMENT"):
            entry = {"value": "", "comment": str(value)}
        else:
            if isinstance(value, bool):
                text = "T" if value else "F"
            elif isinstance(value, str):
                text = "'" + value.replace("'", "''") + "'"
            elif isinstance(value, float):
                text = repr(value).upper()
            elif value is None or isinstance(value, fits.card.Undefined):
                text = ""
            else:
                text = str(value)
            entry = {"value": text, "comment": card.comment or ""}
        keywords.setdefault(name, []).append(entry)
    return keywords


def _xisf_module():
    try:
        import xisf
    except ImportError as exc:  # a core dependency; only a broken install lacks it
        raise NSGError("XISF files need the 'xisf' package: pip install xisf") from exc
    return xisf


def _read_xisf(path: Path, *, pixels: bool = True):
    """``(data, header, white_level, properties)`` of an XISF file; ``data`` None without pixels."""
    xisf = _xisf_module()
    try:
        # The package prints notes about property types it skips; they are not ours to show.
        with contextlib.redirect_stdout(_io.StringIO()):
            document = xisf.XISF(str(path))
            images = document.get_images_metadata()
            if not images:
                raise FrameReadError(path, "holds no image")
            meta = images[0]
            geometry = tuple(meta["geometry"])
            if len(geometry) != 3 or geometry[2] not in (1, 3):
                raise FrameShapeError(
                    path,
                    f"has XISF geometry {':'.join(map(str, geometry))}; frames must be 2-D mono or colour with 3 channels",
                )
            width, height, channels = geometry
            header = _header_from_keywords(meta.get("FITSKeywords", {}))
            properties = dict(meta.get("XISFProperties", {}))
            if not pixels:
                return None, header, None, properties
            data = document.read_image(0, data_format="channels_first")
            if meta.get("pixelStorage", "Planar").lower() == "normal":
                # Interleaved samples: the package reshapes as planar; undo that.
                data = data.reshape(-1).reshape(height, width, channels).transpose(2, 0, 1)
            if meta.get("byteOrder", "little").lower() == "big" and data.dtype.itemsize > 1:
                data = data.byteswap()
            stored = data.dtype
            data = np.array(data, dtype=np.float32)  # a copy in our own buffer
    except (FrameReadError, FrameShapeError):
        raise
    except Exception as exc:
        raise FrameReadError(
            path, f"cannot be read as XISF: not an XISF file, or truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    _zero_non_finite(data)
    if stored in _XISF_INTEGER_WHITE:
        white = _XISF_INTEGER_WHITE[stored]
    else:
        white = _white_level(fits.Header([("BITPIX", -32)]), data)
    return data, header, white, properties


def _xisf_properties_for_writing(properties: dict | None) -> dict:
    out = {}
    for key, prop in (properties or {}).items():
        if not isinstance(prop, dict) or "id" not in prop or "type" not in prop:
            continue
        prop = {k: prop[k] for k in ("id", "type", "value") if k in prop}
        if prop["type"] == "Boolean":
            # The package writes str(value); XISF spells booleans in lower case.
            prop["value"] = "true" if prop.get("value") else "false"
        out[key] = prop
    return out


def _write_xisf(name: str, data: np.ndarray, header: fits.Header, properties: dict | None) -> None:
    xisf = _xisf_module()
    image_metadata = {
        "FITSKeywords": _keywords_from_header(header),
        "XISFProperties": _xisf_properties_for_writing(properties),
    }
    with contextlib.redirect_stdout(_io.StringIO()):
        xisf.XISF.write(
            name, np.ascontiguousarray(data.transpose(1, 2, 0)), creator_app="nsg-gpu", image_metadata=image_metadata
        )
    _set_creation_time(name, header)


def _set_creation_time(name: str, header: fits.Header) -> None:
    """Write the frame's capture time (``DATE-OBS``; 1970-01-01 without one) over the
    ``XISF:CreationTime`` the xisf package stamps with the clock, in place (the same length),
    so that the same inputs give the same bytes."""
    tag = b'<Property id="XISF:CreationTime" type="String">'
    with open(name, "r+b") as handle:
        head = handle.read(16)
        if head[:8] != b"XISF0100":
            return
        xml = handle.read(int.from_bytes(head[8:12], "little"))
        at = xml.find(tag)
        if at < 0:
            return
        start = at + len(tag)
        old = xml[start : xml.find(b"</Property>", start)]
        try:
            when = datetime.datetime.fromisoformat(str(header.get("DATE-OBS", ""))).replace(tzinfo=None)
        except ValueError:
            when = datetime.datetime(1970, 1, 1)
        new = when.isoformat(timespec="microseconds" if len(old) == 26 else "seconds").encode()
        if len(new) == len(old):
            handle.seek(16 + start)
            handle.write(new)


def read_output_header(path: str | os.PathLike) -> fits.Header:
    """The header of a complete output file (FITS or XISF), read without its pixels.

    Raises
    ------
    FrameReadError
        The file is missing, unreadable, or shorter than its header says (truncated).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FrameReadError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if _is_xisf(path):
        _, header, _, _ = _read_xisf(path, pixels=False)
        xisf = _xisf_module()
        with contextlib.redirect_stdout(_io.StringIO()):
            location = xisf.XISF(str(path)).get_images_metadata()[0]["location"]
        if location[0] == "attachment" and location[1] + location[2] > size:
            raise FrameReadError(path, f"is truncated: its image ends at byte {location[1] + location[2]} of {size}")
        return header
    try:
        with quiet_warnings(AstropyUserWarning):
            with open(path, "rb") as handle, fits.open(handle, memmap=False, lazy_load_hdus=True) as hdul:
                header = hdul[0].header.copy()
                info = hdul.fileinfo(0)
    except Exception as exc:
        raise FrameReadError(path, _fits_reason(path, exc)) from exc
    if info["datLoc"] + info["datSpan"] > size:
        raise FrameReadError(path, f"is truncated: its data end at byte {info['datLoc'] + info['datSpan']} of {size}")
    return header


def _clean_header(header: fits.Header) -> fits.Header:
    out = fits.Header()
    for card in header.cards:
        if STRUCTURAL_CARDS.match(card.keyword or ""):
            continue
        out.append(card, end=True)
    return out


def write_frame(
    path: str | os.PathLike, data: np.ndarray, header: fits.Header, *, properties: dict | None = None
) -> Path:
    """Write ``(channels, height, width)`` float32 data atomically to ``path``
    (:func:`atomic_write`).

    A ``.xisf`` path is written as XISF (planar channels, the header as FITS keywords,
    ``properties`` as XISF properties); anything else as FITS.

    Raises
    ------
    OutputError
        The directory is not writable or the disk is full; no partial file is left.
    """
    path = Path(path)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[np.newaxis]
    if _is_xisf(path):
        return atomic_write(path, lambda _, name: _write_xisf(name, data, header, properties))
    hdu = fits.PrimaryHDU(data=data[0] if data.shape[0] == 1 else data, header=_clean_header(header))
    return atomic_write(path, lambda handle, _: hdu.writeto(handle, output_verify="silentfix"))
