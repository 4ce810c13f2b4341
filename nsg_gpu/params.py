"""All parameters of a run, with NormalizeScaleGradient's defaults and "Auto" rules.

A field set to ``None`` is "Auto": :func:`resolve_parameters` derives it from the reference
frame (pixel scale from XPIXSZ and FOCALLEN, image size, brightest star, brightest pixel) by the
formulas of NSG 3.0.x (``reference/nsg-algorithm.md`` section 8). NSG writes them for data in
[0, 1]; here pixel values and fluxes in them are taken relative to the frame's white level, so
the same frames in [0, 1] or in ADU resolve to the same circles, cuts and sample counts.
Parameters in pixel-value or flux units (``linear_range``, ``sample_star_growth_rate``) are in
the data's own units; a ``linear_range`` of 1 or less on frames whose white level is above 1
(NSG's [0, 1] value copied onto frames in ADU), and a growth rate that would grow the
brightest star's circle beyond the frame, are refused with the value to give. Every field is
a command-line option of ``nsg normalize``; the resolved values are written to the output
headers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .errors import ParameterError

__all__ = [
    "DEFAULT_FOCAL_LENGTH_MM",
    "DEFAULT_PIXEL_SIZE_UM",
    "Parameters",
    "degrees_per_pixel",
    "resolve_parameters",
    "auto_sample_size",
    "REJECTION_FIELDS",
    "ParameterError",
]

#: NSG's assumptions when the header has no FOCALLEN / XPIXSZ.
DEFAULT_FOCAL_LENGTH_MM = 1000.0
DEFAULT_PIXEL_SIZE_UM = 6.0
#: Fraction of the reference's brightest pixel above which a star is treated as non-linear.
LINEAR_RANGE = 0.7
#: NSG's largest Auto growth of the rejection circles: px per unit of star flux in [0, 1] data.
SAMPLE_STAR_GROWTH_CAP = 0.25


def _option(default, help: str, *, auto: str | None = None, choices: tuple | None = None, flag: str | None = None):
    """A parameter with what its command-line option says: help, the Auto rule when its
    default is None, its choices, and its flag where the flag is not ``--<name>``."""
    return field(default=default, metadata={"help": help, "auto": auto, "choices": choices, "flag": flag})


#: Fields that decide which frames are rejected after the run, not how a frame is normalized:
#: changing them never makes an output stale.
REJECTION_FIELDS = ("min_weight", "min_transmission", "max_scale_error")


#: Keywords a weight cannot be written under: NSG's own cards, the frames' noise cards that
#: NSG reads, and the cards of FITS's structure or commentary.
RESERVED_KEYWORDS = re.compile(
    r"NSG.*|NOISEA?\d\d|SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|CHECKSUM|"
    r"DATASUM|HISTORY|COMMENT|END|EXPTIME|EXPOSURE"
)


@dataclass(frozen=True)
class Parameters:
    """Parameters of the normalization. ``None`` means Auto.

    Photometry
    ----------
    detection_sigma : float
        Star detection threshold of the matched-filter image, in units of its noise.
    linear_range : float or None
        Stars whose peak reaches this value (reference or target, in the data's units) are
        not measured. Auto: 0.7 x the reference's maximum pixel, rounded to a thousandth of
        the white level.
    star_search_radius : float
        How far (px) a star may move between reference and target after recentring;
        stars that move further are not paired (NSG default 2).
    star_flux_tolerance : float
        Pairs whose flux ratio differs from the first estimate by more than this factor
        are dropped before the outlier removal (NSG default 1.5).
    outlier_removal : float
        Percentage of the star pairs removed, one at a time, as the farthest from the
        fitted line (NSG default 2).
    photometry : str
        ``psf``: every pixel within the aperture counts with the broader frame's fitted Moffat
        PSF as its weight, and the share of the light each frame's weights keep is corrected
        from the two fitted PSFs (about three times less noise than a plain aperture).
        ``aperture``: NSG's plain aperture sum, corrected for the light beyond it with the two
        fitted PSFs where the stars are 2 px and more, else (and where no PSF can be fitted)
        with a Moffat of index 3 at each frame's FWHM. ``psf`` falls back to ``aperture`` for
        a frame whose PSF cannot be fitted (fewer than 8 bright isolated stars), whose stars
        are twice as broad as the reference's or more (or half as broad or less), or whose
        colour stars are undersampled (FWHM below 2 px; undersampled mono stars take
        whichever of the two states the smaller uncertainty).
    aperture_fwhm : float
        Photometry aperture radius in units of the larger of the two frames' FWHM (NSG uses
        1.5; 3 keeps nearly all of a star's light in both frames, whatever the seeing).
    aperture_add : float
        Pixels added to the aperture radius and to the sample rejection circles (NSG 1).
    aperture_gap : float or None
        Gap (px) between aperture and background annulus. Auto: 0.0005 deg, at least 1 px.
    aperture_bg_delta : float or None
        Least width (px) of the background annulus, which is at least as wide as the aperture
        radius. Auto: 0.002 deg, at least 5 px.
    min_star_pairs : int
        Fewer usable star pairs than this is an error for that frame, never a silent scale 1.
        A scale from fewer than three is written and flagged, as NSG flags it
        (:data:`nsg_gpu.scalefit.FEW_STAR_PAIRS`).

    Gradient
    --------
    sample_size : int or None
        Side (px) of the square background samples. Auto: NSG's rule (100 um on the sensor,
        about 27 arcsec, and about 2000 samples over the image).
    limit_sample_stars_percent : float or None
        Share of the reference's stars, brightest first, whose circles reject samples.
        Auto: as many stars as a tenth of the number of samples.
    sample_star_growth_rate : float or None
        Growth of the rejection circle radius (px) per unit of star flux, flux in the data's
        units. Auto: the brightest star's circle grows by about 135 arcsec, and by at most
        0.25 px per unit of flux relative to the white level (NSG's cap, 0.25 in [0, 1]
        data, is 0.25 / 65535 in 16-bit ADU).
    gradient_smoothness : float
        log10 of the thin-plate spline smoothing; 4 or more fits a plane (NSG default -2).
    max_samples : int
        Samples are binned into super-samples above this count (NSG default 2000).

    Output
    ------
    weight_keyword : str
        Header keyword for the weight (NSG default NWEIGHT).
    truncate : bool
        Clip the output to [0, white level] as NSG does (from the reference's least value
        where it holds negative data: a sky about 0); off keeps the full float range.

    Rejection
    ---------
    min_weight : float
        A frame whose weight, relative to the best frame's (per unit exposure when every
        frame has an exposure time; the best of the frames whose mean transmission is not in
        doubt), is at or below this is rejected (NSG default 0.25).
    min_transmission : float
        A frame whose transmission, relative to the best frame's (per unit exposure when
        every frame has an exposure time; the best of the frames whose mean transmission is
        not in doubt), is at or below this is rejected (NSG default 0.75).
    max_scale_error : float or None
        A frame whose transmission has a relative standard error above this in any channel,
        whose channels disagree beyond their errors, or whose scale comes from fewer than 3
        star pairs, is rejected (beyond NSG; None, the default, rejects none: such frames are
        only flagged).
    """

    detection_sigma: float = _option(5.0, "Star detection threshold, in noise units of the matched-filter image.")
    linear_range: float | None = _option(
        None,
        "Stars peaking at or above this (in data units) are not measured.",
        auto="0.7 x the reference's maximum",
    )
    star_search_radius: float = _option(2.0, "Largest star shift (px) between reference and target after recentring.")
    star_flux_tolerance: float = _option(
        1.5, "Star pairs whose flux ratio is off the first estimate by more than this factor are dropped."
    )
    outlier_removal: float = _option(2.0, "Percentage of star pairs removed as the farthest from the fitted line.")
    photometry: str = _option(
        "psf",
        "psf: pixels weighted by the fitted Moffat PSF, corrected for both frames' PSFs; "
        "aperture: NSG's plain aperture sum, corrected for the light beyond it by the fitted PSFs "
        "(an assumed Moffat on stars under 2 px or where no PSF can be fitted).",
        choices=("psf", "aperture"),
    )
    aperture_fwhm: float = _option(3.0, "Photometry aperture radius in units of the larger FWHM of the two frames.")
    aperture_add: float = _option(1.0, "Pixels added to the aperture radius and to the sample rejection circles.")
    aperture_gap: float | None = _option(
        None, "Gap (px) between aperture and background annulus.", auto="0.0005 deg, at least 1 px"
    )
    aperture_bg_delta: float | None = _option(
        None, "Least width (px) of the background annulus.", auto="0.002 deg, at least 5 px"
    )
    min_star_pairs: int = _option(
        2, "Fewer usable star pairs than this fails the frame; fewer than 3 is flagged (as NSG flags it)."
    )
    sample_size: int | None = _option(
        None, "Side (px) of the background samples.", auto="NSG's rule from the pixel size and image size"
    )
    limit_sample_stars_percent: float | None = _option(
        None,
        "Share (%) of reference stars, brightest first, that reject samples.",
        auto="as many stars as a tenth of the samples",
    )
    sample_star_growth_rate: float | None = _option(
        None,
        "Growth (px) of the rejection circles per unit of star flux, in the data's units.",
        auto="the brightest star's circle grows by about 135 arcsec",
    )
    reject_circles: str | None = _option(
        None,
        "Manual sample-rejection circles, 'x,y[,r]' (px, from the image's top-left pixel; r 20 by "
        "default, at most 800), several separated by ';': background samples there are left out "
        "(a galaxy, a nebula's core), as around stars.",
    )
    photometry_region: str | None = _option(
        None,
        "Region 'x0,y0,x1,y1' (px, from the image's top-left pixel) whose reference stars alone give "
        "the scale (NSG's photometry ROI: a frame clouded elsewhere scaled from its object's region).",
    )
    gradient_smoothness: float = _option(-2.0, "log10 of the spline smoothing, -8 to 4 (NSG: -4 to 4); 4 fits a plane.")
    max_samples: int = _option(
        2000, "Samples are merged into super-samples above this count (falling to 500 at smoothness 4, as NSG)."
    )
    weight_keyword: str = _option("NWEIGHT", "Header keyword for the weight.")
    truncate: bool = _option(True, "Clip outputs to [0, white level] as NSG does.", flag="--truncate/--no-truncate")
    focal_length_mm: float | None = _option(
        None,
        "Focal length (mm), in place of the reference's FOCALLEN.",
        auto="header, else 1000",
        flag="--focal-length",
    )
    pixel_size_um: float | None = _option(
        None, "Pixel size (um), in place of the reference's XPIXSZ.", auto="header, else 6", flag="--pixel-size"
    )
    min_weight: float = _option(
        0.25,
        "Reject frames whose weight is at or below this fraction of the best frame's "
        "(per unit exposure when every frame states its exposure, EXPOSURE, EXPTIME or ELAPTIME; the best of the frames whose mean "
        "transmission is not in doubt); 0 rejects none.",
    )
    min_transmission: float = _option(
        0.75,
        "Reject frames whose transmission is at or below this fraction of the best frame's "
        "(per unit exposure when every frame states its exposure, EXPOSURE, EXPTIME or ELAPTIME; the best of the frames whose mean "
        "transmission is not in doubt); 0 rejects none.",
    )
    max_scale_error: float | None = _option(
        None,
        "Reject frames whose transmission is less certain than this in any channel (relative standard "
        "error, e.g. 0.03), whose channels' transmissions disagree beyond their errors, or whose scale "
        "comes from fewer than 3 star pairs; unset rejects none (such frames are flagged in the results "
        "either way).",
    )

    def __post_init__(self):
        checks = [
            (self.detection_sigma > 0, "detection_sigma (--detection-sigma) must be positive"),
            (self.star_search_radius > 0, "star_search_radius (--star-search-radius) must be positive"),
            (1.0 < self.star_flux_tolerance <= 10, "star_flux_tolerance (--star-flux-tolerance) must be in (1, 10]"),
            (
                self.max_scale_error is None or self.max_scale_error > 0,
                "max_scale_error (--max-scale-error) must be positive",
            ),
            (0 <= self.outlier_removal <= 50, "outlier_removal (--outlier-removal) must be a percentage in [0, 50]"),
            (self.photometry in ("psf", "aperture"), "photometry (--photometry) must be 'psf' or 'aperture'"),
            (self.aperture_fwhm > 0, "aperture_fwhm (--aperture-fwhm) must be positive"),
            (0 <= self.aperture_add <= 10, "aperture_add (--aperture-add) must be in [0, 10] px"),
            (
                self.aperture_gap is None or 0 <= self.aperture_gap <= 50,
                "aperture_gap (--aperture-gap) must be in [0, 50] px",
            ),
            (
                self.aperture_bg_delta is None or 1 <= self.aperture_bg_delta <= 50,
                "aperture_bg_delta (--aperture-bg-delta) must be in [1, 50] px",
            ),
            (
                self.limit_sample_stars_percent is None or 0 <= self.limit_sample_stars_percent <= 100,
                "limit_sample_stars_percent (--limit-sample-stars-percent) must be a percentage in [0, 100]",
            ),
            (
                self.sample_star_growth_rate is None or self.sample_star_growth_rate >= 0,
                "sample_star_growth_rate (--sample-star-growth-rate) must be at least 0",
            ),
            (
                self.focal_length_mm is None or self.focal_length_mm > 0,
                "focal_length_mm (--focal-length) must be positive (mm)",
            ),
            (
                self.pixel_size_um is None or self.pixel_size_um > 0,
                "pixel_size_um (--pixel-size) must be positive (um)",
            ),
            (self.min_star_pairs >= 2, "min_star_pairs (--min-star-pairs) must be at least 2"),
            (
                self.sample_size is None or 2 <= self.sample_size <= 1000,
                "sample_size (--sample-size) must be in [2, 1000]",
            ),
            (
                -8 <= self.gradient_smoothness <= 4,
                "gradient_smoothness (--gradient-smoothness) must be in [-8, 4] (4: a plane, as in NSG)",
            ),
            (self.max_samples >= 10, "max_samples (--max-samples) must be at least 10"),
            (
                re.fullmatch(r"[A-Za-z0-9_-]{1,8}", self.weight_keyword) is not None,
                "weight_keyword (--weight-keyword) must be a FITS keyword: 1-8 letters, digits, - or _",
            ),
            (
                RESERVED_KEYWORDS.fullmatch(self.weight_keyword.upper()) is None,
                f"weight_keyword (--weight-keyword) {self.weight_keyword!r} is a card that nsg-gpu or FITS "
                "writes for another purpose: choose another name (NWEIGHT by default)",
            ),
            (
                0 <= self.min_weight <= 1,
                "min_weight (--min-weight) must be in [0, 1] (a fraction of the best frame's weight)",
            ),
            (
                0 <= self.min_transmission <= 1,
                "min_transmission (--min-transmission) must be in [0, 1] (a fraction of the best frame's transmission)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ParameterError(message)
        # FITS keywords are upper case (astropy writes them so): one spelling, so that the
        # card an input already carries is the one replaced.
        object.__setattr__(self, "weight_keyword", self.weight_keyword.upper())
        self.circles()
        self.region()

    def circles(self) -> list[tuple[float, float, float]]:
        """The manual rejection circles ``(x, y, r)`` of ``reject_circles``.

        Raises
        ------
        ParameterError
            Not 'x,y[,r]' items separated by ';', or a radius not in (0, 800].
        """
        out = []
        for item in (self.reject_circles or "").split(";"):
            if not item.strip():
                continue
            values = _numbers(item)
            if len(values) not in (2, 3):
                raise ParameterError(f"reject_circles (--reject-circles): {item.strip()!r} is not 'x,y' or 'x,y,r'")
            x, y, r = (*values, DEFAULT_CIRCLE_RADIUS) if len(values) == 2 else values
            if not 0 < r <= MAX_CIRCLE_RADIUS:
                raise ParameterError(
                    f"reject_circles (--reject-circles): radius {r:g} of {item.strip()!r} must be in (0, {MAX_CIRCLE_RADIUS:g}] px"
                )
            out.append((x, y, r))
        return out

    def region(self) -> tuple[float, float, float, float] | None:
        """``photometry_region`` as ``(x0, y0, x1, y1)`` with ``x0 < x1`` and ``y0 < y1``, or None.

        Raises
        ------
        ParameterError
            Not four numbers 'x0,y0,x1,y1' of a region of some area.
        """
        if self.photometry_region is None:
            return None
        values = _numbers(self.photometry_region)
        if len(values) != 4:
            raise ParameterError(
                f"photometry_region (--photometry-region): {self.photometry_region!r} is not 'x0,y0,x1,y1'"
            )
        x0, y0, x1, y1 = values
        if not (x1 > x0 and y1 > y0):
            raise ParameterError(
                f"photometry_region (--photometry-region): {self.photometry_region!r} has no area (x1 > x0 and y1 > y0)"
            )
        return x0, y0, x1, y1

    def replace(self, **changes) -> Parameters:
        return dataclasses.replace(self, **changes)

    def normalization_items(self) -> list[tuple[str, object]]:
        """``(name, value)`` of every field that shapes an output (all but the rejection ones)."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in REJECTION_FIELDS]

    def history(self) -> list[str]:
        """``name: value`` lines for the HISTORY cards of the outputs; the smoothness under
        NSG's own name (``NSG.gradientSmoothness``), which NSG's readers look for."""
        names = {"gradient_smoothness": "gradientSmoothness"}
        return [f"{names.get(name, name)}: {value}" for name, value in self.normalization_items()]


def _numbers(text: str) -> list[float]:
    """The finite numbers of ``text`` separated by commas, or [] where any is not one."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return []
    return values if all(math.isfinite(v) for v in values) else []


#: NSG's manual rejection circles: the radius where none is given, and the largest (7.3).
DEFAULT_CIRCLE_RADIUS = 20.0
MAX_CIRCLE_RADIUS = 800.0


def degrees_per_pixel(pixel_size_um: float, focal_length_mm: float) -> float:
    """Image scale in degrees per pixel (NSG's ``calcDegreesPerPixel``)."""
    return (pixel_size_um * 1e-6) / (focal_length_mm * 1e-3) * 180.0 / math.pi


def _round_half_up(value: float) -> int:
    # JavaScript's Math.round, which NSG's formulas use.
    return int(math.floor(value + 0.5))


def auto_sample_size(width: int, height: int, pixel_size_um: float, deg_per_px: float) -> int:
    """NSG's Auto sample size: 100 um on the sensor, about 27 arcsec, about 2000 samples."""
    by_scale = max(_round_half_up(100.0 / pixel_size_um), 2, _round_half_up(0.0075 / deg_per_px))
    by_count = int(math.floor(math.sqrt(width * height / 2000.0)))
    return int(min(150, max(by_scale, by_count)))


def resolve_parameters(
    params: Parameters,
    *,
    width: int,
    height: int,
    header_focal_length_mm: float | None,
    header_pixel_size_um: float | None,
    reference_max: float,
    max_star_flux: float,
    n_reference_stars: int,
    white_level: float = 1.0,
) -> Parameters:
    """Fill every Auto field from the reference frame.

    Parameters
    ----------
    params : Parameters
        What the user asked for; ``None`` fields are filled.

    width, height : int
        Image size in pixels.

    header_focal_length_mm, header_pixel_size_um : float or None
        FOCALLEN and XPIXSZ of the reference; NSG's defaults (1000 mm, 6 um) when missing.

    reference_max : float
        The reference's maximum pixel value.

    max_star_flux : float
        Background-subtracted flux of the reference's brightest star.

    n_reference_stars : int
        Number of stars detected on the reference.

    white_level : float
        The value of a saturated pixel in the reference's units (1 for data in [0, 1]).

    Notes
    -----
    NSG's rules are written for data in [0, 1]. Here every pixel value and flux in them is
    taken relative to ``white_level``, and the values in flux or pixel units
    (``linear_range``, ``sample_star_growth_rate``) are returned in the data's own units:
    the same frames in [0, 1] or in ADU resolve to the same rejection circles, star cuts
    and sample counts.
    """
    focal = params.focal_length_mm or header_focal_length_mm or DEFAULT_FOCAL_LENGTH_MM
    pixel = params.pixel_size_um or header_pixel_size_um or DEFAULT_PIXEL_SIZE_UM
    a = degrees_per_pixel(pixel, focal)
    changes: dict = {"focal_length_mm": focal, "pixel_size_um": pixel}
    white = float(white_level) if white_level > 0 else 1.0
    if params.linear_range is not None and white > 1 and params.linear_range <= 1:
        # NSG's dialogue gives it in [0, 1]; copied onto frames in ADU it would leave every
        # star out, and the frames would fail for want of stars.
        raise ParameterError(
            f"--linear-range {params.linear_range:g} is in the data's units, and the reference's white level is "
            f"{white:g}: for {params.linear_range:g} of it give --linear-range {params.linear_range * white:g}"
        )
    rate = params.sample_star_growth_rate
    if rate is not None and rate * max_star_flux > max(width, height):
        # A circle wider than the frame is never meant: most likely NSG's [0, 1] rate on ADU.
        hint = f"; {rate:g} per unit of [0, 1] flux is {rate / white:.3g} here" if white > 1 else ""
        raise ParameterError(
            f"--sample-star-growth-rate {rate:g} grows the brightest star's rejection circle by "
            f"{rate * max_star_flux:.3g} px, more than the frame's {max(width, height)}: it is in px per unit of "
            f"flux in the data's units (white level {white:g}){hint}"
        )
    if params.linear_range is None:
        # Rounded to a thousandth of the white level, as NSG rounds it in [0, 1] data; a
        # reference whose brightest pixel is under a thousandth of it keeps its own 0.7 (the
        # rounding would make it 0, and NSG's fallback, 0.7 of the white level, would take
        # saturated stars for linear ones).
        share = LINEAR_RANGE * reference_max / white
        changes["linear_range"] = white * (round(1000 * share) / 1000 or share or LINEAR_RANGE)
    if params.aperture_gap is None:
        changes["aperture_gap"] = float(min(50, max(1, _round_half_up(0.0005 / a))))
    if params.aperture_bg_delta is None:
        changes["aperture_bg_delta"] = float(min(50, max(5, _round_half_up(0.002 / a))))
    sample_size = params.sample_size or auto_sample_size(width, height, pixel, a)
    changes["sample_size"] = sample_size
    if params.sample_star_growth_rate is None:
        # NSG's cap, 0.25 px per unit of flux in [0, 1] data, is 0.25 / white per unit of
        # flux in the data's units; the brightest star's circle grows by ``reach`` at most.
        reach = max(2, _round_half_up(0.0375 / a))
        cap = SAMPLE_STAR_GROWTH_CAP / white
        changes["sample_star_growth_rate"] = min(cap, reach / max_star_flux) if max_star_flux > 0 else cap
    if params.limit_sample_stars_percent is None:
        bins = (width // sample_size) * (height // sample_size)
        if n_reference_stars > 0:
            percent = min(100.0, round(10000 * (bins / 10) / n_reference_stars) / 100)
        else:
            percent = 100.0
        changes["limit_sample_stars_percent"] = percent
    return params.replace(**changes)
