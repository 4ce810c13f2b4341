"""NSG's header cards: the one place that writes them into an output's header and reads them back.

NSG's own cards are ``NSGREF``, ``NSGS0..2`` (transmission ``1/m`` per channel), ``NSGSNR0..2``,
the weight (``NWEIGHT`` unless configured), ``NSGHIGH`` and ``HISTORY NSG.*``; nsg-gpu adds
``NSGSERR0..2`` (the standard error of ``NSGSn``), ``NSGPAIRS``, ``NSGSAMPL``, ``NSGFWHM``, ``NSGPHOT`` (what
measured the star fluxes: ``psf``, ``aperture-fitted`` or ``aperture``), ``NSGBETA``, ``NSGELLIP`` and ``NSGEANG`` (the fitted PSF's
``1 - b/a`` and major axis, where its stars are drawn out) and ``NSGHASH`` (the fingerprint a rerun
uses to keep an output, :mod:`nsg_gpu.resume`). The jobs write them (:mod:`nsg_gpu.jobs`); a
resumed run reads them back into its results (:func:`read_nsg_cards`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from astropy.io import fits

__all__ = [
    "REFERENCE",
    "TRANSMISSION",
    "TRANSMISSION_ERROR",
    "SNR",
    "HIGH",
    "PAIRS",
    "SAMPLES",
    "FWHM",
    "PHOTOMETRY",
    "BETA",
    "ELLIPTICITY",
    "ELONGATION_ANGLE",
    "FINGERPRINT",
    "NOISE",
    "HISTORY_PREFIX",
    "add_nsg_history",
    "NSGCards",
    "card_name",
    "header_text",
    "set_nsg_keywords",
    "read_nsg_cards",
]

REFERENCE = "NSGREF"
#: Prefixes of the per-channel cards; the channel index follows (``NSGS0``).
TRANSMISSION = "NSGS"
#: One-sigma standard error of ``NSGSn`` from the scale fit (nsg-gpu's, beyond NSG).
TRANSMISSION_ERROR = "NSGSERR"
SNR = "NSGSNR"
HIGH = "NSGHIGH"
PAIRS = "NSGPAIRS"
SAMPLES = "NSGSAMPL"
FWHM = "NSGFWHM"
PHOTOMETRY = "NSGPHOT"
BETA = "NSGBETA"
ELLIPTICITY = "NSGELLIP"
ELONGATION_ANGLE = "NSGEANG"
FINGERPRINT = "NSGHASH"
#: Per-channel noise the weight was computed from, so that a resumed run's results say what
#: the first run's said. (No time is written: the same inputs give the same bytes.)
NOISE = "NSGNOIS"
HISTORY_PREFIX = "NSG."
#: A FITS card value holds at most 68 characters of a string; longer names keep their end.
_MAX_NAME = 68


@dataclass
class NSGCards:
    """What an output's NSG cards say about the frame."""

    reference_name: str
    transmission: list[float]
    snr: list[float]
    weight: float | None
    weight_source: str = ""
    high: float | None = None
    star_pairs: int | None = None
    samples: int | None = None
    fwhm: float | None = None
    photometry: str | None = None
    beta: float | None = None
    ellipticity: float | None = None
    elongation_angle: float | None = None
    fingerprint: str | None = None
    noise: list[float] = field(default_factory=list)
    transmission_error: list[float | None] = field(default_factory=list)
    history: list[str] = field(default_factory=list)


def header_text(text: str) -> str:
    """``text`` as a FITS card can hold it: printable ASCII as it is, any other character as
    Python's escape (``réf.fits`` -> ``r\\xe9f.fits``)."""
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in text)


def card_name(name: str) -> str:
    """A file name as the ``NSGREF`` card stores it (:func:`header_text`, its last characters)."""
    return header_text(name)[-_MAX_NAME:]


def _comment_room(value: str, comment: str) -> str:
    """``comment``, shortened to what an 80-character card has left after a string value
    (astropy would truncate it with a warning on every write)."""
    # "KEYWORD = 'value' / comment": the value's quotes doubled inside, padded to 8 characters.
    used = 10 + max(len(value.replace("'", "''")) + 2, 20) + 3
    return comment[: max(0, 80 - used)]


def set_nsg_keywords(header: fits.Header, cards: NSGCards, *, weight_keyword: str = "NWEIGHT") -> fits.Header:
    """Return a copy of ``header`` carrying ``cards`` (earlier NSG cards and history replaced).

    ``NSGS0`` and ``NSGSNR0`` alone are written for mono; existing cards other than NSG's,
    and the WCS, are kept.
    """
    header = header.copy()
    for key in list(dict.fromkeys(header.keys())):
        if key.startswith("NSG") or key == weight_keyword:
            del header[key]
    if "HISTORY" in header:
        kept = [h for h in header["HISTORY"] if not str(h).startswith(HISTORY_PREFIX)]
        del header["HISTORY"]
        for h in kept:
            header.add_history(str(h))
    name = card_name(cards.reference_name)
    header[REFERENCE] = (name, _comment_room(name, "NSG reference frame"))
    for c, value in enumerate(cards.transmission):
        _set_float(header, f"{TRANSMISSION}{c}", value, "NSG transmission (1/scale)")
    for c, value in enumerate(cards.transmission_error):
        if value is not None and math.isfinite(value):
            _set_float(header, f"{TRANSMISSION_ERROR}{c}", value, "NSG standard error of NSGS")
    for c, value in enumerate(cards.snr):
        _set_float(header, f"{SNR}{c}", value, "NSG signal-to-noise ratio vs reference")
    comment = f"NSG weight ({cards.weight_source})" if cards.weight_source else "NSG weight"
    _set_float(header, weight_keyword, cards.weight, comment[:47])
    if cards.high is not None:
        _set_float(header, HIGH, cards.high, "NSG max value before truncation")
    if cards.star_pairs is not None:
        # The reference has no pairs: its card counts the stars it measured, that the targets pair with.
        comment = (
            "NSG reference stars measured" if cards.weight_source == "reference" else "NSG star pairs in the scale fit"
        )
        header[PAIRS] = (int(cards.star_pairs), comment)
    if cards.samples is not None:
        header[SAMPLES] = (int(cards.samples), "NSG background samples of the gradient")
    if cards.fwhm is not None:
        _set_float(header, FWHM, cards.fwhm, "[px] NSG FWHM of the frame")
    if cards.photometry is not None:
        header[PHOTOMETRY] = (cards.photometry, "NSG what measured the star fluxes")
    if cards.beta is not None:
        _set_float(header, BETA, cards.beta, "NSG Moffat index of the fitted PSF")
    if cards.ellipticity is not None:
        _set_float(header, ELLIPTICITY, cards.ellipticity, "NSG 1 - b/a of the fitted PSF")
    if cards.elongation_angle is not None:
        _set_float(header, ELONGATION_ANGLE, cards.elongation_angle, "[deg] NSG PSF major axis from x")
    for c, value in enumerate(cards.noise):
        _set_float(header, f"{NOISE}{c}", value, "NSG noise of the weight")
    if cards.fingerprint is not None:
        header[FINGERPRINT] = (cards.fingerprint, "NSG run fingerprint (for resume)")
    for line in cards.history:
        add_nsg_history(header, f"{HISTORY_PREFIX}{line}")
    return header


#: Characters of text a HISTORY card holds.
HISTORY_ROOM = 72


def add_nsg_history(header: fits.Header, line: str) -> None:
    """Add the NSG history ``line`` (``NSG.<key>: <value>``) to ``header``, as
    :func:`header_text` has it, in cards that each start with ``NSG.``.

    A line longer than a card was split by astropy into cards whose continuations lacked the
    prefix: an output normalized again kept them as someone else's history (one more each
    time), and a master copied them. Here the line goes on over cards ``NSG.<key> (cont.):
    <more>``."""
    text = header_text(line)
    if len(text) <= HISTORY_ROOM:
        header.add_history(text)
        return
    key, separator, _ = text.partition(": ")
    following = f"{key} (cont.): " if separator and len(key) <= HISTORY_ROOM // 2 else f"{HISTORY_PREFIX}(cont.): "
    lead, value = "", text
    while value:
        room = HISTORY_ROOM - len(lead)
        piece, value = value[:room], value[room:]
        kept = piece.rstrip()
        if value and kept and kept != piece:  # a card's trailing blanks are not kept: they go on
            piece, value = kept, piece[len(kept) :] + value
        header.add_history(lead + piece)
        lead = following


def _set_float(header: fits.Header, key: str, value: float, comment: str) -> None:
    """Set the card ``key`` to ``value`` to its last bit: Python's shortest round-trip digits
    (up to 17 significant; astropy writes 16, which a double does not always come back from),
    with an upper-case exponent as FITS has it. Not a number or infinite: as astropy has it
    (it refuses them)."""
    value = float(value)
    if not math.isfinite(value):
        header[key] = (value, comment)
        return
    text = repr(value).upper()
    image = f"{key:<8}= {text:>20} / {comment}"
    header.append(fits.Card.fromstring(image[:80]), useblanks=True, bottom=False)  # NSG's cards were removed


def _channel_values(header: fits.Header, prefix: str) -> list[float]:
    values = []
    for c in range(3):
        value = header.get(f"{prefix}{c}")
        if value is None:
            break
        values.append(float(value))
    return values


def read_nsg_cards(header: fits.Header, *, weight_keyword: str = "NWEIGHT") -> NSGCards:
    """The NSG cards of an output's header, as :func:`set_nsg_keywords` wrote them."""

    def optional(key, kind):
        value = header.get(key)
        return kind(value) if value is not None else None

    weight = header.get(weight_keyword)
    source = re.search(r"\((.+)\)", header.comments[weight_keyword]) if weight_keyword in header else None
    history = [str(h)[len(HISTORY_PREFIX) :] for h in header.get("HISTORY", []) if str(h).startswith(HISTORY_PREFIX)]
    transmission = _channel_values(header, TRANSMISSION)
    return NSGCards(
        reference_name=str(header.get(REFERENCE, "")),
        transmission=transmission,
        snr=_channel_values(header, SNR),
        weight=float(weight) if weight is not None else None,
        weight_source=source.group(1) if source else "",
        high=optional(HIGH, float),
        star_pairs=optional(PAIRS, int),
        samples=optional(SAMPLES, int),
        fwhm=optional(FWHM, float),
        photometry=optional(PHOTOMETRY, str),
        beta=optional(BETA, float),
        ellipticity=optional(ELLIPTICITY, float),
        elongation_angle=optional(ELONGATION_ANGLE, float),
        fingerprint=optional(FINGERPRINT, str),
        noise=_channel_values(header, NOISE),
        # By position, None where a fit gave no error (its card is not written): a later
        # channel's error stays that channel's.
        transmission_error=[optional(f"{TRANSMISSION_ERROR}{c}", float) for c in range(len(transmission))],
        history=history,
    )
