"""Thin-plate smoothing spline of the background difference, and its evaluation.

The fit follows PCL's ``SurfaceSpline`` as NSG uses it (section 7.5 of the reference):
coordinates centred on the nodes' centroid and scaled by the largest node distance, kernel
``phi(r) = r^2 ln r``, the system ``[K + diag(lambda / w)] c + P a = z`` with ``P^T c = 0``
and ``P = [1, x, y]``, ``lambda = 10^smoothness``; at smoothness 4 or more a least-squares plane
replaces the spline. The fit is a small dense solve on the host; the evaluation runs on the
backend of the caller.

The full-resolution gradient is exact on the GPU: ``kernels/tps.cu`` evaluates the spline at
every pixel. On the CPU it is the spline evaluated on a coarse grid and interpolated by the
interpolating bicubic spline of that grid; the gradient is smooth, and a test bounds the
difference from exact evaluation. The gradient stage puts the coarse grid on the lattice of
the sample bins' centres and midpoints, where the nodes lie: the kernel between two lattice
points depends only on their index difference, so the whole grid's values are one FFT
convolution of the coefficients with a table of the kernel (1-2 ms where the kernel sums
took 0.15-0.2 s for 2000 nodes on a 26 MP frame). The interpolation is separable, so it is
two matrix products with weights that depend only on the image geometry (computed once per
geometry); the second runs by bands of rows over the coarse nodes their weights reach.
The channels of a colour frame share their nodes and weights, so one factorization of the
system and one kernel matrix serve all three (:func:`fit_surface_splines`,
:func:`evaluate_surfaces`).

In the flow: below the gradient stage (:mod:`nsg_gpu.gradient`), which fits it to the
samples and evaluates it as ``G``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.linalg
from scipy.interpolate import make_interp_spline
from scipy.linalg import lapack

from . import kernels
from .backend import get_backend

__all__ = [
    "SurfaceSpline",
    "fit_surface_spline",
    "fit_surface_splines",
    "evaluate_surfaces",
    "interpolation_weights",
    "PLANE_SMOOTHNESS",
]

#: NSG's maximum smoothness, which means "fit a plane".
PLANE_SMOOTHNESS = 4.0


def _tps_kernel(r2, xp=np):
    """``r^2 ln r`` from squared distances, 0 at the nodes."""
    safe = xp.where(r2 > 0, r2, 1.0)
    return 0.5 * r2 * xp.log(safe)


@dataclass
class SurfaceSpline:
    """A fitted thin-plate spline (or plane) in normalized coordinates.

    ``f(p) = sum_i c_i phi(|p - p_i|) + a0 + a1 x + a2 y`` with ``p = (pixel - centre) / scale``.
    """

    nodes: np.ndarray  # (n, 2) normalized
    coefficients: np.ndarray  # (n,)
    affine: np.ndarray  # (3,)
    centre: tuple[float, float]
    scale: float

    def __call__(self, x, y):
        """Evaluate exactly at pixel coordinates ``x``, ``y`` (arrays of one shape, any backend)."""
        return _evaluate([self], x, y)[0]

    def evaluate_image(self, height: int, width: int, *, step: int = 16, xp=np, launcher=None):
        """The spline over a ``height`` x ``width`` image, float32.

        With NumPy: exact at the nodes of a grid with spacing ``step`` px covering the image,
        bicubic in between (``step=1`` evaluates every pixel exactly). With CuPy (``xp`` is
        ``cupy``) or a ``launcher``: every pixel exactly, by the ``tps_eval_f32`` kernel, whose
        twin is :meth:`__call__`; ``step`` is then ignored.
        """
        launcher = launcher or kernels.launcher_for(xp.__name__ == "cupy")
        return evaluate_surfaces([self], height, width, step=step, xp=xp, launcher=launcher)[0]

    def kernel_nodes(self) -> np.ndarray:
        """Nodes packed for ``tps_eval_f32``: ``(u, v, c ln(2) / 2, 0)`` per node, float32."""
        packed = np.zeros((self.coefficients.size, 4), dtype=np.float32)
        packed[:, :2] = self.nodes
        packed[:, 2] = self.coefficients * (0.5 * math.log(2.0))
        return packed

    def _evaluate_kernel(self, height: int, width: int, xp, launcher):
        nodes = xp.asarray(self.kernel_nodes())
        out = xp.empty((height, width), dtype=xp.float32)
        items = height * -(-width // kernels.TPS_PIXELS)
        config = launcher.config("tps_eval_f32", items)
        launcher(
            "tps_eval_f32",
            config,
            (nodes, nodes.shape[0], *self.centre, self.scale, *(float(a) for a in self.affine), height, width, out),
        )
        return out


def _evaluate(splines: list[SurfaceSpline], x, y):
    """Splines sharing nodes, centre and scale, evaluated exactly at ``(x, y)``: ``(k, *x.shape)``."""
    first = splines[0]
    xp = get_backend(x).xp
    u = (xp.asarray(x, dtype=xp.float64) - first.centre[0]) / first.scale
    v = (xp.asarray(y, dtype=xp.float64) - first.centre[1]) / first.scale
    affine = xp.asarray(np.stack([s.affine for s in splines]))  # (k, 3)
    out = affine[:, 0, None] + affine[:, 1, None] * u.reshape(1, -1) + affine[:, 2, None] * v.reshape(1, -1)
    if first.coefficients.size:
        flat_u, flat_v = u.reshape(-1), v.reshape(-1)
        nodes = xp.asarray(first.nodes)
        coefficients = xp.asarray(np.stack([s.coefficients for s in splines], axis=1))  # (n, k)
        # phi(r) = r^2 ln r = 0.5 * r2 ln r2: the 0.5 goes into the coefficients, and the
        # squared distances come from one product (|p|^2 + |q|^2 - 2 p.q), all in place.
        half = 0.5 * coefficients
        node_norm = (nodes * nodes).sum(axis=1)
        chunk = max(1, 2_000_000 // max(1, nodes.shape[0]))
        for start in range(0, flat_u.size, chunk):
            points = xp.stack([flat_u[start : start + chunk], flat_v[start : start + chunk]], axis=1)
            r2 = points @ (-2.0 * nodes.T)
            r2 += (points * points).sum(axis=1)[:, None]
            r2 += node_norm[None, :]
            # At a node r2 is 0 up to rounding, and r2 ln r2 is 0 there.
            xp.maximum(r2, 1e-300, out=r2)
            kernel = xp.log(r2)
            kernel *= r2
            out[:, start : start + chunk] += (kernel @ half).T
    return out.reshape((len(splines),) + tuple(u.shape))


@functools.lru_cache(maxsize=8)
def interpolation_weights(size: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Coarse nodes along one axis of ``size`` px, and the bicubic interpolation matrix.

    Returns
    -------
    nodes : ndarray (n,)
        ``n = ceil((size - 1) / step) + 1`` evenly spaced positions from 0 to ``size - 1``.

    weights : ndarray (size, n), float32
        Row ``i`` gives pixel ``i``'s value as a combination of the node values: the
        interpolating cubic spline with not-a-knot ends (quadratic or linear for 3 or 2
        nodes), the same spline as FITPACK's interpolating spline of the nodes.
    """
    n = int(math.ceil((size - 1) / step)) + 1
    return _cubic_weights(np.linspace(0, size - 1, n), size)


@functools.lru_cache(maxsize=8)
def lattice_weights(size: int, origin: float, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`interpolation_weights`, for the nodes of the lattice ``origin + k spacing``
    that cover pixels 0 to ``size - 1``: from the last at or before 0 to the first at or after
    ``size - 1``."""
    first = math.floor(-origin / spacing + 1e-9)
    last = math.ceil((size - 1 - origin) / spacing - 1e-9)
    return _cubic_weights(origin + spacing * np.arange(first, last + 1), size)


def _cubic_weights(nodes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    n = nodes.size
    if n == 1:
        return nodes, np.ones((size, 1), np.float32)
    basis = make_interp_spline(nodes, np.eye(n), k=min(3, n - 1))
    weights = basis(np.arange(size, dtype=np.float64))
    # A cardinal spline's weights decay by about 0.27 per node; the far ones fall below
    # float32's normal range, and subnormal numbers slow a matrix product many times over.
    weights[np.abs(weights) < 1e-7] = 0
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    return nodes, weights


def evaluate_surfaces(
    splines: list[SurfaceSpline], height: int, width: int, *, step: int = 16, xp=np, launcher=None, lattice=None
):
    """Splines sharing their nodes (one per channel) over a ``height`` x ``width`` image.

    Parameters
    ----------
    splines : list of SurfaceSpline
        From one :func:`fit_surface_splines` call (same nodes, centre and scale).

    height, width : int

    step : int
        Spacing (px) of the coarse grid evaluated exactly; bicubic interpolation in
        between. ``step=1`` evaluates every pixel exactly.

    xp : module
        Array module of the result (``numpy`` or ``cupy``).

    launcher : optional
        Evaluates every pixel exactly with the ``tps_eval_f32`` kernel (twin:
        :meth:`SurfaceSpline.__call__`); by default the device's for CuPy, none for NumPy.

    lattice : (x0, y0, spacing), optional
        A lattice of pixel positions ``(x0 + i spacing, y0 + j spacing)`` that holds the
        nodes, such as the sample bins' centres at half a bin. The coarse grid is then that
        lattice's points over the image (``step`` is not used), and where every node lies on
        it the grid's values are one FFT convolution (:func:`_evaluate_on_lattice`).

    Returns
    -------
    array (len(splines), height, width), float32
        On ``xp``. The coarse grid is evaluated on the host (it is small); the
        interpolation, two matrix products per channel, runs on ``xp``.
    """
    launcher = launcher or kernels.launcher_for(xp.__name__ == "cupy")
    if launcher is not None:
        out = xp.empty((len(splines), height, width), dtype=xp.float32)
        for c, spline in enumerate(splines):
            out[c] = spline._evaluate_kernel(height, width, xp, launcher)
        return out
    if step <= 1 or not splines[0].coefficients.size:
        yy, xx = xp.mgrid[0:height, 0:width]
        return _evaluate(splines, xx.astype(xp.float64), yy.astype(xp.float64)).astype(xp.float32)
    if lattice is None:
        gy, wy = interpolation_weights(height, step)
        gx, wx = interpolation_weights(width, step)
        coarse = None
    else:
        x0, y0, spacing = (float(value) for value in lattice)
        gy, wy = lattice_weights(height, y0, spacing)
        gx, wx = lattice_weights(width, x0, spacing)
        coarse = _evaluate_on_lattice(splines, gx, gy, spacing)
    if coarse is None:
        coarse = _evaluate(splines, *np.meshgrid(gx, gy))
    coarse = coarse.astype(np.float32)  # (k, ny, nx)
    out = xp.empty((len(splines), height, width), dtype=xp.float32)
    for c in range(len(splines)):
        columns = xp.asarray(coarse[c] @ wx.T)  # (ny, width)
        for start, stop, first, last in _row_bands(wy):
            xp.matmul(xp.asarray(wy[start:stop, first:last]), columns[first:last], out=out[c, start:stop])
    return out


def _evaluate_on_lattice(splines: list[SurfaceSpline], gx: np.ndarray, gy: np.ndarray, spacing: float):
    """The splines at the points of the regular grid ``gx`` x ``gy`` of ``spacing`` px
    ``(k, ny, nx)``, where every node lies on that grid's lattice (to 1e-6 of its spacing);
    None where one does not.

    Between two points of one lattice the kernel depends only on the difference of their
    indices, so the kernel sum at every grid point is one 2-D convolution of the
    coefficients, placed at their nodes' indices, with the kernel's table over all index
    differences: ``O(N log N)`` by FFT instead of nodes x points logarithms. Equal to
    :func:`_evaluate` to rounding (``tests/test_throughput.py``)."""
    first = splines[0]
    x = first.nodes[:, 0] * first.scale + first.centre[0]
    y = first.nodes[:, 1] * first.scale + first.centre[1]
    ix, iy = np.rint((x - gx[0]) / spacing), np.rint((y - gy[0]) / spacing)
    off_lattice = np.maximum(np.abs(x - gx[0] - ix * spacing), np.abs(y - gy[0] - iy * spacing))
    nx, ny = gx.size, gy.size
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    if first.nodes.shape[0] == 0 or not (np.all(off_lattice <= 1e-6 * spacing) and np.all(inside)):
        return None
    ix, iy = ix.astype(np.intp), iy.astype(np.intp)
    h = spacing / first.scale  # the lattice's spacing in the splines' normalized units
    dy, dx = np.meshgrid(np.arange(-(ny - 1), ny), np.arange(-(nx - 1), nx), indexing="ij")
    table = _tps_kernel(h * h * (dx * dx + dy * dy).astype(np.float64))
    u = (gx - first.centre[0]) / first.scale
    v = (gy - first.centre[1]) / first.scale
    out = np.empty((len(splines), ny, nx))
    for c, spline in enumerate(splines):
        placed = np.zeros((ny, nx))
        placed[iy, ix] = spline.coefficients
        out[c] = _valid_convolution(table, placed)
        out[c] += spline.affine[0] + spline.affine[1] * u[None, :] + spline.affine[2] * v[:, None]
    return out


def _valid_convolution(table: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """``scipy.signal.fftconvolve(table, placed, mode="valid")`` of two real 2-D arrays,
    ``table`` at least as large as ``placed`` along each axis, by the same ``scipy.fft``
    calls in the same order (the same bits), without importing ``scipy.signal``: that import
    (and ``scipy.stats``, which it brings) took about 0.5 s of every process that imports
    nsg_gpu, the command line's and each cluster worker's. The valid part is a view of the
    full convolution (the caller copies it into its grid)."""
    # As fftconvolve: an axis of length 1 in either array is a plain product, not an FFT.
    axes = [a for a in range(2) if table.shape[a] != 1 and placed.shape[a] != 1]
    if not axes:
        return table * placed
    full = [table.shape[a] + placed.shape[a] - 1 for a in axes]
    fshape = [scipy.fft.next_fast_len(n, True) for n in full]
    product = scipy.fft.rfftn(table, fshape, axes=axes) * scipy.fft.rfftn(placed, fshape, axes=axes)
    out = scipy.fft.irfftn(product, fshape, axes=axes)
    # The valid part: from placed's size less one to table's size along each transformed axis.
    keep = [slice(None), slice(None)]
    for a in axes:
        keep[a] = slice(placed.shape[a] - 1, table.shape[a])
    return out[tuple(keep)]


#: Rows of the image interpolated by one matrix product.
_BAND_ROWS = 256


def _row_bands(weights: np.ndarray) -> tuple[tuple[int, int, int, int], ...]:
    """Bands of image rows ``[start, stop)`` and the coarse nodes ``[first, last)`` their
    interpolation weights reach: a weight beyond them is 0 (:func:`interpolation_weights`), so
    the product over those nodes alone is the full product (a pass over the weights: 0.3 ms
    for a 26 MP frame)."""
    height = weights.shape[0]
    bands = []
    for start in range(0, height, _BAND_ROWS):
        stop = min(height, start + _BAND_ROWS)
        reached = np.flatnonzero(np.any(weights[start:stop] != 0, axis=0))
        bands.append((start, stop, int(reached[0]), int(reached[-1]) + 1))
    return tuple(bands)


def fit_surface_spline(x, y, z, *, weights=None, smoothness: float = -2.0) -> SurfaceSpline:
    """Fit the thin-plate smoothing spline (or plane) of NSG to samples ``z`` at ``(x, y)``.

    Parameters
    ----------
    x, y, z : ndarray (n,)
        Node positions (px) and values, on the host.

    weights : ndarray (n,), optional
        Node weights (number of merged samples); a heavier node is followed more closely.

    smoothness : float
        ``log10`` of the smoothing ``lambda``; 4 or more fits a least-squares plane.

    Raises
    ------
    ValueError
        Fewer than 3 nodes, or nodes that do not span a plane.
    """
    return fit_surface_splines(x, y, np.asarray(z, float)[None], weights=weights, smoothness=smoothness)[0]


def fit_surface_splines(x, y, values, *, weights=None, smoothness: float = -2.0) -> list[SurfaceSpline]:
    """One spline per row of ``values`` ``(k, n)``, all at the nodes ``(x, y)``.

    The same as :func:`fit_surface_spline` for each row, with the system factorized once.

    Raises
    ------
    ValueError
        Fewer than 3 nodes, or nodes that do not span a plane.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    z = np.atleast_2d(np.asarray(values, float))
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    # Duplicate nodes make the system singular; keep the first of each position.
    _, first = np.unique(np.round(np.column_stack([x, y]), 6), axis=0, return_index=True)
    first = np.sort(first)
    x, y, z, w = x[first], y[first], z[:, first], w[first]
    n = x.size
    if n < 3:
        raise ValueError(f"{n} sample(s); a surface needs at least 3")
    centre = (float(x.mean()), float(y.mean()))
    scale = float(np.max(np.hypot(x - centre[0], y - centre[1])))
    if scale <= 0:
        raise ValueError("all samples lie at one position")
    u, v = (x - centre[0]) / scale, (y - centre[1]) / scale
    P = np.column_stack([np.ones(n), u, v])
    if np.linalg.matrix_rank(P) < 3:
        raise ValueError("the samples lie on one line; a surface needs them spread over the image")
    if smoothness >= PLANE_SMOOTHNESS:
        affine, *_ = np.linalg.lstsq(P, z.T, rcond=None)
        return [SurfaceSpline(np.zeros((0, 2)), np.zeros(0), affine[:, c], centre, scale) for c in range(z.shape[0])]
    lam = 10.0**smoothness
    du = u[:, None] - u[None, :]
    dv = v[:, None] - v[None, :]
    kernel = _tps_kernel(du * du + dv * dv)
    kernel[np.arange(n), np.arange(n)] += lam / np.maximum(w, 1e-12)
    try:
        solution = _solve_projected(kernel, P, z.T)
    except (np.linalg.LinAlgError, ValueError):
        solution = _solve_bordered(_tps_kernel(du * du + dv * dv) + np.diag(lam / np.maximum(w, 1e-12)), P, z.T)
    nodes = np.column_stack([u, v])
    return [SurfaceSpline(nodes, solution[:n, c], solution[n:, c], centre, scale) for c in range(z.shape[0])]


def _solve_bordered(kernel: np.ndarray, P: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The spline system ``[[K, P], [P^T, 0]] [c; a] = [z; 0]`` by LU: ``(n + 3, k)``."""
    n = kernel.shape[0]
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = kernel
    system[:n, n:] = P
    system[n:, :n] = P.T
    rhs = np.concatenate([z, np.zeros((3, z.shape[1]))])
    try:
        return scipy.linalg.solve(system, rhs, assume_a="gen", overwrite_a=True, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning) as exc:
        raise ValueError(f"the spline system is singular ({exc})") from exc


def _solve_projected(kernel: np.ndarray, P: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The same system by the null space of ``P^T``: with ``P = Q R`` and ``c = Q2 g``,
    ``(Q2^T K Q2) g = Q2^T z`` is positive definite (``r^2 ln r`` is conditionally positive
    definite of order 2, and the smoothing adds a positive diagonal), so one Cholesky
    factorization (half the work of LU) solves it; then ``R a = Q1^T (z - K c)``.
    ``kernel`` is overwritten. Raises LinAlgError where the factorization fails."""
    n = kernel.shape[0]
    qr, tau, _, info = lapack.dgeqrf(P)
    if info != 0:
        raise np.linalg.LinAlgError("QR of the spline's affine part failed")
    lwork = 64 * n
    # Q^T K Q by the three Householder reflectors, from both sides.
    projected, _, info_l = lapack.dormqr("L", "T", qr, tau, kernel, lwork, overwrite_c=1)
    projected, _, info_r = lapack.dormqr("R", "N", qr, tau, projected, lwork, overwrite_c=1)
    qz, _, info_z = lapack.dormqr("L", "T", qr, tau, np.array(z, order="F"), lwork)
    if info_l or info_r or info_z:
        raise np.linalg.LinAlgError("applying the spline's reflectors failed")
    factor = scipy.linalg.cho_factor(projected[3:, 3:], overwrite_a=True, check_finite=False)
    g = scipy.linalg.cho_solve(factor, qz[3:], check_finite=False)
    padded = np.zeros_like(qz)
    padded[3:] = g
    c, _, info_c = lapack.dormqr("L", "N", qr, tau, padded, lwork)
    if info_c:
        raise np.linalg.LinAlgError("applying the spline's reflectors failed")
    # Rows 0-2 of Q^T K Q [0; g] are Q1^T K c; the factorization left them untouched.
    a = scipy.linalg.solve_triangular(np.triu(qr[:3]), qz[:3] - projected[:3, 3:] @ g, check_finite=False)
    return np.concatenate([c, a])
