"""The reference: everything it contributes to every target, prepared once per run.

First stage of the data flow after reading. :func:`prepare_reference` checks the reference's
coverage, detects its stars (:mod:`nsg_gpu.stars`), resolves NSG's Auto parameters from them
(:mod:`nsg_gpu.params`), chooses the stars that the scale stage measures on every target and
those isolated enough to fit a PSF on, lays out the background sample grid with the
reference's medians and its star-rejection circles (:mod:`nsg_gpu.samples`), and measures its
noise (:mod:`nsg_gpu.noise`). The reference's photometry and PSF fits, which depend on the
aperture each target needs, are computed on first use and kept (:meth:`Reference.measurement`,
:meth:`Reference.psf_fit`). Memory does not grow with the number of targets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from . import photometry
from .backend import Backend, get_backend, single_threaded_blas
from .errors import FrameDataError, FrameError, ParameterError, ReferenceFrameError
from .io import Frame, read_frame
from .noise import DETECT_NOISE_PIXELS, frame_noise, ksigma_noise, noise_step
from .outliers import bright_counts, clipped_medians, pixel_noise
from .params import Parameters, resolve_parameters
from .psf import (
    MIN_PSF_FWHM,
    PSF_STARS,
    FittedPSF,
    MoffatPSF,
    fit_reference_psf,
    fits_psf_from,
    integrated_fit,
    stamp_radius,
)
from .resampling import (
    InterpolationKernel,
    correlation_kernel,
    kernel_correlations,
    noise_correlation,
    own_kernel,
)
from .samples import MIN_SAMPLES, SampleGrid, bin_medians, make_grid, star_rejection, trail_rejection
from .stamps import channel_peaks, peak_contrast
from .stars import (
    EDGE_NO_DATA,
    StarCatalog,
    detect_stars,
    detection_image,
    isolated,
    near_trails,
    scattered_zeros,
)

__all__ = ["Reference", "prepare_reference", "check_coverage", "as_measured", "as_frame", "MAX_PHOTOMETRY_STARS"]

#: At most this many reference stars are measured on each target, brightest first.
MAX_PHOTOMETRY_STARS = 1500
#: A frame with less of its pixels holding data than this is not normalized.
MIN_COVERAGE = 0.05
#: The reference's PSF fits kept (one per stamp radius and model; the radius follows the
#: broader of the two frames, in steps of a tenth): the oldest is dropped beyond this.
PSF_FITS_KEPT = 16
#: A trail's light reaches this many FWHM beside its line: the reference's stars whose
#: annulus comes that near a trail its detection found, and its samples that do, are left
#: out (the trail's light in a reference star's annulus took 10-30 % of a bright star's flux
#: out of a sparse synthetic field's scales).
TRAIL_CLEARANCE_FWHM = 2.0
#: The PSF is fitted on the bright isolated stars (:meth:`Reference.psf_stars`): those whose
#: peak stands at least PSF_PEAK_SNR noise sigmas out of their surroundings
#: (:attr:`Reference.peak_snr`), and the fainter ones; but where many of these peak at less
#: than PSF_SHARPNESS of the bright ones' peak for their flux (PSF_SHARP_SNR sigmas and
#: more), those are left out. Among faint detections are a nebula's knots: broad, with their
#: light lifting their flux, they pass the detection's sharpness test (0.4 of the stars'
#: typical, which keeps a field's broad corners), and on a sparse field over a nebula they
#: outnumbered the stars among the 60 brightest isolated detections (50 knots of 2-4.8 sigmas
#: at their peak, read at 0.31-0.67 of the stars' peak for their flux; its 10 stars from 6
#: sigmas) and drew the fitted Moffats broad in their wings (docs/scale-accuracy.md, "Knots
#: of a nebula among the PSF stars"). StarGate's faint stars of 3.4-4.8 sigmas read 0.6-1.9.
PSF_PEAK_SNR = 5.0
PSF_SHARPNESS = 0.7
PSF_SHARP_SNR = 10.0
#: ... where more than this share of the faint ones peak that low: their noise takes about a
#: tenth of faint stars there (StarGate's sg_0001: one of its five), and those stay.
PSF_KNOT_SHARE = 1.0 / 3.0
#: A frame holding negative data is measured with a pedestal of its least value's magnitude
#: and this share more (:func:`as_measured`), so that its least pixel stays above 0.
PEDESTAL_MARGIN = 1e-3
#: A negative pixel this many sigmas of the frame's pixels (1.4826 MAD) below the 1st
#: percentile of the pixels holding data is no data (:func:`as_measured`): a hot pixel of the
#: dark that the light did not have, a dead one, not the sky; a sky's noise and gradient never
#: reach there (the lowest of 26 million Gaussian pixels is about 3 sigmas below the 1st
#: percentile). One such pixel at -1 on a sky of 0.07 set the pedestal, and a frame so raised
#: lost its star pairs (the shot noise read from a sky 15 times its own).
COLD_SIGMAS = 10.0
#: :func:`as_measured` reads the percentile and the MAD on every this many rows and columns.
COLD_STEP = 4
#: :func:`as_measured` looks for a sky clipped at 0 on every this many rows first.
SCATTERED_ZERO_ROWS = 8
#: A run of this many equal pixels along the frame's edge, not 0, is a registration's border
#: filled with that value (:func:`as_measured`); a sky with noise never repeats a value so.
FILL_RUN = 32
#: A value that makes this share of the frame's central fifth (each way) is the sky's, not a fill.
FILL_CENTRE_SHARE = 0.01


@dataclass
class Reference:
    """What the reference contributes to every target, computed once."""

    frame: Frame
    params: Parameters  # resolved: no Auto field left
    stars: StarCatalog
    photometry_index: np.ndarray  # catalogue rows measured on targets
    channel_peak: np.ndarray  # brightest channel's peak at each of those stars
    isolated: np.ndarray  # bool over photometry_index
    grid: SampleGrid
    medians: object  # (channels, rows, cols) backend array
    valid: object  # (rows, cols) backend bool
    rejected: np.ndarray  # (rows, cols) host bool, star circles and trails
    noise: np.ndarray  # per channel
    # What each photometry star's peak stands over its surroundings (stamps.peak_contrast) in
    # noise sigmas of the detection image: which stars every registered target must show
    # (scale._find_stars).
    peak_snr: np.ndarray
    circles: np.ndarray | None = None  # (n, 3) x, y, radius of the stars that reject samples
    bright: np.ndarray | None = None  # (channels, rows, cols) bright pixels per bin (samples.bright_counts)
    #: Per channel, the k-sigma noise of single pixels (outliers.pixel_noise): where the frame
    #: was resampled, below ``noise``, which reads the noise before the interpolation smoothed it.
    pixel_noise: np.ndarray | None = None
    #: Added to every pixel of ``frame`` holding data, where the reference holds negative data
    #: (:func:`as_measured`); 0 otherwise.
    pedestal: float = 0.0
    #: Whether ``frame`` holds the reference as measured, not as read (:func:`as_measured`: its
    #: scattered zeros given a value, or a pedestal added); its own output is then read again.
    altered: bool = False
    _clipped: dict = field(default_factory=dict)  # (row, col) -> clipped medians per channel
    _measurements: dict = field(default_factory=dict)
    _cutouts: dict = field(default_factory=dict)
    _psf_fits: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.frame.path.name

    def measurement(
        self, geometry: photometry.ApertureGeometry, weight: MoffatPSF | None = None
    ) -> photometry.StarMeasurement:
        """Reference photometry for an aperture geometry and weight, measured once and kept."""
        # Compute threads may ask at the same time: both measure, the dict keeps one, and
        # each returns its own (identical) measurement.
        key = (geometry, weight)
        measured = self._measurements.get(key)
        if measured is None:
            idx = self.photometry_index
            x, y = self.stars.x[idx], self.stars.y[idx]
            measured = photometry.measure_stars(self.frame.data, x, y, geometry, weight, cutouts=self.cutouts(geometry))
            if len(self._measurements) > 8:
                self._measurements.clear()
            self._measurements[key] = measured
        return measured

    def cutouts(self, geometry: photometry.ApertureGeometry) -> photometry.Cutouts:
        """The photometry stars' cutouts for an aperture geometry, made once and kept."""
        # The cutouts and their backgrounds depend on the geometry alone; they are the
        # costly part, and few geometries (radii in half pixels) are kept, for their size.
        cutouts = self._cutouts.get(geometry)
        if cutouts is None:
            idx = self.photometry_index
            cutouts = photometry.cut_out(self.frame.data, self.stars.x[idx], self.stars.y[idx], geometry)
            if len(self._cutouts) >= 3:
                self._cutouts.clear()
            self._cutouts[geometry] = cutouts
        return cutouts

    def psf_fit(self, radius: int, *, pixel_integrated: bool = False) -> FittedPSF | None:
        """The reference's PSF fitted on stamps of ``radius`` px around its bright isolated
        stars (integrated over the pixels with ``pixel_integrated``), fitted once per radius
        and model and kept; None where too few stars can be fitted."""
        # Compute threads may ask at the same time: each fits what it does not find, keeps
        # it (the oldest fit dropped beyond PSF_FITS_KEPT) and returns its own (identical) fit.
        key = (radius, pixel_integrated)
        if key in self._psf_fits:
            return self._psf_fits[key]
        idx = self.psf_stars()
        with single_threaded_blas():
            fitted = fit_reference_psf(
                self.frame.data,
                self.stars.x[idx],
                self.stars.y[idx],
                fwhm=self.stars.fwhm,
                radius=radius,
                pixel_integrated=pixel_integrated,
                blur=self.interpolation_kernel if pixel_integrated else self.own_kernel,
                neighbours=(self.stars.flux, self.stars.x, self.stars.y, idx),
            )
        if len(self._psf_fits) >= PSF_FITS_KEPT:
            # The oldest goes (another thread may have dropped it already).
            self._psf_fits.pop(next(iter(self._psf_fits.copy()), None), None)
        self._psf_fits[key] = fitted
        return fitted

    def psf_stars(self) -> np.ndarray:
        """Catalogue rows of the stars the PSF is fitted on: the brightest isolated ones, at
        most :data:`PSF_STARS`, less the faint ones whose peak is low for their flux where a
        share of the faint ones are (see :data:`PSF_PEAK_SNR`), and less those a few pixels
        from a hot pixel (:attr:`StarCatalog.near_point`)."""
        # A star beside a hot pixel or cosmic ray has its light in the stamp (and, where the
        # point is the sensor's, elsewhere in each registered target's): the fits clip its
        # core, not its wings under 5 sigmas.
        rows = np.nonzero(self.isolated & ~self.stars.near_point[self.photometry_index])[0]
        snr = self.peak_snr[rows]
        flux = self.stars.flux[self.photometry_index[rows]]
        # Peak for flux, relative to the stars' that stand well out of the noise (a ratio of
        # the same noise, so in any units).
        ratio = snr / np.where(flux > 0, flux, np.inf)
        sharp = snr >= PSF_SHARP_SNR
        if np.count_nonzero(sharp) >= 3:
            faint = snr < PSF_PEAK_SNR
            blunt = faint & (ratio < PSF_SHARPNESS * float(np.median(ratio[sharp])))
            # A few faint stars peak that low by their noise; a share of them, knots.
            if np.count_nonzero(blunt) > PSF_KNOT_SHARE * np.count_nonzero(faint):
                rows = rows[~blunt]
        return self.photometry_index[rows][:PSF_STARS]

    @property
    def interpolation_kernel(self) -> InterpolationKernel | None:
        """The interpolation kernel the reference's pixels went through, where it was
        resampled itself (:func:`nsg_gpu.resampling.interpolation_kernel`), from the noise
        correlations the star detection read."""
        return correlation_kernel(self.noise_correlation)

    @property
    def own_kernel(self) -> InterpolationKernel | None:
        """The interpolation the reference was registered with, where it was resampled itself
        at one shift (:func:`nsg_gpu.resampling.own_kernel`: matched beside its sky's
        correlations where it matches nothing alone); None for a frame not resampled or
        turned. Its PSF fit on stars of 2.5 px and more (sampled) is convolved with it, as
        each target's is with its own (docs/scale-accuracy.md, "A registered reference")."""
        return own_kernel(self.noise_correlation, self.stars.fwhm)

    @property
    def sky_correlation(self) -> np.ndarray:
        """The reference's noise correlations less its own kernel's (:attr:`own_kernel`):
        what its sky holds beyond the registration, against which a registered target's
        kernel is read (:func:`nsg_gpu.resampling.registration_kernel`)."""
        own = self.own_kernel
        rho = self.noise_correlation
        return rho if own is None else rho - kernel_correlations(own)

    @property
    def noise_step(self) -> int:
        """The pixel step at which every frame's weight noise is read, ``noise`` included
        (:func:`nsg_gpu.noise.noise_step` of :attr:`noise_correlation`): more than 1 where the
        registration upscaled the frames."""
        return noise_step(self.noise_correlation, colour=self.frame.channels > 1)

    @property
    def noise_correlation(self) -> np.ndarray:
        """The reference's noise correlations (:func:`nsg_gpu.resampling.noise_correlation`),
        against which a registered target's kernel is read
        (:func:`nsg_gpu.resampling.registration_kernel`): read once, by the star detection."""
        if self.stars.correlation is None:
            self.stars.correlation = noise_correlation(self.frame.data)
        return self.stars.correlation

    def clipped_medians(self, bins: np.ndarray) -> np.ndarray:
        """The reference's clipped medians (:func:`nsg_gpu.samples.clipped_medians`) of
        ``bins`` ``(n, 2)``, computed once per bin and kept; ``(channels, n)``."""
        missing = [tuple(b) for b in np.asarray(bins).reshape(-1, 2) if tuple(b) not in self._clipped]
        if missing:
            values = clipped_medians(self.frame.data, self.grid, np.array(missing), self.frame.white_level)
            for k, key in enumerate(missing):
                self._clipped[key] = values[:, k]
        columns = [self._clipped[tuple(b)] for b in np.asarray(bins).reshape(-1, 2)]
        return np.stack(columns, axis=1) if columns else np.zeros((self.frame.data.shape[0], 0))

    def own_psf(self) -> MoffatPSF | None:
        """The reference's fitted PSF at its own FWHM, where the photometry fits PSFs (the plain
        aperture alone fits them for its seeing correction on stars of :data:`MIN_PSF_FWHM` and
        more)."""
        least = MIN_PSF_FWHM if self.params.photometry == "aperture" else fits_psf_from(self.frame.data.shape[0])
        if self.stars.fwhm < least:
            return None
        try:
            fitted = self.psf_fit(stamp_radius(self.stars.fwhm), pixel_integrated=integrated_fit(self.stars.fwhm))
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            # The reference's row only reports its PSF; the targets' fits judge their own.
            return None
        return fitted.psf if fitted is not None else None


def as_measured(frame: Frame) -> tuple[Frame, float]:
    """``frame`` as the stages measure it, and the pedestal added to it (0.0 for none):
    ``frame`` itself where it holds no scattered zero and no negative pixel.

    Zero marks no data (DESIGN.md), and the stages read pixels at or below 0 as none
    (detection's margins, the stars' coverage, the photometry's holes, the background samples,
    the noise, the kernels'). Two kinds of frames hold data there:

    - A sky clipped at 0 (calibrated without a pedestal on a dim sky): its zeros are scattered
      one by one, where no-data regions (registration borders, masks) fill 3 x 3 squares
      (:func:`nsg_gpu.stars.no_data_regions`). A reference with a sixth of its sky at 0 left
      every target without a usable star pair. Its scattered zeros are given the least
      positive float32: data of the value 0.
    - A registration border filled with a value other than 0 (a fill the registration was
      set to, or a level taken off a frame after it was registered): no data, as 0 would
      have said, and set to 0 (:func:`_filled_borders`). Read as data it was a sky without
      noise, which took the frame's noise for a small share of its own and gave weights of
      thousands to millions.
    - A sky about 0 (subtracted, or calibrated without a pedestal and not clipped): about half
      its sky is negative, and such a frame was left with few star pairs, a noise read on its
      positive half and half its output's sky clipped to 0. Every pixel holding data is raised
      by a little more than the least value's magnitude (the pedestal), so that none is at or
      below 0: the stars' fluxes (less their local background) and the noise are those of the
      frame as given, and the gradient model takes the constant
      (:func:`nsg_gpu.pipeline.normalize_frame` writes the output at the reference's own
      level). What does move is the stars' shot noise, read from the sky's level
      (``psf.stamp_noise``, ``photometry.measure_stars``): a subtracted sky no longer shows its
      level, the raised one stands for it, and the brightest stars weigh less in the fit.
    """
    data = frame.data
    be = get_backend(data)
    xp = be.xp
    filled = _filled_borders(data)
    if filled is not None:
        data = xp.where(filled, np.float32(0), data).astype(xp.float32)
        frame = dataclasses.replace(frame, data=data)
    scattered = _scattered_zeros(data)
    least = float(be.to_host(data.min()))
    if least < 0:
        floor = _cold_floor(data)
        if least < floor:  # pixels far below the sky: no data, before the pedestal is read
            data = xp.where(data < floor, np.float32(0), data).astype(xp.float32)
            frame = dataclasses.replace(frame, data=data)
            least = float(be.to_host(data.min()))
    if scattered is None and not least < 0:
        return frame, 0.0
    if scattered is not None:
        data = xp.where(scattered, np.finfo(np.float32).tiny, data).astype(xp.float32)
    pedestal = np.float32(-least * (1 + PEDESTAL_MARGIN)) if least < 0 else np.float32(0)
    if pedestal:
        data = xp.where(data != 0, data + pedestal, np.float32(0)).astype(xp.float32)
    return dataclasses.replace(frame, data=data), float(pedestal)


def _cold_floor(data) -> float:
    """The value below which a negative pixel of ``data`` is no data (:data:`COLD_SIGMAS`),
    never above 0; from the pixels holding data on every :data:`COLD_STEP`-th row and column."""
    be = get_backend(data)
    xp = be.xp
    sample = data[:, ::COLD_STEP, ::COLD_STEP]
    values = sample[(sample != 0) & xp.isfinite(sample)]
    if values.size < 100:
        return -np.inf
    low, median = (float(v) for v in be.to_host(xp.percentile(values, xp.asarray([1.0, 50.0]))))
    sigma = 1.4826 * float(be.to_host(xp.median(xp.abs(values - median))))
    return min(low - COLD_SIGMAS * sigma, 0.0)


def _filled_borders(data):
    """Where each channel holds a registration border of one value other than 0, or None:
    the pixels of a value that runs over :data:`FILL_RUN` pixels along one of the frame's
    edges (not the channel's highest, where a saturated star cut by the edge runs, nor one
    that makes :data:`FILL_CENTRE_SHARE` or more of the frame's central fifth: a sky
    quantized finer than its noise, or clipped at a floor, repeats its value everywhere),
    where they fill 3 x 3 squares (a binary opening, as no-data zeros are found).
    Only the four edges are looked at unless such a run is there."""
    be = get_backend(data)
    xp, ndi = be.xp, be.ndimage
    found = None
    for c in range(data.shape[0]):
        plane = data[c]
        values = set()
        for edge in (plane[0], plane[-1], plane[:, 0], plane[:, -1]):
            same = edge[1:] == edge[:-1]
            if int(be.to_host(same.sum())) < FILL_RUN - 1:
                continue
            run = ndi.minimum_filter1d(same.view(xp.uint8), FILL_RUN - 1, mode="constant", cval=0)
            in_runs = be.to_host(edge[xp.flatnonzero(run)])
            values.update(float(v) for v in np.unique(in_runs) if v != 0 and np.isfinite(v))
        if values:  # never the frame's top: a saturated star cut by the edge runs along it too
            values.discard(float(be.to_host(xp.nanmax(plane))))
        if values:  # nor a value of the sky itself (a sky quantized finer than its noise, a floor)
            h, w = plane.shape
            centre = plane[h // 2 - h // 10 : h // 2 + h // 10 + 1, w // 2 - w // 10 : w // 2 + w // 10 + 1]
            values = {v for v in values if float(be.to_host(xp.mean(centre == np.float32(v)))) < FILL_CENTRE_SHARE}
        for value in sorted(values):
            fill = ndi.binary_opening(plane == np.float32(value), structure=xp.ones((3, 3), bool))
            if found is None:
                found = xp.zeros(data.shape, bool)
            found[c] |= fill
    return found


def _scattered_zeros(data):
    """The zero pixels of ``data`` (channels, height, width) that are data (a sky clipped at
    0; :func:`nsg_gpu.stars.scattered_zeros`, as detection reads them), or None where there
    are none. A look at every 8th row first (zeros whose row neighbours hold data), so that a
    frame whose zeros are its registration borders alone pays for no binary opening."""
    edge = EDGE_NO_DATA
    rows = data[:, edge:-edge:SCATTERED_ZERO_ROWS, edge:-edge] == 0
    if not bool((rows[:, :, 1:-1] & ~rows[:, :, :-2] & ~rows[:, :, 2:]).any()):
        return None
    empty = data == 0
    scattered = scattered_zeros(empty, empty)
    return scattered if bool(scattered.any()) else None


def check_coverage(frame: Frame) -> None:
    """Raise :class:`FrameDataError` when the frame holds no data, or too little of it."""
    data = frame.data
    xp = get_backend(data).xp
    covered = float(xp.count_nonzero(data.min(axis=0) > 0)) / (data.shape[1] * data.shape[2])
    empty = [c for c in range(data.shape[0]) if not bool(xp.any(data[c] > 0))] if covered == 0 else []
    if 0 < len(empty) < data.shape[0]:  # a colour frame with a channel empty: that channel named
        names = " and ".join(map(str, empty))
        holds = f"channels {names} hold" if len(empty) > 1 else f"channel {names} holds"
        raise FrameDataError(frame.path, f"{holds} no data (every pixel 0 or not finite) where the others do")
    if covered == 0:
        raise FrameDataError(
            frame.path, "every pixel is 0 or not finite (no data); is the frame empty or a failed registration?"
        )
    if covered < MIN_COVERAGE:
        raise FrameDataError(
            frame.path, f"only {covered:.1%} of the pixels hold data; at least {MIN_COVERAGE:.0%} is needed"
        )


def as_frame(frame, backend: Backend | None = None) -> Frame:
    """A :class:`~nsg_gpu.io.Frame` on ``backend`` from a frame, a path, or an array
    ``(height, width)`` or ``(channels, height, width)`` of data normalized to [0, 1] or in
    ADU."""
    if isinstance(frame, Frame):
        pass
    elif isinstance(frame, (str, bytes)) or hasattr(frame, "__fspath__"):
        frame = read_frame(frame)
    else:
        frame = Frame.from_array(frame)
    if backend is not None and get_backend(frame.data) is not backend:
        held = get_backend(frame.data)
        data = backend.asarray(frame.data) if backend.is_gpu else held.to_host(frame.data)
        frame = dataclasses.replace(frame, data=data)
    return frame


def prepare_reference(frame, params: Parameters | None = None, *, backend: Backend | None = None) -> Reference:
    """Detect the reference's stars, resolve the Auto parameters and sample its background.

    Parameters
    ----------
    frame : Frame, path or array
        The reference: a frame as read by :func:`nsg_gpu.io.read_frame`, a file to read, or
        its data ``(height, width)`` or ``(channels, height, width)``.

    params : Parameters, optional
        Requested parameters; Auto fields are resolved here.

    backend : Backend, optional
        Where image-sized work runs; by default the backend of the frame's data.

    Raises
    ------
    ReferenceFrameError
        The reference cannot be read, has no data or too few stars.
    """
    params = params or Parameters()
    try:
        given = as_frame(frame, backend)
        frame, pedestal = as_measured(given)
        check_coverage(frame)
    except FrameError as exc:
        raise ReferenceFrameError(exc.path, exc.reason) from exc
    with single_threaded_blas():
        reference = _prepare(frame, params)
    reference.pedestal, reference.altered = pedestal, frame is not given
    return reference


def beside_trails(stars: StarCatalog, x, y, geometry: photometry.ApertureGeometry) -> np.ndarray:
    """Which stars at ``(x, y)`` have their annulus of ``geometry`` within
    :data:`TRAIL_CLEARANCE_FWHM` of a trail in the catalogue ``stars`` (host bool)."""
    return near_trails(x, y, stars.trails, geometry.annulus_outer + TRAIL_CLEARANCE_FWHM * stars.fwhm)


def _prepare(frame: Frame, params: Parameters) -> Reference:
    be = get_backend(frame.data)
    data = frame.data
    _, height, width = data.shape
    stars = detect_stars(data, detection_sigma=params.detection_sigma)
    if len(stars) < params.min_star_pairs:
        raise ReferenceFrameError(
            frame.path,
            f"only {len(stars)} stars detected on the reference (at least {params.min_star_pairs} needed); "
            "choose a reference with more stars or lower --detection-sigma",
        )
    image = detection_image(data)
    # NSG's linear range is 0.7 of the reference's brightest pixel in any channel: the stars'
    # peaks are tested in their brightest channel (a star can clip in one channel while its
    # colour intensity, (min + max) / 2, stays lower).
    brightest = float(be.to_host(data.max()))
    try:
        resolved = resolve_parameters(
            params,
            width=width,
            height=height,
            header_focal_length_mm=frame.meta.focal_length_mm,
            header_pixel_size_um=frame.meta.pixel_size_um,
            reference_max=brightest,
            max_star_flux=float(stars.flux.max()),
            n_reference_stars=len(stars),
            white_level=frame.white_level,
        )
    except ParameterError as exc:
        raise ReferenceFrameError(frame.path, str(exc)) from exc
    # A satellite's trail across the reference would be in every target's photometry of the
    # stars beside it (aperture or annulus) and in its samples: those are left out.
    beside = beside_trails(stars, stars.x, stars.y, photometry.geometry_for(stars.fwhm, resolved))
    chosen = (stars.peak < resolved.linear_range) & ~beside
    region = params.region()
    if region is not None:  # NSG's photometry ROI: the scale from the stars within it alone
        x0, y0, x1, y1 = region
        chosen &= (stars.x >= x0) & (stars.x < x1) & (stars.y >= y0) & (stars.y < y1)
    linear = np.nonzero(chosen)[0][:MAX_PHOTOMETRY_STARS]
    if linear.size < params.min_star_pairs:
        within = f", within --photometry-region {params.photometry_region}" if region is not None else ""
        raise ReferenceFrameError(
            frame.path,
            f"only {linear.size} of the {len(stars)} stars detected on the reference peak below the linear "
            f"range ({resolved.linear_range:.4g}) and away from trails{within} (at least {params.min_star_pairs} "
            "needed); raise --linear-range or choose another reference",
        )
    x, y = stars.x[linear], stars.y[linear]
    channel_peak = channel_peaks(data, x, y)
    peak_snr = peak_contrast(image, x, y, stars.fwhm) / max(ksigma_noise(image, max_pixels=DETECT_NOISE_PIXELS), 1e-30)
    alone = isolated(stars, linear, reach=6.0 * stars.fwhm + 4)
    grid = make_grid(height, width, resolved.sample_size)
    if grid.count < MIN_SAMPLES:
        raise ReferenceFrameError(
            frame.path, f"sample size {grid.size} leaves fewer than {MIN_SAMPLES} samples in the image"
        )
    medians, valid = bin_medians(data, grid, frame.white_level)
    n_reject = int(math.floor(len(stars) * min(resolved.limit_sample_stars_percent, 100.0) / 100.0))
    radius = stars.radius[:n_reject] + resolved.aperture_add + resolved.sample_star_growth_rate * stars.flux[:n_reject]
    rejected = star_rejection(grid, stars.x[:n_reject], stars.y[:n_reject], radius)
    rejected |= trail_rejection(grid, stars.trails, TRAIL_CLEARANCE_FWHM * stars.fwhm)
    manual = np.array(params.circles(), float).reshape(-1, 3)
    if len(manual):  # NSG's manual rejection circles, by the stars' rule
        rejected |= star_rejection(grid, manual[:, 0], manual[:, 1], manual[:, 2])
    # The weight's noise: registration does not bias it, nor, read at its step
    # (Reference.noise_step), an upscaling.
    noise = frame_noise(data, step=noise_step(stars.correlation, colour=data.shape[0] > 1))
    circles = np.vstack([manual, np.column_stack([stars.x[:n_reject], stars.y[:n_reject], radius])])
    pixels = pixel_noise(data)
    bright = bright_counts(data, grid, medians, pixels, frame.white_level)
    return Reference(
        frame,
        resolved,
        stars,
        linear,
        channel_peak,
        alone,
        grid,
        medians,
        valid,
        rejected,
        noise,
        peak_snr,
        circles=circles,
        bright=bright,
        pixel_noise=pixels,
    )
