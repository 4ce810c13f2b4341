"""The apply step: ``T' = m*T - G`` where ``T != 0``, and what the noise estimate needs of it.

On the GPU one kernel (``kernels/apply.cu``) writes the normalized frame, the per-thread
maxima of it (the ``NSGHIGH`` value) and the first wavelet layer of the output on the rows
that the k-sigma noise estimate samples, so that the frame is read once. The NumPy path is
that kernel's twin and computes the same quantities with whole-array operations.

In the flow: after the gradient stage, called by :func:`nsg_gpu.pipeline.normalize_frame`;
its noise statistics feed the weight (:mod:`nsg_gpu.noise`).
"""

from __future__ import annotations

import time

import numpy as np

from . import kernels
from .backend import get_backend
from .noise import layer_noise, noise_row_stride, wavelet_layer_rows

__all__ = ["apply_gradient", "normalize_pixels"]


def apply_gradient(data, scale, gradient, *, white_level: float, truncate: bool, row_stride=None, launcher=None):
    """``m*T - G`` where ``T != 0`` (else 0), optionally clipped, with its maximum and noise layer.

    Parameters
    ----------
    data : array (channels, height, width)
        The target ``T``, any backend.

    scale : sequence of float
        ``m`` per channel.

    gradient : array (channels, height, width) float32
        The gradient model ``G``, on the backend of ``data``.

    white_level : float
        Upper clip of covered pixels when ``truncate``.

    truncate : bool
        Clip covered pixels to ``[0, white_level]`` (uncovered pixels stay 0).

    row_stride : int, optional
        Also return the first wavelet layer of the output on every ``row_stride``-th row
        (see :func:`nsg_gpu.noise.wavelet_layer_rows`).

    launcher : optional
        Runs the ``apply_gradient_f32`` kernel instead (:data:`nsg_gpu.kernels.DEVICE`, or
        the tests' host emulation); CuPy arrays always use the kernel.

    Returns
    -------
    out : float32 array (channels, height, width)

    high : float
        The largest value of ``m*T - G`` (0 where ``T == 0``) before clipping.

    layer, valid : arrays (channels, rows, width), or None without ``row_stride``
    """
    be = get_backend(data)
    xp = be.xp
    channels, height, width = data.shape
    m = np.asarray(scale, dtype=np.float32)
    launcher = launcher or kernels.launcher_for(be.is_gpu)
    if launcher is not None:
        frame = xp.ascontiguousarray(data, dtype=xp.float32)
        model = xp.ascontiguousarray(gradient, dtype=xp.float32)
        out = xp.empty_like(frame)
        config = launcher.config("apply_gradient_f32", frame.size)
        high = xp.empty(config[0] * config[1], dtype=xp.float32)
        layer = valid = None
        if row_stride is not None:
            rows = -(-height // row_stride)
            layer = xp.empty((channels, rows, width), dtype=xp.float32)
            valid = xp.empty((channels, rows, width), dtype=xp.uint8)
        launcher(
            "apply_gradient_f32",
            config,
            (
                frame,
                model,
                xp.asarray(m),
                channels,
                height,
                width,
                np.float32(white_level),
                int(bool(truncate)),
                out,
                high,
                1 if row_stride is None else row_stride,
                layer,
                valid,
            ),
        )
        return out, float(be.to_host(high.max())), layer, None if valid is None else valid.view(bool)
    # One temporary: m*T, then G subtracted and the no-data pixels zeroed in place.
    out = xp.multiply(xp.asarray(m)[:, None, None], data, dtype=xp.float32)
    out -= gradient
    empty = data == 0
    out[empty] = 0
    high = float(be.to_host(out.max()))
    if truncate:
        xp.clip(out, 0, white_level, out=out)  # no-data pixels are 0 and stay 0
    if row_stride is None:
        return out, high, None, None
    layers = [wavelet_layer_rows(out[c], row_stride) for c in range(channels)]
    return out, high, xp.stack([a for a, _ in layers]), xp.stack([b for _, b in layers])


def normalize_pixels(
    data,
    scale,
    gradient,
    *,
    white_level: float,
    truncate: bool,
    measure_noise: bool,
    max_pixels: int = 4_000_000,
    timings: dict | None = None,
):
    """The normalized frame, its maximum before clipping, and its k-sigma noise per channel.

    ``timings``, when given, gains the seconds of ``apply`` (with the wavelet layer the
    noise samples, which the GPU computes in the same pass) and of ``noise`` (the clipping).

    Returns
    -------
    out : float32 array (channels, height, width), on the backend of ``data``

    high : float

    noise : ndarray (channels,) or None
        :func:`nsg_gpu.noise.ksigma_noise` of each output channel when ``measure_noise``.
    """
    _, height, width = data.shape
    stride = noise_row_stride(height, width, max_pixels) if measure_noise else None
    started = time.perf_counter()
    out, high, layer, valid = apply_gradient(
        data, scale, gradient, white_level=white_level, truncate=truncate, row_stride=stride
    )
    applied = time.perf_counter()
    noise = None
    if measure_noise:
        noise = np.array([layer_noise(layer[c], valid[c]) for c in range(out.shape[0])])
    if timings is not None:
        timings["apply"] = timings.get("apply", 0.0) + applied - started
        timings["noise"] = timings.get("noise", 0.0) + time.perf_counter() - applied
    return out, high, noise
