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


def apply_gradient(
    data,
    scale,
    gradient,
    *,
    white_level: float,
    truncate: bool,
    row_stride=None,
    launcher=None,
    overwrite_gradient: bool = False,
):
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

    overwrite_gradient : bool
        On the host, write the output into ``gradient`` (float32, C-ordered, the frame's
        shape) instead of a new array; ``gradient`` then holds the output.

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
    if be.is_gpu:
        out = xp.multiply(xp.asarray(m)[:, None, None], data, dtype=xp.float32)
        out -= gradient
        out[data == 0] = 0
        high = float(be.to_host(out.max()))
        if truncate:
            xp.clip(out, 0, white_level, out=out)
        layers = None
        if row_stride is not None:
            layers = [wavelet_layer_rows(out[c], row_stride) for c in range(channels)]
    else:
        out, high = _apply_host(
            data, m, gradient, white_level=white_level, truncate=truncate, overwrite_gradient=overwrite_gradient
        )
        layers = None
        if row_stride is not None:
            layers = [_layer_rows_host(out[c], row_stride) for c in range(channels)]
    if layers is None:
        return out, high, None, None
    return out, high, xp.stack([a for a, _ in layers]), xp.stack([b for _, b in layers])


#: Rows per block of the host apply: a block of the frame, the model and the output stays in
#: the CPU's cache between the passes over it (about 0.6 MB each at 6248 px wide).
_BLOCK_ROWS = 24
#: Bytes of double-precision source rows per block of the host wavelet layer.
_LAYER_BYTES = 1 << 19


def _apply_host(data, m, gradient, *, white_level: float, truncate: bool, overwrite_gradient: bool = False):
    """``m*T - G`` (0 where ``T == 0``), its maximum, and the clip, in row blocks in place.

    The same float32 operations in the same order as whole-array NumPy, so the same bits;
    but each block is read from memory once, and the only frame-sized array is the output,
    which with ``overwrite_gradient`` is ``gradient``'s own buffer (``G`` is read at each
    pixel before that pixel is written): no fresh frame-sized memory to fault in.
    """
    channels, height, width = data.shape
    reuse = (
        overwrite_gradient
        and isinstance(gradient, np.ndarray)
        and gradient.dtype == np.float32
        and gradient.shape == data.shape
        and gradient.flags.c_contiguous
        and gradient.flags.writeable
    )
    out = gradient if reuse else np.empty((channels, height, width), dtype=np.float32)
    empty = np.empty((_BLOCK_ROWS, width), dtype=bool)
    scaled = np.empty((_BLOCK_ROWS, width), dtype=np.float32)
    high = -np.inf
    for c in range(channels):
        scale = np.float32(m[c])
        for r0 in range(0, height, _BLOCK_ROWS):
            r1 = min(height, r0 + _BLOCK_ROWS)
            source, block, hole = data[c, r0:r1], out[c, r0:r1], empty[: r1 - r0]
            product = scaled[: r1 - r0]
            with np.errstate(over="ignore"):  # beyond float32: the frame fails on its maximum
                np.multiply(source, scale, out=product, dtype=np.float32)
            np.subtract(product, gradient[c, r0:r1], out=block)
            np.equal(source, 0, out=hole)
            np.copyto(block, 0, where=hole)
            high = max(high, float(block.max()))
            if truncate:
                np.clip(block, 0, white_level, out=block)  # no-data pixels are 0 and stay 0
    return out, high


def _layer_rows_host(image, row_stride: int):
    """:func:`nsg_gpu.noise.wavelet_layer_rows` on the host, to the same bits.

    SciPy's symmetric 5-tap ``correlate1d`` sums ``w0*x0 + (x-2 + x2)*w2 + (x-1 + x1)*w1``
    in double and rounds to float32; the horizontal pass does that on the 5 source rows of
    each kept row (edges mirrored as ``mode="reflect"``), the vertical pass only at the
    kept row itself rather than at all 5, and the 5x5 "holds data" test is a product of
    shifted slices rather than a binary erosion.
    """
    height, width = image.shape
    rows = np.arange(0, height, row_stride)
    offsets = np.arange(-2, 3)[:, None]
    source = rows[None, :] + offsets  # (5, rows)
    folded = np.mod(source, 2 * height)
    mirrored = np.where(folded >= height, 2 * height - 1 - folded, folded)
    w0, w1, w2 = 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0
    layer = np.empty((rows.size, width), dtype=np.float32)
    valid = np.empty((rows.size, width), dtype=bool)
    outside = (source < 0) | (source >= height)
    step = max(1, _LAYER_BYTES // (40 * width))  # kept rows per block: 5 source rows of doubles
    padded = np.empty((5, step, width + 4), dtype=np.float64)
    for k0 in range(0, rows.size, step):
        k1 = min(rows.size, k0 + step)
        n = k1 - k0
        block = image[mirrored[:, k0:k1].ravel()].reshape(5, n, width)
        pad = padded[:, :n]
        pad[..., 2:-2] = block
        pad[..., 0], pad[..., 1] = pad[..., 3], pad[..., 2]  # "reflect": d c b a | a b c d
        pad[..., -1], pad[..., -2] = pad[..., -4], pad[..., -3]
        horizontal = pad[..., 2:-2] * w0
        horizontal += (pad[..., :-4] + pad[..., 4:]) * w2
        horizontal += (pad[..., 1:-3] + pad[..., 3:-1]) * w1
        h = horizontal.astype(np.float32).astype(np.float64)
        smooth = h[2] * w0
        smooth += (h[0] + h[4]) * w2
        smooth += (h[1] + h[3]) * w1
        np.subtract(block[2], smooth.astype(np.float32), out=layer[k0:k1])
        # Valid: every pixel of the 5x5 window holds data and lies in the image.
        holds = np.all(block > 0, axis=0) & ~np.any(outside[:, k0:k1], axis=0)[:, None]
        ok = valid[k0:k1]
        ok[:] = False
        if width >= 5:
            ok[:, 2:-2] = holds[:, :-4] & holds[:, 1:-3] & holds[:, 2:-2] & holds[:, 3:-1] & holds[:, 4:]
    return layer, valid


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
    overwrite_gradient: bool = False,
):
    """The normalized frame, its maximum before clipping, and its k-sigma noise per channel.

    ``timings``, when given, gains the seconds of ``apply`` (with the wavelet layer the
    noise samples, which the GPU computes in the same pass) and of ``noise`` (the clipping).
    ``overwrite_gradient``: see :func:`apply_gradient`.

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
        data,
        scale,
        gradient,
        white_level=white_level,
        truncate=truncate,
        row_stride=stride,
        overwrite_gradient=overwrite_gradient,
    )
    applied = time.perf_counter()
    noise = None
    if measure_noise:
        noise = np.array([layer_noise(layer[c], valid[c]) for c in range(out.shape[0])])
    if timings is not None:
        timings["apply"] = timings.get("apply", 0.0) + applied - started
        timings["noise"] = timings.get("noise", 0.0) + time.perf_counter() - applied
    return out, high, noise
