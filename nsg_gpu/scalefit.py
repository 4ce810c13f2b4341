"""The scale fit: ``m`` per channel from the stars' paired fluxes, and how sure it is.

Without photometric errors the scale is NSG's: an L1 line with intercept (origin-forced least
squares below 6 pairs), a flux-ratio tolerance around it, and the removal of the farthest
pairs one at a time (:func:`nsg_selection`). With errors (what the scale stage passes), NSG's
tolerance and removal keep their meaning around a robust centre, and the scale is the
noise-weighted fit through the origin of every pair they keep, faint ones included
(:func:`fit_scale`, :func:`weighted_ratio`):

- **Errors in both frames.** The fit minimizes ``sum (y - m x)^2 / (sy^2 + m^2 sx^2 + ...)``
  (the effective-variance, or York, fit through the origin), which stays unbiased when the
  target's fluxes are as noisy as the reference's; an ordinary weighted fit of ``y`` on ``x``
  is biased low by the target's noise, by a few per cent for stars at signal-to-noise 5.
- **Scatter beyond the photometric errors.** Stars whose light is not conserved between the
  frames (an undersampled star on a colour sensor's single photosite of red or blue, a
  variable star, a flat-field error) scatter more than their noise says. A relative scatter
  ``epsilon`` per channel, chosen so that the robust spread (1.4826 MAD) of the
  error-normalized residuals is 1, joins every pair's variance. The brightest stars then no
  longer outweigh all others where their own photometric error is small but their
  scatter is not, and the uncertainty of ``m`` is honest.
- **Outliers.** Tukey's biweight on the normalized residuals (``c = 4.685``), so that a pair
  spoiled by a hot pixel, a cosmic ray or a neighbour does not pull ``m``.

The uncertainty is the fit's standard error: the larger of ``1.026 / sqrt(sum beta^2 /
sigma^2)`` over the pairs the biweight keeps (1.026: the biweight's Gaussian efficiency of
95 %) and the sandwich estimate of the same fit, which stays honest where the residuals are
not Gaussian. It is never smaller than the photometric errors allow. Where the scatter was
estimated from the pairs themselves, the error takes Student's factor for the pairs' effective
number, and below :data:`FEW_PAIRS` kept pairs the scatter behind it is the larger of the
robust and the classical (chi-square) estimates: a sparse field's three to five pairs give a
robust spread that is often far too small. A fit that the rejection would leave with fewer
pairs than a scale needs keeps them all (:func:`fit_scale`, step 4). The scale stage adds the
seeing correction's own uncertainty (:func:`nsg_gpu.scale.correction_uncertainty`).

In the flow: called by the scale stage (:mod:`nsg_gpu.scale`) once per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

__all__ = [
    "ScaleFit",
    "median",
    "l1_line",
    "nsg_selection",
    "weighted_ratio",
    "fit_scale",
    "scale_doubt",
    "BIWEIGHT_C",
    "UNCERTAIN_SCALE",
    "CHANNELS_DISAGREE_P",
]

#: Tukey's biweight tuning constant, in units of the normalized residuals' spread (95 %
#: Gaussian efficiency).
BIWEIGHT_C = 4.685
#: Its Gaussian efficiency, as a factor on the standard error.
_EFFICIENCY = 1 / math.sqrt(0.95)
#: Normal-consistent MAD factor.
_MAD = 1.4826
#: A frame whose transmission is less certain than this in any channel (relative standard
#: error) is flagged: its scale moves its pixels by more than the stars can vouch for.
UNCERTAIN_SCALE = 0.03
#: A colour frame's channels disagree when the chi-square of their transmissions about the
#: error-weighted mean has a probability below this (3.3 sigma): more than a grey change of
#: transmission (exposure, thin cloud) explains, within the errors.
CHANNELS_DISAGREE_P = 0.001
#: A scale fitted from fewer star pairs than this (in its best channel) is flagged, as NSG
#: flags it: two pairs cannot show an outlier, one of them cannot be left out, and their
#: scatter, with one degree of freedom, is itself a guess.
FEW_STAR_PAIRS = 3


def median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float64 array, to the bit, without its generic machinery (the
    line fits call it thousands of times per frame on a thousand values): the middle
    element, or the mean of the middle two, of one partition."""
    n = values.size
    if n == 0 or np.isnan(values).any():
        return np.median(values)
    k = n // 2
    if n % 2:
        return np.partition(values, k)[k]
    part = np.partition(values, [k - 1, k])
    return (part[k - 1] + part[k]) / 2


def l1_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The straight line ``y = m x + b`` minimizing the sum of absolute deviations.

    The slope is bracketed and bisected on the sign-weighted sum of residuals with
    ``b = median(y - m x)`` (the classic ``medfit`` method, as PCL's ``LinearFit``).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0:
        return (float(np.sum(x * y) / np.sum(x * x)) if np.any(x) else 1.0), 0.0

    def balance(m):
        b = median(y - m * x)
        return float(np.sum(x * np.sign(y - m * x - b))), b

    m_ls, _ = np.polyfit(x, y, 1)
    chisq = np.sum((y - np.polyval(np.polyfit(x, y, 1), x)) ** 2)
    sigma_m = math.sqrt(chisq / max(np.sum((x - x.mean()) ** 2), 1e-300)) + 1e-12 * abs(m_ls)
    lo, hi = m_ls - 3 * sigma_m, m_ls + 3 * sigma_m
    f_lo, _ = balance(lo)
    f_hi, _ = balance(hi)
    for _ in range(60):
        if f_lo * f_hi <= 0:
            break
        lo, hi = lo - 2 * (hi - lo), hi + 2 * (hi - lo)
        f_lo, _ = balance(lo)
        f_hi, _ = balance(hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        f_mid, _ = balance(mid)
        if f_mid == 0:
            lo = hi = mid
            break
        if f_mid * f_lo > 0:
            lo, f_lo = mid, f_mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(abs(mid), 1e-300):
            break
    m = 0.5 * (lo + hi)
    return float(m), float(balance(m)[1])


def _calculate_scale(x, y) -> tuple[float, float]:
    """NSG's estimator: origin-forced least squares below 6 pairs, the L1 line otherwise."""
    if x.size < 6:
        return float(np.sum(x * y) / np.sum(x * x)), 0.0
    return l1_line(x, y)


@dataclass
class ScaleFit:
    """The scale of one channel and the pairs behind it."""

    scale: float
    intercept: float  # of NSG's line (reported, never applied); 0 for the weighted fit
    used: np.ndarray  # bool mask over the input pairs: those with a say in the scale
    n_pairs: int
    scale_error: float = float("nan")  # one-sigma standard error of ``scale``
    scatter: float = 0.0  # relative scatter of the pairs beyond their photometric errors


def nsg_selection(x: np.ndarray, y: np.ndarray, *, tolerance: float, outlier_removal: float):
    """NSG's pair selection and line: ``(m, b, kept)``.

    An initial fit (:func:`l1_line`, or the ratio median for two pairs), the pairs whose
    ratio ``y/x`` lies outside ``[m0 / tolerance, m0 * tolerance]`` dropped, then the pair
    farthest from the line removed ``round(n * outlier_removal / 100)`` times, refitting
    each time.
    """
    n = x.size
    kept = np.ones(n, bool)
    if n == 0:
        return 1.0, 0.0, kept
    m0, _ = _calculate_scale(x, y) if n > 2 else (float(np.median(y / x)), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = y / x
    kept &= (ratio >= m0 / tolerance) & (ratio <= m0 * tolerance)
    n_remove = int(math.floor(kept.sum() * outlier_removal / 100 + 0.5))
    for _ in range(n_remove):
        if kept.sum() < 4:
            break
        m, b = _calculate_scale(x[kept], y[kept])
        distance = np.abs(m * x - y + b) / math.sqrt(m * m + 1)
        distance[~kept] = -1
        kept[int(np.argmax(distance))] = False
    if not kept.any():
        return 1.0, 0.0, kept
    m, b = _calculate_scale(x[kept], y[kept])
    return float(m), float(b), kept


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def _spread(r, sy2, m2sx2, level2, scatter: float, say=None) -> float:
    """The normalized residuals' spread: 1.4826 times their median, or, with ``say``, their
    median weighted by each pair's say in the fit (``x^2 / sigma^2``)."""
    variance = sy2 + m2sx2 + scatter * scatter * level2
    normalized = np.abs(r) / np.sqrt(variance)
    if say is None:
        return _MAD * float(median(normalized))
    return _MAD * _weighted_median(normalized, say / variance)


def _scatter(r, sy2, m2sx2, level2, say=None) -> float:
    """The relative scatter ``epsilon`` that brings the normalized residuals' spread to 1."""
    return _smallest_scatter(lambda eps: _spread(r, sy2, m2sx2, level2, eps, say) > 1)


def _smallest_scatter(too_small) -> float:
    """The smallest relative scatter ``epsilon`` (to 1e-4 of itself) that ``too_small`` no
    longer holds for, 0 where it does not hold at 0; ``too_small`` must turn false as epsilon
    grows (the residuals, normalized by a variance that grows with it, shrink)."""
    if not too_small(0.0):
        return 0.0
    lo, hi = 0.0, 0.05
    while too_small(hi) and hi < 1e3:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if too_small(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-4 * hi:
            break
    return hi


def _level2(x, y, m: float, *, power: float = 0.5) -> np.ndarray:
    """The squared flux level that a relative scatter multiplies, in reference units.

    ``(m x)^2 (y / m x)^power``. The reweighted fit with weights ``1 / level2`` (where the
    scatter dominates) moves ``m`` to ``m sum(k^(1 - power)) / sum(k^-power)``, ``k = y / m x``:
    with ``power = 0.5`` its fixed point is the centre of the ratios for any scatter
    symmetric in log (a lognormal one), where a level from ``m x`` alone (``power = 0``)
    would put it at ``exp(sigma^2 / 2)`` times the centre, and ``(y + m x) / 2`` would weigh
    high ratios down. ``power = 1`` is the symmetric level ``m x y``, against which the
    residuals are judged. Pairs with a flux at or below 0 (faint ones, whose photometric
    error dominates) take the mean of the two.
    """
    mx = m * x
    positive = (mx > 0) & (y > 0)
    safe_mx, safe_y = np.where(positive, mx, 1.0), np.where(positive, y, 1.0)
    return np.where(positive, safe_mx**2 * (safe_y / safe_mx) ** power, (0.5 * (np.abs(y) + np.abs(mx))) ** 2)


def _standard_error(r, beta, x, variance, judging, keep, *, robust: bool = True) -> float:
    """The larger of the model's standard error (normalized residuals of unit spread, the
    biweight's Gaussian efficiency) and the sandwich (Huber) estimate, which holds where the
    residuals are not Gaussian (a lognormal scatter, a few pairs carrying the fit); without
    ``robust``, those of the plain weighted fit. ``r`` are the residuals, ``variance`` the
    fit's weights' and ``judging`` the biweight's (:func:`weighted_ratio`): each pair's
    estimating term is ``say beta r / variance``, its say from ``r / sqrt(judging)``."""
    information = float(np.sum(beta[keep] ** 2 / variance[keep]))
    model = (_EFFICIENCY if robust else 1.0) / math.sqrt(information)
    n = int(keep.sum())
    if n < 3:
        return model
    if robust:
        t = np.where(keep, r / (BIWEIGHT_C * np.sqrt(judging)), 0.0)
        say = np.where(keep, (1 - t * t) ** 2, 0.0)
        slope = np.where(keep, (1 - t * t) * (1 - 5 * t * t), 0.0)
    else:
        say, slope = keep.astype(float), keep.astype(float)
    bread = float(np.sum(slope * beta * x / variance))
    meat = float(np.sum((say * r * beta / variance) ** 2))
    sandwich = math.sqrt(meat * n / (n - 1)) / abs(bread) if bread > 0 else math.inf
    return max(model, sandwich)


def _weighted_pairs(x, r, m: float, sx2, variance, judging, say, keep, robust: bool):
    """Each pair's true target flux given ``m`` (York: the fit's "x" without its noise), its
    weight in the fit (its ``say`` over its ``variance``), and the fit's standard error."""
    beta = x + r * m * sx2 / variance
    return beta, say / variance, _standard_error(r, beta, x, variance, judging, keep, robust=robust)


def weighted_ratio(x, y, sx, sy, m: float, *, iterations: int = 50, robust: bool = True):
    """The noise-weighted robust fit of ``y = m x`` from the start ``m``; without ``robust``,
    every pair is kept (no biweight).

    Returns
    -------
    m, error, scatter, keep
        The scale, its standard error, the relative scatter beyond the errors, and the pairs
        the biweight keeps.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    sy2, sx2 = np.asarray(sy, float) ** 2, np.asarray(sx, float) ** 2
    # A pair without an error (noise-free data) still gets a variance, a rounding error's.
    sy2 = np.maximum(sy2, 1e-24 * y * y + 1e-300)
    keep = np.ones(x.size, bool)
    error, scatter = float("nan"), 0.0
    for _ in range(iterations):
        r = y - m * x
        # Residuals are judged (spread, scatter, biweight) against the symmetric level
        # ``sqrt(m x y)``, so that a ratio high by a factor and one low by it weigh alike;
        # the fit's weights use :func:`_level2`, whose fixed point is the ratios' centre.
        level2 = _level2(x, y, m, power=1.0)
        m2sx2 = m * m * sx2
        # The scatter that all pairs show, or that the pairs which carry the fit show, whichever
        # is larger: many faint pairs with honest errors must not hide the excess scatter
        # of the few bright ones that decide the scale, nor those few (whose spread is
        # itself uncertain) the faint ones'.
        scatter = max(_scatter(r, sy2, m2sx2, level2), _scatter(r, sy2, m2sx2, level2, x * x))
        judging = sy2 + m2sx2 + scatter * scatter * level2
        variance = sy2 + m2sx2 + scatter * scatter * _level2(x, y, m)
        u = r / (BIWEIGHT_C * np.sqrt(judging))
        say = np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0) if robust else np.ones(x.size)
        keep = say > 0
        if keep.sum() < 2:
            break
        beta, w, error = _weighted_pairs(x, r, m, sx2, variance, judging, say, keep, robust)
        m_new = float(np.sum(w * beta * y) / np.sum(w * beta * x))
        converged = abs(m_new - m) <= 1e-10 * abs(m)
        m = m_new
        if converged:
            break
    if 2 <= keep.sum() < FEW_PAIRS:
        # A robust spread of so few residuals is itself a guess: the classical one (their
        # chi-square at n - 1), where larger, sets the uncertainty (not the fit).
        r, level2 = y - m * x, _level2(x, y, m)
        classical = _chi2_scatter(r[keep], sy2[keep], (m * m * sx2)[keep], level2[keep])
        if classical > scatter:
            variance = sy2 + m * m * sx2 + classical * classical * level2
            beta, w, error = _weighted_pairs(x, r, m, sx2, variance, judging, say, keep, robust)
            scatter = classical
    if scatter > 0 and keep.sum() >= 2:
        error *= _small_sample_factor(w[keep] * beta[keep] ** 2)
    return m, error, scatter, keep


#: Below this many pairs the scatter that sets a fit's uncertainty is the larger of the robust
#: and the classical estimates.
FEW_PAIRS = 10


def _chi2_scatter(r, sy2, m2sx2, level2) -> float:
    """The relative scatter that brings the residuals' chi-square to ``n - 1``."""
    return _smallest_scatter(lambda eps: float(np.sum(r * r / (sy2 + m2sx2 + eps * eps * level2))) > r.size - 1)


#: The normal distribution's one-sigma quantile. (The distributions here are scipy.special's
#: functions, which scipy.stats's call: stats takes half a second to import.)
_ONE_SIGMA = float(special.ndtr(1.0))


def _small_sample_factor(information: np.ndarray) -> float:
    """Student's factor on a standard error whose variance was estimated from the pairs' own
    scatter: its one-sigma quantile with ``n - 1`` degrees of freedom, ``n`` the pairs'
    effective number (Kish's, from each pair's share of the information). 1.32 for three
    equal pairs, 1.06 for ten, 1.01 for fifty."""
    squares = float(np.sum(information**2))
    if not squares > 0:
        return 1.0
    n = float(np.sum(information)) ** 2 / squares
    return float(special.stdtrit(max(n - 1.0, 1.0), _ONE_SIGMA))  # Student's t quantile


def fit_scale(
    target_flux: np.ndarray,
    reference_flux: np.ndarray,
    *,
    target_error: np.ndarray | None = None,
    reference_error: np.ndarray | None = None,
    tolerance: float = 1.5,
    outlier_removal: float = 2.0,
    judged: np.ndarray | None = None,
    min_pairs: int = 3,
) -> ScaleFit:
    """Fit ``reference = m * target`` robustly; ``m`` is the scale.

    Without errors this is NSG's procedure and line (:func:`nsg_selection`). With them:

    1. the start ``m0`` is the median flux ratio of the ``judged`` pairs (the confident ones),
       a centre that a few stray bright pairs cannot move (NSG's L1 line with an intercept
       can be far off where the pairs scatter by tens of per cent);
    2. NSG's tolerance drops the judged pairs whose ratio lies outside
       ``[m0 / tolerance, m0 * tolerance]``, the tolerance widened to 3 robust sigmas of
       their log ratios where they scatter more; fainter pairs are not judged by their ratio,
       which their noise alone spreads (a cut there would clip it asymmetrically);
    3. :func:`weighted_ratio` fits the rest; then the ``outlier_removal`` per cent of them
       with the largest error-normalized residuals are left out (NSG's removal of the
       farthest pairs, measured in each pair's own errors) and the fit is repeated;
    4. where that leaves fewer than ``min_pairs``, or fewer than all of fewer pairs, every
       pair is fitted and kept (no tolerance, no biweight): among three or four pairs an outlier cannot be
       told from the scatter (a red star of a colour sensor 30 % off its share, beside two
       at signal-to-noise 2), and a scale with the uncertainty of all of them (flagged where
       large) serves better than a failed frame.

    Parameters
    ----------
    target_flux, reference_flux : ndarray (n,)
        Matched fluxes (x is the target, y the reference).

    target_error, reference_error : ndarray (n,), optional
        One-sigma errors of the fluxes.

    tolerance : float
        NSG's flux-ratio tolerance.

    outlier_removal : float
        Percentage of the pairs removed as outliers (NSG).

    judged : ndarray (n,) of bool, optional
        The pairs bright enough for the ratio tolerance (all by default; all as well where
        fewer than 3 are).

    min_pairs : int
        The fewest pairs a scale is fitted from (step 4).
    """
    x = np.asarray(target_flux, float)
    y = np.asarray(reference_flux, float)
    n = x.size
    if n == 0:
        return ScaleFit(1.0, 0.0, np.ones(0, bool), 0)
    if target_error is None or reference_error is None:
        m, b, used = nsg_selection(x, y, tolerance=tolerance, outlier_removal=outlier_removal)
        return ScaleFit(m, b, used, int(used.sum()))
    sx, sy = np.asarray(target_error, float), np.asarray(reference_error, float)
    sy = np.maximum(sy, 1e-12 * np.abs(y) + 1e-150)  # as in weighted_ratio
    judged = np.ones(n, bool) if judged is None else np.asarray(judged, bool)
    positive = (x > 0) & (y > 0)
    if (judged & positive).sum() < 3:
        judged = np.ones(n, bool)
    centre = judged & positive
    if not centre.any():
        return ScaleFit(1.0, 0.0, np.zeros(n, bool), 0)
    logs = np.log(y[centre] / x[centre])
    m0 = float(np.exp(np.median(logs)))
    # NSG's tolerance, widened to 3 robust sigmas of the judged pairs' log ratios where they
    # scatter more than it allows (a colour sensor's undersampled stars): it is there to cut
    # outliers, and would otherwise cut the scatter itself and hide it from the fit.
    tolerance = max(tolerance, math.exp(3 * _MAD * float(np.median(np.abs(logs - math.log(m0))))))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = y / x
    used = ~judged | ((ratio >= m0 / tolerance) & (ratio <= m0 * tolerance))
    n_remove = int(math.floor(used.sum() * outlier_removal / 100 + 0.5))
    m, error, scatter = m0, float("nan"), 0.0
    for attempt in range(2):
        index = np.nonzero(used)[0]
        if index.size < 2:
            break
        m, error, scatter, keep = weighted_ratio(x[index], y[index], sx[index], sy[index], m)
        used[index[~keep]] = False
        if attempt or n_remove == 0 or used.sum() - n_remove < 3:
            break
        # NSG's removal of the farthest pairs, in each pair's own errors, judged against the
        # symmetric level as the biweight judges them: a ratio high by a factor and one low
        # by it are as far.
        index = np.nonzero(used)[0]
        variance = sy[index] ** 2 + (m * sx[index]) ** 2 + scatter**2 * _level2(x[index], y[index], m, power=1.0)
        residual = np.abs(y[index] - m * x[index]) / np.sqrt(variance)
        used[index[np.argsort(-residual, kind="stable")[:n_remove]]] = False
    if used.sum() < min(min_pairs, n):
        m, error, scatter, _ = weighted_ratio(x, y, sx, sy, m0, robust=False)
        used = np.ones(n, bool)
    return ScaleFit(float(m), 0.0, used, int(used.sum()), float(error), float(scatter))


def scale_doubt(
    transmission,
    transmission_error,
    *,
    threshold: float = UNCERTAIN_SCALE,
    star_pairs: int | None = None,
    mean: bool = False,
) -> str | None:
    """Why a frame's transmissions are in doubt, or None.

    A channel's relative standard error above ``threshold``, channels that disagree with
    each other beyond their errors (:data:`CHANNELS_DISAGREE_P`), or a scale from fewer than
    :data:`FEW_STAR_PAIRS` star pairs in its best channel (``star_pairs``, where known) are
    in doubt; a channel without an error (NaN or None) is not judged.

    With ``mean``, the error judged against ``threshold`` is that of the mean over the
    channels, what rejection compares between frames (:mod:`nsg_gpu.rejection`), where every
    channel has one: a colour frame whose one channel is uncertain by 4 % can have a mean
    known to 2 %. The channels' errors are taken as independent there: their common part, the
    seeing correction's, is about half a per cent at most (the plain aperture's assumed
    Moffat) where the pairs' noise brings a mean near the threshold.
    """
    reasons = []
    if star_pairs is not None and star_pairs < FEW_STAR_PAIRS:
        reasons.append(f"{star_pairs} star pair{'s' if star_pairs != 1 else ''} (fewer than {FEW_STAR_PAIRS})")
    t = np.asarray(transmission, float)
    e = np.array([np.nan if v is None else v for v in transmission_error], float)
    if t.size == 0 or e.size != t.size:
        return "; ".join(reasons) or None
    # The value whose relative error is judged: the mean over the channels, or the worst one.
    uncertain = None
    if mean and np.isfinite(e).all():
        name = "mean transmission" if t.size > 1 else "transmission"
        uncertain = (name, float(t.mean()), float(np.sqrt(np.sum(e * e))) / t.size)
    elif not mean and np.isfinite(e / t).any():
        worst = int(np.nanargmax(e / t))
        uncertain = (f"channel {worst} transmission" if t.size > 1 else "transmission", t[worst], e[worst])
    if uncertain is not None and uncertain[2] / uncertain[1] > threshold:
        name, value, error = uncertain
        reasons.append(
            f"{name} {value:.4g} +- {error:.2g} ({100 * error / value:.1f} %, more than {100 * threshold:g} %)"
        )
    judged = np.isfinite(e) & (e > 0)
    if judged.sum() >= 2:
        w = 1 / e[judged] ** 2
        centre = float(np.sum(w * t[judged]) / np.sum(w))
        chi2 = float(np.sum(w * (t[judged] - centre) ** 2))
        p = float(special.chdtrc(judged.sum() - 1, chi2))  # the chi-square's survival function
        if p < CHANNELS_DISAGREE_P:
            values = ", ".join(f"{a:.4g} +- {b:.2g}" for a, b in zip(t, e))
            reasons.append(f"channels' transmissions {values} disagree beyond their errors (p = {p:.1e})")
    return "; ".join(reasons) or None
