"""Thin-plate smoothing spline of the background difference, and its evaluation.

The fit follows PCL's ``SurfaceSpline`` as NSG uses it (section 7.5 of the reference):
coordinates centred on the nodes' centroid and scaled by the largest node distance, kernel
``phi(r) = r^2 ln r``, the system ``[K + diag(lambda / w)] c + P a = z`` with ``P^T c = 0``
and ``P = [1, x, y]``, ``lambda = 10^smoothness``; at smoothness 4 or more a least-squares plane
replaces the spline. The fit is a small dense solve on the host; the evaluation runs on the
backend of the caller.

On the CPU the full-resolution gradient is the spline evaluated on a coarse grid and
interpolated by a bicubic spline; the gradient is smooth, and a test bounds the difference
from exact evaluation. On the GPU every pixel is evaluated exactly by ``kernels/tps.cu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.interpolate import RectBivariateSpline

from . import kernels
from .backend import get_backend

__all__ = ["SurfaceSpline", "fit_surface_spline", "PLANE_SMOOTHNESS"]

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
        xp = get_backend(x).xp
        u = (xp.asarray(x, dtype=xp.float64) - self.centre[0]) / self.scale
        v = (xp.asarray(y, dtype=xp.float64) - self.centre[1]) / self.scale
        out = self.affine[0] + self.affine[1] * u + self.affine[2] * v
        if self.coefficients.size:
            flat_u, flat_v = u.reshape(-1), v.reshape(-1)
            nodes = xp.asarray(self.nodes)
            coefficients = xp.asarray(self.coefficients)
            acc = xp.zeros(flat_u.shape, dtype=xp.float64)
            chunk = max(1, 2_000_000 // max(1, nodes.shape[0]))
            for start in range(0, flat_u.size, chunk):
                du = flat_u[start : start + chunk, None] - nodes[None, :, 0]
                dv = flat_v[start : start + chunk, None] - nodes[None, :, 1]
                acc[start : start + chunk] = _tps_kernel(du * du + dv * dv, xp) @ coefficients
            out = out + acc.reshape(u.shape)
        return out

    def evaluate_image(self, height: int, width: int, *, step: int = 16, xp=np, launcher=None):
        """The spline over a ``height`` x ``width`` image, float32.

        With NumPy: exact at the nodes of a grid with spacing ``step`` px covering the image,
        bicubic in between (``step=1`` evaluates every pixel exactly). With CuPy (``xp`` is
        ``cupy``) or a ``launcher``: every pixel exactly, by the ``tps_eval_f32`` kernel, whose
        twin is :meth:`__call__`; ``step`` is then ignored.
        """
        launcher = launcher or kernels.launcher_for(xp.__name__ == "cupy")
        if launcher is not None:
            return self._evaluate_kernel(height, width, xp, launcher)
        if step <= 1 or not self.coefficients.size:
            yy, xx = xp.mgrid[0:height, 0:width]
            return self(xx.astype(xp.float64), yy.astype(xp.float64)).astype(xp.float32)
        ny = int(math.ceil((height - 1) / step)) + 1
        nx = int(math.ceil((width - 1) / step)) + 1
        gy = np.linspace(0, height - 1, ny)
        gx = np.linspace(0, width - 1, nx)
        coarse = self(*np.meshgrid(gx, gy))
        interpolator = RectBivariateSpline(gy, gx, coarse, kx=min(3, ny - 1), ky=min(3, nx - 1), s=0)
        full = interpolator(np.arange(height), np.arange(width), grid=True).astype(np.float32)
        return xp.asarray(full)

    def kernel_nodes(self) -> np.ndarray:
        """Nodes packed for ``tps_eval_f32``: ``(u, v, c ln(2) / 2, 0)`` per node, float32."""
        packed = np.zeros((self.coefficients.size, 4), dtype=np.float32)
        packed[:, :2] = self.nodes
        packed[:, 2] = self.coefficients * (0.5 * math.log(2.0))
        return packed

    def _evaluate_kernel(self, height: int, width: int, xp, launcher):
        from .kernels import TPS_PIXELS

        nodes = xp.asarray(self.kernel_nodes())
        out = xp.empty((height, width), dtype=xp.float32)
        items = height * -(-width // TPS_PIXELS)
        config = launcher.config("tps_eval_f32", items)
        launcher(
            "tps_eval_f32",
            config,
            (nodes, nodes.shape[0], *self.centre, self.scale, *(float(a) for a in self.affine), height, width, out),
        )
        return out


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
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    z = np.asarray(z, float)
    w = np.ones_like(z) if weights is None else np.asarray(weights, float)
    # Duplicate nodes make the system singular; keep the first of each position.
    _, first = np.unique(np.round(np.column_stack([x, y]), 6), axis=0, return_index=True)
    first = np.sort(first)
    x, y, z, w = x[first], y[first], z[first], w[first]
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
        affine, *_ = np.linalg.lstsq(P, z, rcond=None)
        return SurfaceSpline(np.zeros((0, 2)), np.zeros(0), affine, centre, scale)
    lam = 10.0**smoothness
    du = u[:, None] - u[None, :]
    dv = v[:, None] - v[None, :]
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _tps_kernel(du * du + dv * dv)
    system[np.arange(n), np.arange(n)] += lam / np.maximum(w, 1e-12)
    system[:n, n:] = P
    system[n:, :n] = P.T
    rhs = np.concatenate([z, np.zeros(3)])
    try:
        solution = scipy.linalg.solve(system, rhs, assume_a="sym")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning) as exc:
        raise ValueError(f"the spline system is singular ({exc})") from exc
    return SurfaceSpline(np.column_stack([u, v]), solution[:n], solution[n:], centre, scale)
