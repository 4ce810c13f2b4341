"""The per-pixel work of a stack: rejection and weighted average, the CUDA kernel and its twin.

:func:`reject_combine` runs the kernel ``reject_combine_f32`` (``kernels/stack.cu``) for CuPy
arrays and its NumPy twin, vectorized over pixels, on the CPU; the two agree bit for bit, and
the result does not depend on the band height, the pixel chunks or the number of threads.
Used by :mod:`nsg_gpu.stacking` band by band, with the settings of :mod:`nsg_gpu.pixel_rejection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import kernels
from .backend import get_backend
from .pixel_rejection import METHOD_CODES, METHODS, THRESHOLDS, Rejection, esd_critical_values

#: Huber iterations of one winsorization at most, and bisection steps of the LAD line fit
#: (``HUBER_ITERATIONS`` and ``LAD_STEPS`` in kernels/stack.cu).
HUBER_ITERATIONS = 100
LAD_STEPS = 48
#: Samples (frames x pixels) the CPU twin works on at a time: bounds its temporaries.
CHUNK_SAMPLES = 1 << 20
#: Bytes per sample of the CPU twin's working set at its peak (sort keys, sorted values in
#: double, masks and temporaries; measured with tracemalloc: 40-80 for the methods, with the
#: chunk's copy of the samples).
TWIN_BYTES_PER_SAMPLE = 96


@dataclass
class BandResult:
    """What :func:`reject_combine` returns for ``n_pixels`` pixels of ``n_frames`` frames.

    Arrays are on the backend of the input.
    """

    master: Any  # float32 (n_pixels,)
    coverage: Any  # int32 (n_pixels,): samples with data
    low: Any  # int32 (n_pixels,): samples rejected low
    high: Any  # int32 (n_pixels,): samples rejected high
    flags: Any  # uint8 (n_frames, n_pixels): 1 rejected low, 2 rejected high, else 0
    frame_low: Any  # int64 (n_frames,): per frame, samples rejected low
    frame_high: Any  # int64 (n_frames,)


def reject_combine(
    values, weights, rejection: Rejection, *, peak=None, noise=None, noise_scale=None, launcher=None
) -> BandResult:
    """Reject outlying samples and average the rest, pixel by pixel.

    Parameters
    ----------
    values : float32 array (n_frames, n_pixels)
        Frame ``i``'s sample of pixel ``p`` at ``[i, p]``; 0 and non-finite samples are no
        data. NumPy or CuPy.

    weights : sequence of float (n_frames,)
        Positive weight of each frame.

    rejection : Rejection
        Resolved settings (:meth:`Rejection.resolve`).

    peak, noise : float32 arrays (n_pixels,), optional
        How far each pixel's median stands above its row's at 3 pixels on either side
        (:func:`peak_excess`) and the sky's noise there (:meth:`NoiseMap.band`): needed where
        noise clipping runs (:meth:`Rejection.needs_noise`). On the backend of ``values``.

    noise_scale : sequence of float (n_frames,), optional
        Noise clipping: each frame's noise over ``noise`` (from inverse-variance weights:
        ``sqrt(w_noise / w_i)`` for the frame ``noise`` was measured on); frames of equal
        noise when not given or all 1.

    launcher : optional
        Runs the ``reject_combine_f32`` kernel (:data:`nsg_gpu.kernels.DEVICE`, or the
        tests' host emulation); CuPy arrays always do.

    Returns
    -------
    BandResult

    Notes
    -----
    For each pixel the ``n`` samples with data are sorted by value (ties by frame); a
    method rejects some, and the master is ``sum(w x) / sum(w)`` over the rest, in double,
    summed in frame order, rounded to float32 (0 where no frame has data). All
    statistics are in double. With ``c`` the centre and ``s`` the scale of a method, a sample
    ``x`` is rejected low when ``(c - x) / s > low`` and high when ``(x - c) / s > high``:

    - ``percentile`` (``n >= 3``): one pass, ``c = s = `` the median (skipped where
      ``1 + median == 1``).
    - ``sigma`` (``n >= 3``): ``c`` the median, ``s`` the sample standard deviation of the
      remaining samples (PixInsight's: robustness comes from the median centre and the
      iteration), repeated until nothing is rejected or fewer than 3 remain.
    - ``winsorized`` (``n >= 3``): as ``sigma`` with ``c, s`` from a Huber winsorization of
      the remaining samples: start from the median and ``1.4826 MAD``, clamp the samples to
      ``c +- 1.5 s`` (in the first outer iteration, those beyond ``cutoff`` sigma are set to
      ``c``), ``c = `` their mean, ``s = 1.134 x`` their standard deviation; repeat until
      ``s`` changes by less than 0.05 % (from the second step; at most
      :data:`HUBER_ITERATIONS`). PixInsight starts from ``1.1926 Sn`` and clamps the
      clamped values again each step; MAD costs O(n) on sorted samples, Sn O(n^2), and
      clamping the original samples each step is Huber's definition.
    - ``esd`` (``n >= 3``): Rosner's generalized ESD: up to ``k = clip(floor(outliers n),
      1, n - 2)`` times, the sample farthest from the mean of the remaining samples in units
      of their standard deviation (low deviations divided by the low relaxation) is removed,
      its statistic ``R_i`` kept; the outliers are the first ``r`` removed, ``r`` the largest
      ``i`` with ``R_i > lambda_i`` (:func:`esd_critical_values`). (PixInsight centres on a
      trimmed mean and stops at the first ``R_i <= lambda_i``.)
    - ``linear`` (``n >= 5``): the sorted samples ``y_j`` against their rank ``j`` are fitted
      by a least-absolute-deviation line ``a + b j`` (bisection of ``b`` in
      ``[0, y_max - y_min]`` on the sign of ``sum j sign(y_j - a - b j)``, ``a`` the median
      of ``y_j - b j``, :data:`LAD_STEPS` steps); ``s = 2 mean|residual| sqrt(1 + b^2)``,
      and a sample is rejected when its distance below (above) the line is at least
      ``low`` (``high``) times ``s``; repeated on the ranks of the remaining samples until
      nothing is rejected or fewer than 3 remain.
    - ``noise`` (``n >= 3``): one pass, ``c`` the median and, for a sample of frame ``i``,
      ``s_i = sqrt(noise^2 f_i + (signal_share * peak)^2)`` from the pixel's noise and peak
      (IRAF imcombine's ``ccdclip``, with the sky's measured noise of each frame for the
      CCD's, and its sensitivity noise on what stands out at a star's scale only), where
      ``f_i = (r_i^2 + q h) / (1 + q)``, ``r_i`` frame ``i``'s ``noise_scale``,
      ``q = pi / (2 n)`` and ``h = (n / sum_j 1 / r_j)^2`` over the pixel's samples: ``q h``
      is the median's variance, so each frame's clean samples go as rarely as in a stack of
      equally noisy frames (where ``f_i = 1``). A sample is an outlier against its own
      frame's noise, not against the others' scatter, so one outlier among 3 can go, a
      noisy frame's clean samples stay and a clean frame's outliers go, and a star, whose
      pixels differ between frames with the seeing and where each frame caught it, keeps its
      light. The ends are clipped from the outside in, each against its own ``s_i``, until
      one is within (skipped where ``1 + sqrt(noise^2 + (signal_share * peak)^2) == 1``).

    A side with ``clip_low`` (``clip_high``) off is never rejected.
    """
    be = get_backend(values)
    launcher = launcher or kernels.launcher_for(be.is_gpu)
    n_frames, n_pixels = values.shape
    weights = np.asarray(weights, np.float64).reshape(-1)
    if weights.size != n_frames:
        raise ValueError(f"{weights.size} weights for {n_frames} frames")
    if rejection.method not in METHOD_CODES or (rejection.method in THRESHOLDS and rejection.low is None):
        raise ValueError("resolve the rejection settings first (Rejection.resolve)")
    if rejection.needs_noise(n_frames):
        if peak is None or noise is None:
            raise ValueError(f"{rejection.describe()}: give the peak and noise of every pixel")
        if len(peak) != n_pixels or len(noise) != n_pixels:
            raise ValueError(f"peak and noise of {len(peak)} and {len(noise)} pixels for {n_pixels}")
        if noise_scale is not None:
            scale = np.asarray(noise_scale, np.float64).reshape(-1)
            if scale.size != n_frames or not np.all(scale > 0):
                raise ValueError(f"noise scales {scale.tolist()} for {n_frames} frames: give one above 0 per frame")
            noise_scale = None if np.all(scale == 1.0) else scale  # equal frames: the common scale
    else:
        peak = noise = noise_scale = None
    if launcher is None:
        if peak is not None:
            peak, noise = np.asarray(peak, np.float32), np.asarray(noise, np.float32)
        return _reject_combine_twin(np.asarray(values, np.float32), weights, rejection, peak, noise, noise_scale)
    xp = be.xp
    values = xp.ascontiguousarray(values, dtype=xp.float32)
    if peak is not None:
        peak = xp.ascontiguousarray(peak, dtype=xp.float32)
        noise = xp.ascontiguousarray(noise, dtype=xp.float32)
    table = None
    stride = 0
    if rejection.method in ("esd", "auto"):
        host_table = esd_critical_values(n_frames, float(rejection.esd_alpha), float(rejection.esd_outliers))
        table = xp.asarray(np.ascontiguousarray(host_table))
        stride = host_table.shape[1]
    sorted_values = xp.empty((n_frames, n_pixels), xp.float32)
    order = xp.empty((n_frames, n_pixels), xp.int32)
    work = xp.empty((n_frames, n_pixels), xp.float64) if rejection.method == "linear" else None
    master = xp.empty(n_pixels, xp.float32)
    coverage = xp.empty(n_pixels, xp.int32)
    low = xp.empty(n_pixels, xp.int32)
    high = xp.empty(n_pixels, xp.int32)
    flags = xp.empty((n_frames, n_pixels), xp.uint8)
    if n_pixels:
        launcher(
            "reject_combine_f32",
            launcher.config("reject_combine_f32", n_pixels),
            (
                values,
                xp.asarray(weights),
                n_frames,
                n_pixels,
                METHOD_CODES[rejection.method],
                xp.asarray(rejection.thresholds()),
                int(bool(rejection.clip_low)),
                int(bool(rejection.clip_high)),
                float(rejection.cutoff),
                table,
                stride,
                float(rejection.esd_outliers),
                float(rejection.esd_low_relaxation),
                peak,
                noise,
                None if noise_scale is None else xp.asarray(noise_scale),
                float(rejection.signal_share),
                sorted_values,
                order,
                work,
                master,
                coverage,
                low,
                high,
                flags,
            ),
        )
    return BandResult(
        master,
        coverage,
        low,
        high,
        flags,
        (flags == 1).sum(axis=1, dtype=xp.int64),
        (flags == 2).sum(axis=1, dtype=xp.int64),
    )


def _reject_combine_twin(
    values: np.ndarray, weights: np.ndarray, rejection: Rejection, peak, noise, noise_scale
) -> BandResult:
    """The NumPy twin of ``reject_combine_f32``, in chunks of pixels."""
    n_frames, n_pixels = values.shape
    step = max(1, CHUNK_SAMPLES // max(1, n_frames))

    def part(start: int, end: int) -> BandResult:
        maps = (None, None) if peak is None else (peak[start:end], noise[start:end])
        return _twin_chunk(np.ascontiguousarray(values[:, start:end]), weights, rejection, *maps, noise_scale)

    parts = [part(start, start + step) for start in range(0, n_pixels, step)] or [part(0, n_pixels)]
    if len(parts) == 1:
        return parts[0]
    return BandResult(
        np.concatenate([p.master for p in parts]),
        np.concatenate([p.coverage for p in parts]),
        np.concatenate([p.low for p in parts]),
        np.concatenate([p.high for p in parts]),
        np.concatenate([p.flags for p in parts], axis=1),
        sum(p.frame_low for p in parts),
        sum(p.frame_high for p in parts),
    )


def _twin_chunk(values: np.ndarray, weights: np.ndarray, rejection: Rejection, peak, noise, noise_scale) -> BandResult:
    n_frames, n_pixels = values.shape
    data = np.isfinite(values) & (values != 0)
    n = _column_counts(data)
    # One sort of 64-bit keys, pixel by pixel: the float bits mapped to an unsigned order
    # (sign bit flipped for positive values, every bit for negative ones; no data last), then
    # the frame: the kernel's (value, frame) order.
    bits = values.view(np.uint32)
    ordered = bits ^ ((values.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000))
    ordered[~data] = 0xFFFFFFFF
    keys = np.ascontiguousarray(ordered.T, dtype=np.uint64)  # (pixels, frames)
    del ordered
    keys <<= np.uint64(32)
    keys |= np.arange(n_frames, dtype=np.uint64)
    keys.sort(axis=1)
    top = (keys >> np.uint64(32)).astype(np.uint32)
    top ^= ((~top).view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    xs = np.ascontiguousarray(top.view(np.float32).T, dtype=np.float64)
    del top
    rows = np.arange(n_frames)[:, None]
    xs[rows >= n] = 0.0
    lo = np.zeros(n_pixels, np.int64)
    hi = n.copy()
    extra_low = np.zeros(n_pixels, np.int64)
    extra_high = np.zeros(n_pixels, np.int64)
    flags = np.zeros((n_frames, n_pixels), np.uint8)
    # Each pixel's method by its count of samples (auto's rule: Rejection.method_for).
    codes = np.array([METHOD_CODES[rejection.method_for(k)] for k in range(n_frames + 1)])[n]
    compacted = np.zeros(n_pixels, bool)  # linear fit: kept samples moved to the front
    for code, method in enumerate(METHODS):
        settings = rejection.concrete(method)
        mine = codes == code
        if method == "percentile":
            cols = np.flatnonzero(mine & (n >= 3))
            centre = _median(xs, lo[cols], hi[cols], cols)
            keep = (1.0 + centre) != 1.0
            cols, centre = cols[keep], centre[keep]
            _clip_ends(xs, lo, hi, cols, centre, centre, settings)
        elif method == "noise":
            cols = np.flatnonzero(mine & (n >= 3))
            if not cols.size:
                continue
            centre = _median(xs, lo[cols], hi[cols], cols)
            spread = settings.signal_share * peak[cols].astype(np.float64)
            sd = noise[cols].astype(np.float64)
            common = np.sqrt(sd * sd + spread * spread)
            keep = (1.0 + common) != 1.0
            if noise_scale is None:  # frames of equal noise: one scale per pixel
                _clip_ends(xs, lo, hi, cols[keep], centre[keep], common[keep], settings)
                continue
            # Only the columns whose ends stand out against a lower bound of every sample's
            # scale (f_i >= min r^2 / (1 + pi / 6) for n >= 3) can clip: the others are left.
            least = np.min(noise_scale) ** 2 / (1.0 + np.pi / 6.0) * (1.0 - 1e-6)
            bound = np.sqrt(sd * sd * least + spread * spread)
            reach = np.zeros(cols.size, bool)
            with np.errstate(divide="ignore", invalid="ignore"):  # a bound of 0: every end reaches
                if settings.clip_low:
                    reach |= ~((centre - xs[lo[cols], cols]) / bound <= settings.low)
                if settings.clip_high:
                    reach |= ~((xs[hi[cols] - 1, cols] - centre) / bound <= settings.high)
            keep &= reach
            cols, centre, spread, sd = cols[keep], centre[keep], spread[keep], sd[keep]
            scale = _own_scales(keys, data, cols, n[cols], noise_scale, sd, spread)
            _clip_ends(xs, lo, hi, cols, centre, scale, settings)
        elif method in ("sigma", "winsorized"):
            _iterative_clip(xs, lo, hi, np.flatnonzero(mine & (n >= 3)), settings)
        elif method == "esd":
            _esd(xs, n, lo, hi, np.flatnonzero(mine & (n >= 3)), settings)
        elif method == "linear":
            cols = np.flatnonzero(mine & (n >= 5))
            if cols.size:
                order = np.zeros((n_frames, n_pixels), np.int32)  # the frame of each sorted sample
                order[:, cols] = (keys[cols] & np.uint64(0xFFFFFFFF)).astype(np.int32).T
                rejected_low, rejected_high, kept = _linear_fit(xs, order, flags, n, cols, settings)
                extra_low[cols] = rejected_low
                extra_high[cols] = rejected_high
                hi[cols] = kept
                compacted[cols] = True
    # A method never rejects every sample of a pixel: such a pixel keeps them all.
    emptied = (hi <= lo) & ~compacted
    lo[emptied] = 0
    hi[emptied] = n[emptied]
    coverage = n.copy()
    n_kept_range = np.where(compacted, hi, n)  # compacted columns end at the kept count
    # Flags of the contiguous methods, by frame: a sample is rejected low when its (value,
    # frame) key is below the first kept one's, high when above the last kept one's.
    contiguous = np.flatnonzero(~compacted & ((lo > 0) | (hi < n)))
    if contiguous.size:
        first = keys[contiguous, lo[contiguous]]
        last = keys[contiguous, hi[contiguous] - 1]
        frame_keys = _frame_keys(values[:, contiguous])
        valid = data[:, contiguous]
        sub = flags[:, contiguous]
        sub[valid & (frame_keys < first)] = 1
        sub[valid & (frame_keys > last)] = 2
        flags[:, contiguous] = sub
        del frame_keys
    del keys
    # The average in frame order (the kernel's), over the samples with data not rejected.
    kept = data & (flags == 0)
    weighted = np.zeros(n_pixels)
    total = np.zeros(n_pixels)
    for i in range(n_frames):
        weighted += np.where(kept[i], weights[i] * values[i].astype(np.float64), 0.0)
        total += np.where(kept[i], weights[i], 0.0)
    del kept
    mean = np.zeros(n_pixels)
    np.divide(weighted, total, out=mean, where=total > 0)
    low_count = (lo + extra_low).astype(np.int32)
    high_count = (n_kept_range - hi + extra_high).astype(np.int32)
    return BandResult(
        mean.astype(np.float32),
        coverage.astype(np.int32),
        low_count,
        high_count,
        flags,
        _row_counts(flags == 1),
        _row_counts(flags == 2),
    )


def _column_counts(mask: np.ndarray) -> np.ndarray:
    """The True values of each column of a (frames, pixels) mask, int64: summed as bytes where
    no count can pass 255 (a bool summed into int64 is cast sample by sample)."""
    if mask.shape[0] <= np.iinfo(np.uint8).max:
        return np.add.reduce(mask.view(np.uint8), axis=0, dtype=np.uint8).astype(np.int64)
    return mask.sum(axis=0, dtype=np.int64)


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """The True values of each row of a (frames, pixels) mask, int64 (one count per row)."""
    return np.array([np.count_nonzero(row) for row in mask], np.int64)


def _frame_keys(values: np.ndarray) -> np.ndarray:
    """The (value, frame) sort keys of ``values`` (frames, pixels), unsorted (data or not)."""
    ordered = values.view(np.uint32) ^ ((values.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000))
    keys = ordered.astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.arange(values.shape[0], dtype=np.uint64)[:, None]
    return keys


def _median(xs, lo, hi, cols):
    return (xs[(lo + hi - 1) // 2, cols] + xs[(lo + hi) // 2, cols]) * 0.5


def _rows_sum(matrix: np.ndarray) -> np.ndarray:
    """Column sums of ``matrix`` added row after row (the kernel's order; no pairwise sums)."""
    total = np.zeros(matrix.shape[1])
    for row in matrix:
        total += row
    return total


def _window(xs, lo, hi, cols):
    """The sorted samples of columns ``cols`` up to their largest ``hi``, and which of them
    lie in ``[lo, hi)``."""
    top = int(hi.max(initial=0))
    block = xs[:top] if cols.size == xs.shape[1] else xs[:top, cols]
    ranks = np.arange(top)[:, None]
    return block, (ranks >= lo) & (ranks < hi)


def _sigma(block, inside, count):
    mean = _rows_sum(np.where(inside, block, 0.0)) / count
    d = block - mean
    return np.sqrt(_rows_sum(np.where(inside, d * d, 0.0)) / (count - 1))


def _own_scales(keys, data, cols, n, noise_scale, sd, spread):
    """Noise clipping's scale of the samples of ``cols``: a function of (sorted positions,
    indices into ``cols``) giving ``sqrt(sd^2 f_i + spread^2)`` for those samples, with
    ``f_i = (r_i^2 + q h) / (1 + q)``, ``r_i`` the sample's frame's share of the noise,
    ``q = pi / (2 n)`` and ``h = (n / sum_j 1 / r_j)^2`` over the pixel's ``n`` samples (summed
    in frame order), so that ``q h`` is the median's variance (in units of ``sd^2``) and each
    frame's false rejections are as in a stack of equally noisy frames (``f_i = 1`` there).
    Only the ends that clipping reaches are computed."""
    inverse = 1.0 / noise_scale
    total = np.zeros(cols.size)
    for i in range(noise_scale.size):
        total += np.where(data[i, cols], inverse[i], 0.0)
    h = n / total
    h *= h
    q = np.pi / (2.0 * n)
    qh, norm = q * h, 1.0 + q

    frames = keys.shape[1]
    flat = keys.reshape(-1)

    def at(j: np.ndarray, active: np.ndarray) -> np.ndarray:
        share = noise_scale[(flat[cols[active] * frames + j] & np.uint64(0xFFFFFFFF)).astype(np.intp)]
        own = sd[active] * np.sqrt((share * share + qh[active]) / norm[active])
        return np.sqrt(own * own + spread[active] * spread[active])

    return at


def _clip_ends(xs, lo, hi, cols, centre, scale, rejection: Rejection) -> None:
    """Move ``lo`` up and ``hi`` down over the samples beyond the thresholds (in place);
    ``scale`` per column, or a function of (sorted positions, indices into ``cols``)."""
    last = xs.shape[0] - 1
    for side in ("low", "high"):
        if not (rejection.clip_low if side == "low" else rejection.clip_high):
            continue
        threshold = rejection.low if side == "low" else rejection.high
        active = np.arange(cols.size)
        while active.size:
            c = cols[active]
            if side == "low":
                j = np.minimum(lo[c], last)
                x = xs[j, c]
                s = scale(j, active) if callable(scale) else scale[active]
                move = (lo[c] < hi[c]) & ((centre[active] - x) / s > threshold)
            else:
                j = np.maximum(hi[c] - 1, 0)
                x = xs[j, c]
                s = scale(j, active) if callable(scale) else scale[active]
                move = (hi[c] > lo[c]) & ((x - centre[active]) / s > threshold)
            active = active[move]
            if side == "low":
                lo[cols[active]] += 1
            else:
                hi[cols[active]] -= 1


def _iterative_clip(xs, lo, hi, cols, rejection: Rejection) -> None:
    """Sigma or winsorized sigma clipping, every column in lockstep until it is done."""
    iteration = 0
    while cols.size:
        l0, h0 = lo[cols].copy(), hi[cols].copy()
        block, inside = _window(xs, l0, h0, cols)
        count = (h0 - l0).astype(np.float64)
        if rejection.method == "sigma":
            scale = _sigma(block, inside, count)
            centre = _median(xs, l0, h0, cols)
        else:
            cutoff = rejection.cutoff if iteration == 0 else 0.0
            centre, scale = _winsorize(block, inside, count, _median(xs, l0, h0, cols), cutoff)
        del block, inside
        live = (1.0 + scale) != 1.0
        cols, centre, scale, l0, h0 = cols[live], centre[live], scale[live], l0[live], h0[live]
        _clip_ends(xs, lo, hi, cols, centre, scale, rejection)
        changed = (lo[cols] != l0) | (hi[cols] != h0)
        cols = cols[changed & ((hi[cols] - lo[cols]) >= 3)]
        iteration += 1


def _mad(block, inside, count, mu):
    distance = np.where(inside, np.abs(block - mu), np.inf)
    distance.sort(axis=0)
    index = np.arange(mu.size)
    return (distance[(count - 1) // 2, index] + distance[count // 2, index]) * 0.5


def _winsorize(block, inside, count, mu, cutoff: float):
    """Huber winsorization of each column's samples in ``inside``: (centre, sigma)."""
    mu = mu.copy()
    sigma = 1.4826 * _mad(block, inside, (count + 0.5).astype(np.int64), mu)
    kept = np.arange(mu.size)  # the columns block/inside hold
    live = np.ones(mu.size, bool)  # which of them still iterate
    for k in range(HUBER_ITERATIONS):
        live &= (1.0 + sigma[kept]) != 1.0
        if not live.any():
            break
        if live.sum() < 0.5 * kept.size:  # drop finished columns from the working matrices
            block, inside, kept, live = block[:, live], inside[:, live], kept[live], live[live]
        m, s = mu[kept], sigma[kept]
        s = np.where(live, s, 1.0)  # finished columns compute harmless values, kept below
        t0, t1 = m - 1.5 * s, m + 1.5 * s
        if cutoff > 0:
            below = np.where(block <= m - cutoff * s, m, t0)
            above = np.where(block >= m + cutoff * s, m, t1)
            v = np.where(block < t0, below, np.where(block > t1, above, block))
        else:
            v = np.minimum(np.maximum(block, t0), t1)
        mean = _rows_sum(np.where(inside, v, 0.0)) / count[kept]
        d = v - mean
        new_sigma = 1.134 * np.sqrt(_rows_sum(np.where(inside, d * d, 0.0)) / (count[kept] - 1))
        sigma[kept] = np.where(live, new_sigma, sigma[kept])
        mu[kept] = np.where(live, mean, mu[kept])
        if k >= 1:
            live &= ~(np.abs(s - new_sigma) / s < 0.0005)
    return mu, sigma


def _esd(xs, n, lo, hi, cols, rejection: Rejection) -> None:
    if not cols.size:
        return
    table = esd_critical_values(xs.shape[0], float(rejection.esd_alpha), float(rejection.esd_outliers))
    count = n[cols]
    tests = np.minimum(np.maximum((rejection.esd_outliers * count.astype(np.float64)).astype(np.int64), 1), count - 2)
    zero = np.zeros(cols.size, np.int64)
    shift = _median(xs, zero, count, cols)
    block, inside = _window(xs, zero, count, cols)
    y = block - shift
    s1 = _rows_sum(np.where(inside, y, 0.0))
    s2 = _rows_sum(np.where(inside, y * y, 0.0))
    del inside, y
    # Every column steps in lockstep, full width (masks rather than shrinking index sets):
    # a column leaves for good when its tests are done or its samples are all equal.
    flat = np.ascontiguousarray(block).reshape(-1)
    width = cols.size
    index = np.arange(width)
    limits = table[count]  # (columns, tests)
    low_end, high_end = zero.copy(), count.copy()
    best_low, best_high = zero.copy(), count.copy()
    live = np.ones(width, bool)
    relaxation = float(rejection.esd_low_relaxation)
    for i in range(int(tests.max())):
        live &= tests > i
        size = (high_end - low_end).astype(np.float64)
        mean = s1 / size
        variance = (s2 - s1 * mean) / (size - 1.0)
        live &= variance > 0.0
        if not live.any():
            break
        sd = np.sqrt(np.where(live, variance, 1.0))
        y_low = flat[low_end * width + index] - shift
        y_high = flat[(high_end - 1) * width + index] - shift
        d_low = (mean - y_low) / (sd * relaxation)
        d_high = (y_high - mean) / sd
        take_high = d_high >= d_low
        statistic = np.where(take_high, d_high, d_low)
        y = np.where(take_high, y_high, y_low)
        high_end -= take_high & live
        low_end += ~take_high & live
        s1 = np.where(live, s1 - y, s1)
        s2 = np.where(live, s2 - y * y, s2)
        exceed = live & (statistic > limits[:, i])
        best_low = np.where(exceed, low_end, best_low)
        best_high = np.where(exceed, high_end, best_high)
    lo[cols] = best_low if rejection.clip_low else 0
    hi[cols] = best_high if rejection.clip_high else count


def _lad_intercept(z, inside, m, slope, ranks):
    residual = np.where(inside, z - slope * ranks, np.inf)
    residual.sort(axis=0)
    index = np.arange(m.size)
    return (residual[(m - 1) // 2, index] + residual[m // 2, index]) * 0.5


def _lad_fit(z, m):
    """Least-absolute-deviation lines through the first ``m`` values of each column."""
    ranks = np.arange(z.shape[0], dtype=np.float64)[:, None]
    inside = ranks < m
    index = np.arange(m.size)
    spread = z[m - 1, index] - z[0, index]
    bl, bh = np.zeros(m.size), spread.copy()
    for _ in range(LAD_STEPS):
        bm = (bl + bh) * 0.5
        am = _lad_intercept(z, inside, m, bm, ranks)
        residual = (z - bm * ranks) - am
        g = np.where(inside, np.where(residual > 0, ranks, np.where(residual < 0, -ranks, 0.0)), 0.0).sum(axis=0)
        positive = g > 0
        bl = np.where(positive, bm, bl)
        bh = np.where(positive, bh, bm)
    slope = np.where(spread > 0, (bl + bh) * 0.5, 0.0)
    intercept = _lad_intercept(z, inside, m, slope, ranks)
    adev = np.zeros(m.size)
    for j in range(z.shape[0]):
        adev += np.where(inside[j], np.abs((z[j] - slope * float(j)) - intercept), 0.0)
    return intercept, slope, adev / m


def _linear_fit(xs, order, flags, n, cols, rejection: Rejection):
    """Linear fit clipping of the columns ``cols``; the kept samples are compacted to the
    front of ``xs``/``order`` and rejected ones flagged. Returns (low, high, kept counts)."""
    n_frames = xs.shape[0]
    z = xs[:, cols].copy()
    frames = order[:, cols].copy()
    m = n[cols].copy()
    rejected_low = np.zeros(cols.size, np.int64)
    rejected_high = np.zeros(cols.size, np.int64)
    ranks = np.arange(n_frames)[:, None]
    live = np.arange(cols.size)
    while live.size:
        a, b, adev = _lad_fit(z[:, live], m[live])
        s = (2.0 * adev) * np.sqrt(1.0 + b * b)
        go = (1.0 + s) != 1.0
        live, a, b, s = live[go], a[go], b[go], s[go]
        if not live.size:
            break
        zl, fl, ml = z[:, live], frames[:, live], m[live]
        inside = ranks < ml
        fit = a + b * ranks.astype(np.float64)
        below = zl < fit
        low = inside & below & rejection.clip_low & ((fit - zl) / s >= rejection.low)
        high = inside & ~below & rejection.clip_high & ((zl - fit) / s >= rejection.high)
        for mask, flag in ((low, 1), (high, 2)):
            j, k = np.nonzero(mask)
            flags[fl[j, k], cols[live[k]]] = flag
        rejected_low[live] += low.sum(axis=0)
        rejected_high[live] += high.sum(axis=0)
        kept = inside & ~(low | high)
        new_m = kept.sum(axis=0)
        permutation = np.argsort(np.where(kept, ranks, n_frames + ranks), axis=0, kind="stable")
        z[:, live] = np.take_along_axis(zl, permutation, axis=0)
        frames[:, live] = np.take_along_axis(fl, permutation, axis=0)
        changed = new_m != ml
        m[live] = new_m
        live = live[changed & (new_m >= 3)]
    xs[:, cols] = z
    order[:, cols] = frames
    return rejected_low, rejected_high, m
