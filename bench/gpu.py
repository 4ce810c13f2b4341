"""Per-frame GPU compute of nsg-gpu on a 6248 x 4176 mono frame (CUDA events, no disk I/O).

Times, on a frame resident on the device: star detection (the matched-filter and peak kernels
alone, and the whole ``detect_stars``), background sampling (``bin_medians``), the exact
dense spline evaluation with about 2000 nodes, and the apply step fused with the noise
estimate; prints node-pixel evaluations per second of the spline and the share of the card's
special-function (lg2) throughput that reaches, and the device memory the pool held at its
peak, in frame sizes. Prints the machine and writes JSON with ``--json``.

    python bench/gpu.py [--width 6248 --height 4176 --nodes 2000 --repeat 10 --json FILE]

Needs a usable CUDA GPU and CuPy; elsewhere it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import cpu_model  # noqa: E402

from nsg_gpu.backend import cupy_status  # noqa: E402

#: Results per clock per multiprocessor of the special-function unit for lg2 (CUDA C++
#: Programming Guide, arithmetic instruction throughput, compute capability 5.0 to 12.x).
LG2_PER_CLOCK_PER_SM = 16
#: The per-frame target of the GPU path (ms).
TARGET_MS = 50.0


def sm_clock_hz(cp) -> tuple[float | None, str]:
    """The SM clock the lg2 peak is computed at, and where it came from."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        mhz = float(out.stdout.strip().splitlines()[0])
        return mhz * 1e6, "nvidia-smi clocks.max.sm"
    except Exception:
        pass
    try:
        khz = cp.cuda.Device().attributes["ClockRate"]
        return float(khz) * 1e3, "device attribute ClockRate"
    except Exception:
        pass
    return None, "unknown"


def synthetic_frame(cp, height: int, width: int, *, seed: int = 1, n_stars: int = 30000):
    """A mono frame on the device: sky with a gradient, Gaussian stars (FWHM 3 px), noise, a border."""
    import cupyx
    import cupyx.scipy.ndimage as ndi

    random = cp.random.RandomState(seed)
    yy, xx = cp.mgrid[0:height, 0:width].astype(cp.float32)
    sky = 0.06 + 0.004 * (xx / width) - 0.003 * (yy / height) ** 2
    del yy, xx
    points = cp.zeros(height * width, cp.float32)
    index = random.randint(0, height * width, n_stars)
    # Power-law fluxes: many faint stars, a few that saturate.
    flux = (0.04**-0.75 - random.random_sample(n_stars) * (0.04**-0.75 - 60.0**-0.75)) ** (-1 / 0.75)
    cupyx.scatter_add(points, index, flux.astype(cp.float32))
    stars = ndi.gaussian_filter(points.reshape(height, width), 3.0 / 2.3548, mode="constant")
    del points
    frame = sky + stars + random.normal(0, 0.0015, (height, width), dtype=cp.float32)
    frame = cp.clip(frame, 1e-6, 1.0).astype(cp.float32)
    frame[:, : width // 50] = 0  # a registration border
    return frame[None]


def time_stage(cp, function, repeat: int) -> dict:
    from cupyx.profiler import benchmark

    result = benchmark(function, n_repeat=repeat, n_warmup=2)
    gpu = np.asarray(result.gpu_times)[0] * 1e3
    cpu = np.asarray(result.cpu_times) * 1e3
    return {
        "gpu_ms_median": float(np.median(gpu)),
        "gpu_ms_min": float(gpu.min()),
        "cpu_ms_median": float(np.median(cpu)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}")
    usable, reason = cupy_status()
    if not usable:
        print(f"no usable GPU here ({reason}); this benchmark runs only on a CUDA GPU: see kernels/README.md")
        return 1

    import cupy as cp

    from nsg_gpu import kernels
    from nsg_gpu.apply import normalize_pixels
    from nsg_gpu.noise import ksigma_noise
    from nsg_gpu.params import auto_sample_size
    from nsg_gpu.samples import bin_medians, make_grid
    from nsg_gpu.spline import fit_surface_spline
    from nsg_gpu.stars import _FWHM_TO_SIGMA, detect_stars, find_peaks, matched_filter

    device = kernels.describe_device()
    clock_hz, clock_source = sm_clock_hz(cp)
    print(
        f"GPU: {device['name']} (compute {device['compute_capability']}, {device['multiprocessors']} SMs, "
        f"{device['memory_total_bytes'] / 1024**3:.1f} GiB, SM clock "
        f"{'unknown' if clock_hz is None else f'{clock_hz / 1e6:.0f} MHz'} from {clock_source}); "
        f"CuPy {device['cupy']}, CUDA runtime {device['cuda_runtime']}, driver {device['cuda_driver']}"
    )
    h, w = args.height, args.width
    frame_bytes = h * w * 4
    print(f"frame: {w} x {h} mono float32 ({frame_bytes / 1e6:.0f} MB)")
    pool = cp.get_default_memory_pool()
    data = synthetic_frame(cp, h, w)

    # Inputs of the later stages, prepared untimed.
    image = data[0]
    residual = cp.where(image > 0, image - cp.median(image[image > 0]), 0).astype(cp.float32)
    fwhm = 3.0
    # NSG's Auto sample size for 3.76 um pixels at 530 mm: about 2000 bins.
    grid = make_grid(h, w, auto_sample_size(w, h, 3.76, math.degrees(3.76e-6 / 0.530)))
    rng = np.random.default_rng(2)
    nx, ny = rng.uniform(0, w - 1, args.nodes), rng.uniform(0, h - 1, args.nodes)
    nz = 0.004 * nx / w - 0.003 * (ny / h) ** 2 + rng.normal(0, 1e-4, args.nodes)
    started = time.perf_counter()
    spline = fit_surface_spline(nx, ny, nz, smoothness=-2)
    fit_seconds = time.perf_counter() - started
    n_nodes = int(spline.coefficients.size)
    gradient = spline.evaluate_image(h, w, xp=cp)[None]
    # Only the stages' inputs stay: the frame, the residual and the gradient (3 frames).
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    inputs_bytes = pool.total_bytes()

    stages = {
        "detect kernels (matched filter + peaks)": lambda: find_peaks(
            matched_filter(residual, fwhm * _FWHM_TO_SIGMA), image, half=3, threshold=0.01, margin=12
        ),
        "detect_stars (whole, star table to host)": lambda: detect_stars(data, fwhm=fwhm),
        f"bin medians ({grid.size} px bins, {grid.count} bins)": lambda: bin_medians(data, grid, 1.0),
        f"spline evaluation, exact ({n_nodes} nodes)": lambda: spline.evaluate_image(h, w, xp=cp),
        "apply + noise (fused kernel, k-sigma clip)": lambda: normalize_pixels(
            data, [0.9], gradient, white_level=1.0, truncate=True, measure_noise=True
        ),
        "noise of a frame (layer kernel, k-sigma clip)": lambda: ksigma_noise(image),
    }
    timings = {}
    for name, function in stages.items():
        timings[name] = time_stage(cp, function, args.repeat)
        print(f"  {name:50s} {timings[name]['gpu_ms_median']:9.2f} ms (min {timings[name]['gpu_ms_min']:.2f})")
    per_frame_keys = [k for k in stages if not k.startswith(("detect kernels", "noise of a frame"))]
    per_frame_ms = sum(timings[k]["gpu_ms_median"] for k in per_frame_keys)
    tps_ms = timings[f"spline evaluation, exact ({n_nodes} nodes)"]["gpu_ms_median"]
    evaluations = float(n_nodes) * h * w
    rate = evaluations / (tps_ms / 1e3)
    peak = None if clock_hz is None else device["multiprocessors"] * LG2_PER_CLOCK_PER_SM * clock_hz
    fraction = None if peak is None else rate / peak
    pool_peak = pool.total_bytes()
    print(
        f"per-frame GPU compute (detect_stars + medians + spline + apply/noise): {per_frame_ms:.1f} ms "
        f"(target {TARGET_MS:.0f} ms: {'met' if per_frame_ms <= TARGET_MS else 'NOT met'})"
    )
    print(
        f"spline: {rate:.3e} node-pixel evaluations/s"
        + ("" if fraction is None else f", {100 * fraction:.1f} % of the lg2 peak {peak:.3e}/s")
    )
    print(f"spline fit on the host ({n_nodes} nodes): {fit_seconds * 1e3:.0f} ms")
    print(
        f"device memory held by CuPy's pool at its peak: {pool_peak / 1e6:.0f} MB = {pool_peak / frame_bytes:.1f} "
        f"frames, of which {inputs_bytes / frame_bytes:.1f} are the stages' inputs (frame, residual, gradient)"
    )
    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "gpu": {**device, "sm_clock_hz": clock_hz, "sm_clock_source": clock_source},
        "versions": {"numpy": np.__version__, "cupy": device["cupy"], "cuda_runtime": device["cuda_runtime"]},
        "frame": {"width": w, "height": h, "channels": 1, "bytes": frame_bytes},
        "timings_ms": timings,
        "per_frame_ms": per_frame_ms,
        "per_frame_stages": per_frame_keys,
        "target_ms": TARGET_MS,
        "spline": {
            "nodes": n_nodes,
            "evaluations_per_second": rate,
            "lg2_peak_per_second": peak,
            "fraction_of_lg2_peak": fraction,
            "fit_seconds_host": fit_seconds,
        },
        "memory": {
            "pool_peak_bytes": pool_peak,
            "pool_peak_frames": pool_peak / frame_bytes,
            "inputs_bytes": inputs_bytes,
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
