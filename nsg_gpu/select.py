"""Choosing a reference frame automatically (``--reference auto``).

NSG leaves the choice to the user; the usual advice is a frame with good seeing and
transparency, low noise, full coverage and a simple gradient. The rule here, applied to every
candidate frame:

1. **Coverage.** A reference with a registration border costs every target the samples and
   stars in that border, and leaves the target's gradient there extrapolated. What counts is
   the area the stack keeps: the pixels that at least half of the frames cover. Frames that
   miss more than 3 % of that area beyond what the best-covering frame misses are not
   candidates (a frame of another size than most is not compared, and not a candidate).
   Where most frames cover the whole field, a frame with a border of more than 3 % is left
   out, as a rule of full coverage would; in a dithered set
   registered to a frame that is not among them, where every frame has a border of its own,
   the frames whose borders lie outside the area most frames share stay candidates, instead
   of only the one whose border is smallest, whatever its transparency.
2. **Gradient.** Frames whose background gradient (the 5-95 % range of a smooth background
   model, in units of the frame's noise) is more than twice the median of the candidates are
   dropped, unless that would drop all.
3. **Satellite trails.** Frames whose star detection found a satellite's or aircraft's trail
   (:func:`nsg_gpu.stars.trail_lines`) are dropped, unless that would drop all: a trail
   across the reference lies in every target's photometry and background samples beside it
   (its stars near the trail and its samples on it are left out,
   :func:`nsg_gpu.reference.prepare_reference`, but a frame without one loses none).
4. **Star signal-to-noise.** Of the rest, the frame with the highest star signal-to-noise
   wins: the signal-to-noise at which its typical bright star is measured with weights
   matched to its PSF over a sky-limited background,
   ``flux / (noise * sqrt(4 pi) * FWHM / 2.355)`` (exact for a Gaussian PSF), taken as the
   median over a band of 50 bright stars. The flux grows with transparency and exposure, the
   pixel noise with the sky (its noise before any registration,
   :func:`nsg_gpu.noise.multiscale_noise`: a per-pixel estimate takes a resampled frame,
   whose noise the interpolation smoothed by an amount that depends on its shift, for up to
   a third cleaner than it is), and the light of a star is spread over an area that grows with
   the seeing, so the score falls as 1/FWHM: a sharper or clearer frame scores higher, in
   proportion. The stars of the band are the same in every frame: the frames are
   registered, so their stars ranked by flux are (nearly) the same stars, and the band
   starts below the brightest stars that are non-linear (peak at or above 70 % of the
   frame's maximum) in any frame, with the ranks scaled by each frame's coverage. Taking
   each frame's own brightest unsaturated stars instead would compare stars near the
   saturation limit, whose flux grows with the FWHM: it favours blurred frames. Only the
   detections that recur, within about :data:`COMMON_RADIUS` px, in at least half of the
   other frames are ranked (:func:`common_stars`): the stars. Hot pixels and cosmic rays,
   which each frame has at its own places once registered, and the pieces of a satellite
   trail, which one frame has, outnumber the stars of a sparse field among its detections of
   the band's brightness, and made the frame they crowd most the reference (a trail frame's
   pieces are as bright as its stars; every other frame then failed the registration
   check). Where the frames share fewer than :data:`MIN_COMMON_STARS` stars (the median
   frame: a set not registered to one grid), every frame is scored on all of its detections.

Every measure is a ratio of pixel values, so the choice does not depend on the data's units
(the same frames in [0, 1] or in ADU rank alike).

Frames are ranked by the same rule (candidates by star signal-to-noise, then the frames
dropped for a trail or their gradient, then for their coverage, then those that could not be
measured):
``nsg inspect`` shows that ranking, and ``--reference auto`` takes its first frame.

In the flow: before everything else, when the run is planned (:func:`nsg_gpu.run.plan_run`),
and for ``nsg inspect``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FrameError, ReferenceFrameError
from .io import MASTER_REASON, is_stack_master, read_frame
from .noise import multiscale_noise, noise_step
from .reference import as_measured
from .stars import detect_stars, detection_image, smooth_background

__all__ = [
    "ReferenceScore",
    "star_snr",
    "common_stars",
    "footprint",
    "missing_area",
    "score_frame",
    "rank_frames",
    "inspect_frames",
    "choose_reference",
]

#: Frames missing more than this share of the area most frames cover, beyond what the
#: best-covering frame misses, are not candidates.
MAX_MISSING_AREA = 0.03
#: The frames' footprints (where they have data) are kept at about this many cells across.
FOOTPRINT_CELLS = 256
#: Frames whose gradient exceeds this multiple of the candidates' median are not candidates.
MAX_RELATIVE_GRADIENT = 2.0
#: Stars whose median gives the star signal-to-noise.
SNR_STARS = 50
#: Stars peaking at or above this fraction of the frame's maximum are non-linear (NSG's
#: linear range); the band of stars scored starts below them.
LINEAR_RANGE = 0.7
#: Detections within about this distance (px) of one another in two frames are the same star
#: (the cells of :func:`common_stars`: within 1.5 px always, up to 4.2 px along a diagonal).
COMMON_RADIUS = 1.5
#: Each frame's brightest detections compared with the other frames'.
COMMON_STARS = 1000
#: Where the median frame shares fewer stars with the others, the frames are not registered to
#: one grid, and each is scored on all of its detections.
MIN_COMMON_STARS = 5
#: A frame that shares fewer stars with the others than this fraction of what the median
#: frame shares is not a candidate: its detections are mostly something the others do not
#: show (hot pixels a registration spread into blobs, a trail's pieces, cloud), its FWHM is
#: read on them, and every target judged against its brightest detections would fail as not
#: registered (the colour field-dependent scenario's seed 12: a trail frame near half a
#: pixel's shift shared 9 of its 168 detections where the others shared 409-420, read FWHM
#: 1.66 px for 3.53, and won on star signal-to-noise; its four targets failed).
MIN_SHARED_FRACTION = 0.25
#: Signal-to-noise of a star of flux F measured with weights matched to a Gaussian PSF on a
#: background of pixel noise s: F / (s * sqrt(4 pi) * sigma_PSF) = this * F / (s * FWHM).
PSF_SNR_FACTOR = 2.0 * math.sqrt(2.0 * math.log(2.0)) / math.sqrt(4.0 * math.pi)


#: The star table a score carries for :func:`rank_frames`; not part of its row.
_STAR_TABLE = ("star_flux", "star_linear", "star_x", "star_y", "footprint")


@dataclass
class ReferenceScore:
    """What the reference choice measures of one frame, with header facts for ``nsg inspect``.

    ``star_snr`` is the score (see the module's rule); ``rank`` (1 = the frame
    ``--reference auto`` picks), ``candidate`` and ``note`` are set by :func:`rank_frames`,
    which also scores every frame again on the band of stars common to all of them.
    ``star_flux`` (brightest first), ``star_linear``, ``star_x`` and ``star_y`` are the
    detected stars it scores (``shared_stars``: how many of them recur in the other frames),
    ``footprint`` where the frame has data (:func:`footprint`); ``missing_area`` is the share
    of the area most frames cover that the frame lacks, set by :func:`rank_frames`.
    """

    path: Path
    coverage: float = 0.0
    noise: float = 0.0
    star_snr: float = 0.0
    gradient: float = 0.0
    stars: int = 0
    error: str | None = None
    median: float | None = None
    fwhm: float | None = None
    exposure: float | None = None
    filter: str | None = None
    date_obs: str | None = None
    altitude: float | None = None
    airmass: float | None = None
    missing_area: float | None = None
    rank: int | None = None
    candidate: bool = False
    note: str = ""
    star_flux: np.ndarray | None = field(default=None, repr=False, compare=False)
    star_linear: np.ndarray | None = field(default=None, repr=False, compare=False)
    star_x: np.ndarray | None = field(default=None, repr=False, compare=False)
    star_y: np.ndarray | None = field(default=None, repr=False, compare=False)
    footprint: np.ndarray | None = field(default=None, repr=False, compare=False)
    shared_stars: int | None = None
    trails: int = 0  # satellite or aircraft trails its detection found
    shape: tuple[int, int] | None = None  # (height, width)

    @property
    def nonlinear_stars(self) -> int:
        """Number of detected stars peaking in the non-linear range."""
        return self.nonlinear_among(None)

    def nonlinear_among(self, use: np.ndarray | None) -> int:
        """Number of the detections ``use`` selects (bool; None: all) peaking in the
        non-linear range."""
        if self.star_linear is None:
            return 0
        return int(np.count_nonzero(~(self.star_linear if use is None else self.star_linear[use])))

    @property
    def noise_per_second(self) -> float | None:
        """Pixel noise divided by the exposure time, where the header has one."""
        return self.noise / self.exposure if self.exposure else None

    def row(self) -> dict:
        """A flat dict for ``nsg inspect --json``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _STAR_TABLE}
        out["path"] = str(self.path)
        out["noise_per_second"] = self.noise_per_second
        if self.error is not None:  # nothing was measured: no values, not zeros
            for name in ("coverage", "noise", "star_snr", "gradient", "stars", "trails"):
                out[name] = None
        return out


def star_snr(
    score: ReferenceScore,
    first: int = 0,
    coverage: float = 1.0,
    use: np.ndarray | None = None,
    reach: int | None = None,
) -> float:
    """The star signal-to-noise of a frame, over the band of :data:`SNR_STARS` stars from
    rank ``first`` by flux, ranks scaled by ``coverage`` (the frame's share of the best
    coverage); the band's non-linear stars are left out. ``use`` (bool, one per detection),
    where given: only those detections are ranked. ``reach``, where given: the band ends
    before that rank (the fewest stars any frame ranks, so that frames with more faint
    detections than others are not scored on fainter stars).

    Returns
    -------
    float
        ``PSF_SNR_FACTOR * median(flux) / (noise * FWHM)``; 0 when nothing can be scored.
    """
    flux, linear = score.star_flux, score.star_linear
    if flux is None or linear is None or not flux.size or not score.noise > 0 or not score.fwhm:
        return 0.0
    if use is not None:
        flux, linear = flux[use], linear[use]
        if not flux.size:
            return 0.0
    width = max(1, int(round(SNR_STARS * coverage)))
    if reach is not None and reach - first >= MIN_COMMON_STARS:
        width = min(width, max(1, int(round((reach - first) * coverage))))
    # A frame with fewer stars than the band reaches: its faintest stars.
    start = max(0, min(int(round(first * coverage)), flux.size - width))
    band = flux[start : start + width][linear[start : start + width]]
    if not band.size:
        band = flux[linear][-SNR_STARS:]
    if not band.size:
        return 0.0
    return float(PSF_SNR_FACTOR * np.median(band) / (score.noise * max(score.fwhm, 1.0)))


def common_stars(positions: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Which detections of each frame recur in at least half of the other frames.

    Parameters
    ----------
    positions : sequence of (x, y)
        Each frame's detections (px, brightest first), the frames registered to one grid.

    Returns
    -------
    list of bool arrays
        One per frame: True where a detection of at least half of the other frames (a
        frame's own detections not counted) lies in the same cell of :data:`COMMON_RADIUS`
        px or in one of its eight neighbours; the detections after the brightest
        :data:`COMMON_STARS` are False. With fewer than two frames, all True.

    Notes
    -----
    Each frame marks the 3 x 3 cells around each of its detections once; a cell's count is
    the number of frames that marked it, less one for the frame's own mark. The same
    positions give the same answer in any order of the frames.
    """
    n = len(positions)
    if n < 2:
        return [np.ones(np.size(x), bool) for x, _ in positions]
    cells, marks = [], []
    for x, y in positions:
        cx = np.floor(np.asarray(x[:COMMON_STARS], np.float64) / COMMON_RADIUS).astype(np.int64) + 1
        cy = np.floor(np.asarray(y[:COMMON_STARS], np.float64) / COMMON_RADIUS).astype(np.int64) + 1
        cells.append(cy * _CELL_ROW + cx)
        around = (cy[:, None] + _AROUND_Y[None, :]) * _CELL_ROW + (cx[:, None] + _AROUND_X[None, :])
        marks.append(np.unique(around))
    keys, counts = np.unique(np.concatenate(marks), return_counts=True)
    out = []
    for (x, _), own in zip(positions, cells, strict=True):
        others = counts[np.searchsorted(keys, own)] - 1
        common = np.zeros(np.size(x), bool)
        common[: own.size] = 2 * others >= n - 1
        out.append(common)
    return out


#: Cell keys of :func:`common_stars`: row times this plus column (frames under 2^31 cells wide).
_CELL_ROW = 1 << 31
_AROUND_Y, _AROUND_X = (a.ravel() for a in np.mgrid[-1:2, -1:2])


def footprint(valid: np.ndarray) -> np.ndarray:
    """Where a frame has data, in square cells of about ``1/FOOTPRINT_CELLS`` of its larger
    side (8 px at least): a cell counts when more than a twentieth of its pixels hold data,
    so that the scattered zeros of a frame clipped at 0 (a dark sky less its dark frame)
    leave it covered, and only a region without data (a registration's border) does not. A
    remainder under one cell at the right and top edges is left out."""
    cell = max(8, math.ceil(max(valid.shape) / FOOTPRINT_CELLS))
    rows, cols = valid.shape[0] // cell, valid.shape[1] // cell
    blocks = valid[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell)
    return np.count_nonzero(blocks, axis=(1, 3)) * 20 > cell * cell


def missing_area(footprints: Sequence[np.ndarray]) -> np.ndarray:
    """For each footprint (all of one shape), the share of the cells that at least half of
    them cover which it lacks."""
    stack = np.stack(footprints)
    shared = np.count_nonzero(stack, axis=0) * 2 >= len(footprints)
    area = max(int(np.count_nonzero(shared)), 1)
    return np.count_nonzero(shared & ~stack, axis=(1, 2)) / area


def score_frame(path: str | os.PathLike, *, detection_sigma: float = 5.0) -> ReferenceScore:
    """Measure coverage, noise, star signal-to-noise and gradient strength of a frame.

    The star signal-to-noise here is the frame's own, from the band below its own non-linear
    stars; :func:`rank_frames` scores frames against each other on a common band.

    Raises
    ------
    FrameError
        The frame cannot be read.
    """
    # A sky clipped at 0 or about 0 is measured as the run measures it (reference.as_measured).
    frame, _ = as_measured(read_frame(path))
    image = detection_image(frame.data)
    valid = image > 0
    coverage = float(np.count_nonzero(valid)) / image.size
    stars = detect_stars(frame.data, detection_sigma=detection_sigma)
    # Read at the run's step where a registration upscaled the frame (noise.noise_step).
    noise = multiscale_noise(image, step=noise_step(stars.correlation, colour=frame.channels > 1))
    background = smooth_background(image, valid, scale=max(image.shape) / 16.0, factor=8)
    values = background[valid]
    gradient = float(np.subtract(*np.percentile(values, [95, 5])) / noise) if noise > 0 and values.size else 0.0
    meta = frame.meta
    score = ReferenceScore(
        Path(path),
        coverage,
        noise,
        0.0,
        gradient,
        len(stars),
        median=float(np.median(image[valid])) if valid.any() else None,
        fwhm=float(stars.fwhm) if len(stars) else None,
        exposure=meta.exposure,
        filter=meta.filter,
        date_obs=meta.date_obs,
        altitude=meta.altitude,
        airmass=meta.airmass,
        star_flux=stars.flux,
        star_linear=stars.peak < LINEAR_RANGE * float(image.max()),
        star_x=stars.x,
        star_y=stars.y,
        footprint=footprint(valid),
        trails=len(stars.trails),
        shape=(int(image.shape[0]), int(image.shape[1])),
    )
    score.star_snr = star_snr(score, score.nonlinear_stars)
    return score


def rank_frames(scores: Sequence[ReferenceScore]) -> list[ReferenceScore]:
    """Order frames by the rule of this module and set their ``rank``, ``candidate`` and ``note``.

    Frames that carry their stars (as :func:`score_frame` leaves them) are scored again on
    one band of stars: from the rank below the most non-linear stars of any measured frame,
    ranks scaled by each frame's coverage relative to the best.

    Returns
    -------
    list of ReferenceScore
        Candidates first by star signal-to-noise, then the frames dropped for a trail or their
        gradient, for their coverage, and the frames that could not be measured; equals in the
        order of their file names (then paths), whatever the order of ``scores``.
    """
    # One order whatever the order the frames were given in, so that every first of equals
    # (the common size, a tie of scores: a frame copied) is the same frame.
    scores = sorted(scores, key=lambda s: (Path(s.path).name, str(s.path)))
    measured = [s for s in scores if s.error is None and s.stars > 0 and s.noise > 0]
    for s in scores:
        if s.error is None and s not in measured:
            s.note = "no stars detected" if s.stars == 0 else "no noise measured"
    if measured:
        best_coverage = max(s.coverage for s in measured)
        # The band's ranks scale with the area that holds stars: the footprint's, where the
        # frame has one (a frame clipped at 0 across its sky has fewer pixels with data, not
        # fewer stars).
        area = {id(s): s.coverage if s.footprint is None else float(s.footprint.mean()) for s in measured}
        best_area = max(area.values())
        # Stars are compared among frames of one grid: the most common size (a frame of
        # another size is no candidate, and its stars' places mean nothing on this grid).
        size = _common_size(measured)
        tabled = [
            s
            for s in measured
            if s.star_flux is not None and s.star_x is not None and (s.shape is None or s.shape == size)
        ]
        masks = common_stars([(s.star_x, s.star_y) for s in tabled])
        for s, common in zip(tabled, masks, strict=True):
            s.shared_stars = int(np.count_nonzero(common))
        # Frames registered to one grid share their stars: a frame that shares few (cloud,
        # a frame of another field) is scored on those few, as the others are on theirs.
        median_shared = float(np.median([s.shared_stars for s in tabled])) if tabled else 0.0
        registered = median_shared >= MIN_COMMON_STARS
        use = {id(s): common for s, common in zip(tabled, masks, strict=True)} if registered else {}
        few = {id(s) for s in tabled if registered and s.shared_stars < MIN_SHARED_FRACTION * median_shared}
        first = max(s.nonlinear_among(use.get(id(s))) for s in measured)
        ranked = [
            s.shared_stars for s in tabled if registered and s.shared_stars >= MIN_COMMON_STARS and id(s) not in few
        ]
        reach = min(ranked) if len(ranked) >= 2 else None
        for s in measured:
            if s.star_flux is not None:
                s.star_snr = star_snr(
                    s, first, area[id(s)] / best_area if best_area > 0 else 1.0, use.get(id(s)), reach
                )
        limit = _set_missing_area(measured, best_coverage, size)
        covered = [s for s in measured if s.missing_area is not None and s.missing_area <= limit + 1e-9]
        median_gradient = float(np.median([s.gradient for s in covered]))
        calm = [s for s in covered if s.gradient <= MAX_RELATIVE_GRADIENT * median_gradient + 1e-9] or covered
        unshared = [s for s in calm if id(s) not in few] or calm
        picked = [s for s in unshared if not s.trails] or unshared
        for s in measured:
            s.candidate = s in picked
            if s.candidate:
                s.note = "candidate"
            elif s.trails and s in unshared:
                s.note = f"crossed by {s.trails} satellite trail(s)"
            elif id(s) in few and s in calm:
                s.note = (
                    f"shares {s.shared_stars} stars with the other frames, under "
                    f"{MIN_SHARED_FRACTION:.0%} of the median frame's {median_shared:.0f}"
                )
            elif s in covered:
                s.note = f"gradient {s.gradient / max(median_gradient, 1e-12):.1f}x the median"
            elif s.missing_area is None:
                s.note = "coverage not compared: its size differs from most frames'"
            else:
                s.note = (
                    f"coverage {s.coverage:.1%}: misses {s.missing_area:.1%} of the area most frames cover, "
                    f"more than {limit:.1%}"
                )

    def group(s: ReferenceScore) -> int:
        if s.candidate:
            return 0
        if s.error is None and s.note.startswith(("crossed", "gradient")):
            return 1
        if s.error is None and s.note.startswith(("coverage", "shares")):
            return 2
        return 3

    ordered = sorted(scores, key=lambda s: (group(s), -s.star_snr))
    for k, s in enumerate(ordered, start=1):
        s.rank = k
    return ordered


def _size(s: ReferenceScore) -> tuple[int, int] | None:
    """The frame's own size where known, else its footprint's, else None."""
    if s.shape is not None:
        return s.shape
    return None if s.footprint is None else s.footprint.shape


def _common_size(measured: Sequence[ReferenceScore]) -> tuple[int, int] | None:
    """The most common size among the frames whose size is known (the first such size where
    two are as common), or None where none is."""
    sizes = [size for size in map(_size, measured) if size is not None]
    return max(sizes, key=sizes.count) if sizes else None


def _set_missing_area(measured: Sequence[ReferenceScore], best_coverage: float, common) -> float:
    """Set each measured frame's ``missing_area`` and return the most a candidate may miss
    (:data:`MAX_MISSING_AREA` beyond the least any frame misses).

    Frames with footprints are judged by those of the ``common`` size (:func:`_common_size`);
    a frame of another size gets None: it is not a candidate (it cannot be the others'
    reference). Where no frame of that size has a footprint (scores built by hand), each
    misses what it covers less than the best."""
    alike = [s for s in measured if s.footprint is not None and _size(s) == common]
    if not alike:
        for s in measured:
            s.missing_area = max(best_coverage - s.coverage, 0.0)
    else:
        for s in measured:
            s.missing_area = None
        for s, missing in zip(alike, missing_area([s.footprint for s in alike]), strict=True):
            s.missing_area = float(missing)
    return min(s.missing_area for s in measured if s.missing_area is not None) + MAX_MISSING_AREA


def inspect_frames(paths: Sequence[str | os.PathLike], *, detection_sigma: float = 5.0) -> list[ReferenceScore]:
    """Score every frame (an unreadable one gets its error) and rank them; see :func:`rank_frames`."""
    scores = []
    for p in paths:
        if is_stack_master(p):
            scores.append(ReferenceScore(Path(p), error=f"{p}: {MASTER_REASON}", note="a master"))
            continue
        try:
            scores.append(score_frame(p, detection_sigma=detection_sigma))
        except FrameError as exc:
            scores.append(ReferenceScore(Path(p), error=str(exc), note="cannot be read"))
    return rank_frames(scores)


def choose_reference(paths: Sequence[str | os.PathLike], *, detection_sigma: float = 5.0) -> tuple[Path, str]:
    """Pick the reference among ``paths``: the first frame of :func:`inspect_frames`.

    Returns
    -------
    path : Path
    reason : str
        One line saying why, for the log and results.json.

    Raises
    ------
    ReferenceFrameError
        No frame could be read and measured.
    """
    ranked = inspect_frames(paths, detection_sigma=detection_sigma)
    if not ranked or not ranked[0].candidate:
        why = [s.error or f"{s.path}: {s.note or 'not a candidate'}" for s in ranked]
        shown = "; ".join(why[:5]) + (f"; and {len(why) - 5} more" if len(why) > 5 else "")
        raise ReferenceFrameError(
            "--reference auto", "no frame could be measured to choose a reference from" + (f" ({shown})" if why else "")
        )
    best = ranked[0]
    candidates = [s for s in ranked if s.candidate]
    measured = sum(1 for s in ranked if s.error is None and s.stars > 0 and s.noise > 0)
    reason = (
        f"highest star signal-to-noise ({best.star_snr:.0f}) of {len(candidates)} candidate(s) with "
        f"coverage {best.coverage:.1%} and gradient {best.gradient:.1f} sigma "
        f"(of {measured} frames measured)"
    )
    if len(candidates) > 1:
        runner_up = candidates[1]
        reason += f"; next: {runner_up.path.name} ({runner_up.star_snr:.0f})"
    dropped = {
        "for a satellite trail": sum(s.note.startswith("crossed") for s in ranked),
        "for their gradient": sum(s.note.startswith("gradient") for s in ranked),
        "for their coverage": sum(s.note.startswith("coverage") for s in ranked),
        "for the few stars they share": sum(s.note.startswith("shares") for s in ranked),
        "unreadable or without stars": sum(s.error is not None or s.note.startswith("no ") for s in ranked),
    }
    if any(dropped.values()):
        reason += "; not candidates: " + ", ".join(f"{n} {why}" for why, n in dropped.items() if n)
    return best.path, reason
