"""Stacking: nsg stack against reading the same frames (the I/O floor) and against ccdproc.

Writes N normalized-looking frames once (cached in --cache): a smooth truth with Gaussian
noise of a different level per frame, a satellite trail in frame 1, hot pixels, zero
registration borders and an NWEIGHT card, plus the truth. Then, each in a fresh Python
process so that its peak resident set (VmHWM) is its own, it times

- ``read``: every frame read whole with ``nsg_gpu.io.read_frame`` (the I/O floor);
- ``nsg``: ``nsg_gpu.stack`` (what ``nsg stack`` calls) with ``--memory``, on every backend
  asked for (CuPy where a GPU is usable);
- ``ccdproc``: ccdproc's ``Combiner`` on the same frames (``CCDData.read``, 0 masked as no data,
  the NWEIGHT weights, ``sigma_clipping(3, 3)``, ``average_combine``): every frame in memory.
  Needs ccdproc (``pip install ccdproc``; not a dependency of nsg-gpu); ``--no-ccdproc``
  leaves it out.

and prints seconds per frame (wall and CPU), the ratio to the read floor, peak memory against
the budget, and each master's RMS error on the sky (noise, and any hot pixel left) against the
noise of the ideal weighted average and its worst residual on the trail, with the machine. The
frames are read from the page cache after the first measurement (the disk is not flushed).

    python bench/stack.py [--frames 30] [--width 2000 --height 1400] [--memory 2G]
                          [--backends numpy,cupy] [--no-ccdproc] [--cache DIR] [--json FILE]

The 26 MP case (500 frames of 6248 x 4176, 52 GB of FITS on disk; ccdproc's Combiner would
need over 100 GB of memory, so leave it out):

    python bench/stack.py --frames 500 --width 6248 --height 4176 --memory 16G --no-ccdproc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine, peak_rss_mb, print_machine  # noqa: E402


def frame_set(cache: Path, *, frames: int, width: int, height: int, seed: int) -> Path:
    """The frames and their truth, written once into ``cache``."""
    import numpy as np
    from astropy.io import fits

    directory = cache / f"stack-{width}x{height}-n{frames}-seed{seed}"
    done = directory / "truth.json"
    if done.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    truth = (0.06 + 0.01 * np.sin(xx / (width / 7)) * np.cos(yy / (height / 5))).astype(np.float32)
    for _ in range(max(20, width * height // 20000)):  # round blobs: stars and knots
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = int(rng.uniform(2, 6))
        ys, xs = slice(max(0, int(y0) - 4 * r), int(y0) + 4 * r), slice(max(0, int(x0) - 4 * r), int(x0) + 4 * r)
        truth[ys, xs] += rng.uniform(0.01, 0.3) * np.exp(
            -((xx[ys, xs] - x0) ** 2 + (yy[ys, xs] - y0) ** 2) / (2 * r * r)
        )
    np.save(directory / "truth.npy", truth)
    sigma = rng.uniform(0.0015, 0.0025, frames)
    trail = np.abs((yy - 0.2 * height) - 0.45 * (xx - 0.1 * width)) < 1.5
    for k in range(frames):
        data = truth + rng.normal(0, sigma[k], truth.shape).astype(np.float32)
        if k == 1:
            data[trail] += 0.02
        hot = rng.integers(0, width * height, max(1, width * height // 10000))
        data.reshape(-1)[hot] = rng.uniform(0.1, 1.0, hot.size)
        if k:
            left, top = (int(v) for v in rng.integers(0, 60, 2))
            data[:, :left] = 0
            data[:top] = 0
        header = fits.Header()
        header["NWEIGHT"] = ((sigma[0] / sigma[k]) ** 2, "weight")
        header["NSGREF"] = "frame_0000_nsg.fits"
        fits.PrimaryHDU(data, header).writeto(directory / f"frame_{k:04d}_nsg.fits", overwrite=True)
    np.save(directory / "trail.npy", trail)
    done.write_text(json.dumps({"sigma": sigma.tolist(), "seed": seed}))
    print(f"generated {frames} frames in {time.perf_counter() - started:.0f} s into {directory}")
    return directory


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its threads so far."""
    times = os.times()
    return times.user + times.system


def _frames(directory: Path) -> list[Path]:
    return sorted(directory.glob("frame_*_nsg.fits"))


def _quality(master_path: Path, directory: Path) -> dict:
    """The master's RMS error on the sky between stars (noise plus any hot pixel left) against
    the ideal weighted average's noise, and its worst residual on the trail."""
    import numpy as np
    from astropy.io import fits

    truth = np.load(directory / "truth.npy")
    trail = np.load(directory / "trail.npy")
    sigma = np.asarray(json.loads((directory / "truth.json").read_text())["sigma"])
    master = fits.getdata(master_path).astype(np.float64)
    ideal = 1 / np.sqrt(np.sum(1 / sigma**2))
    residual = master - truth
    inner = np.zeros(truth.shape, bool)
    inner[80:, 80:] = True  # every frame covers it
    flat = truth < np.percentile(truth, 60)  # the sky between stars
    clean = inner & flat & ~trail
    return {
        "rms_over_ideal": float(np.sqrt(np.mean(residual[clean] ** 2)) / ideal),
        "trail_worst_over_ideal": float(np.abs(residual[inner & trail]).max() / ideal),
    }


def measure(kind: str, directory: Path, out: Path, memory: str, backend: str) -> dict:
    """One measurement, in this process."""
    import numpy as np
    import scipy.stats  # noqa: F401  (imported before the clock starts, as every library below)
    from astropy.io import fits

    from nsg_gpu.io import read_frame
    from nsg_gpu.stack_inputs import parse_memory
    from nsg_gpu.stacking import stack

    frames = _frames(directory)
    figures: dict = {"kind": kind, "frames": len(frames)}
    if kind == "ccdproc":
        import warnings

        import ccdproc
        from astropy.nddata import CCDData
    started = time.perf_counter()
    cpu = _cpu_seconds()
    if kind == "read":
        for path in frames:
            read_frame(path)
    elif kind == "nsg":
        result = stack(frames, out, memory=memory, backend=backend)
        figures.update(
            backend=result.backend,
            rejection=result.rejection.reason,
            memory_budget_mb=parse_memory(memory) / 2**20,
            band_rows=result.band_rows,
            bands=result.bands,
            read_s=result.read_seconds,
            combine_s=result.combine_seconds,
            write_s=result.write_seconds,
            scan_s=result.scan_seconds,
        )
    elif kind == "ccdproc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = []
            weights = []
            for path in frames:
                image = CCDData.read(path, unit="adu")
                image.mask = image.data == 0
                images.append(image)
                weights.append(fits.getheader(path)["NWEIGHT"])
            combiner = ccdproc.Combiner(images)
            combiner.sigma_clipping(low_thresh=3, high_thresh=3)
            # Weights of the full shape, 0 where masked or rejected: with one weight per frame
            # average_combine divides by the sum of all the weights, masked or not, which
            # darkens the borders and every rejected pixel.
            combiner.weights = np.asarray(weights, np.float64)[:, None, None] * ~combiner.data_arr.mask
            combined = combiner.average_combine()
            fits.PrimaryHDU(np.asarray(combined.data, np.float32)).writeto(out, overwrite=True)
        figures["rejection"] = "sigma_clipping(3, 3) (one pass, median and standard deviation), full-shape weights"
    else:
        raise ValueError(kind)
    figures["seconds"] = time.perf_counter() - started
    figures["per_frame_s"] = figures["seconds"] / len(frames)
    figures["cpu_per_frame_s"] = (_cpu_seconds() - cpu) / len(frames)
    figures["peak_rss_mb"] = peak_rss_mb()
    if kind != "read":
        figures.update(_quality(out, directory))
    return figures


def _in_subprocess(kind: str, directory: Path, out: Path, memory: str, backend: str) -> dict:
    command = [sys.executable, __file__, "--measure", kind, "--directory", str(directory), "--out", str(out)]
    command += ["--memory", memory, "--backend", backend]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"kind": kind, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--memory", default="2G", help="nsg stack's --memory budget")
    parser.add_argument("--backends", default="numpy,cupy", help="comma-separated; cupy only where usable")
    parser.add_argument("--no-ccdproc", dest="ccdproc", action="store_false", help="leave ccdproc's Combiner out")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nsg-bench-frames")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="numpy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.directory, args.out, args.memory, args.backend)))
        return

    info = machine("ccdproc")
    print_machine(info)
    size = args.frames * args.width * args.height * 4 / 2**30
    print(f"frames: {args.frames} of {args.width} x {args.height} mono float32 ({size:.2f} GiB)")
    directory = frame_set(args.cache, frames=args.frames, width=args.width, height=args.height, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="nsg-stack-bench-", dir=args.cache))
    runs = {"read": _in_subprocess("read", directory, work / "none.fits", args.memory, "numpy")}
    from nsg_gpu.backend import cupy_status

    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name == "cupy" and not cupy_status()[0]:
            print(f"cupy: skipped ({cupy_status()[1]})")
            continue
        runs[f"nsg-{name}"] = _in_subprocess("nsg", directory, work / f"nsg-{name}.fits", args.memory, name)
    if args.ccdproc:
        runs["ccdproc"] = _in_subprocess("ccdproc", directory, work / "ccdproc.fits", args.memory, "numpy")
    floor = runs["read"].get("per_frame_s")
    print(
        f"\n{'':<14}{'s/frame':>10}{'/ read':>9}{'CPU s/frame':>13}{'peak MB':>10}{'rms/ideal':>11}"
        f"{'trail/ideal':>13}  notes"
    )
    for label, r in runs.items():
        if "error" in r:
            print(f"{label:<14}failed: {r['error']}")
            continue
        ratio = r["per_frame_s"] / floor if floor else float("nan")
        notes = ""
        if r["kind"] == "nsg":
            notes = (
                f"budget {r['memory_budget_mb']:.0f} MB, {r['bands']} bands of {r['band_rows']} rows; "
                f"read {r['read_s']:.1f} s (overlapped), combine {r['combine_s']:.1f} s, write {r['write_s']:.1f} s"
            )
        elif r["kind"] == "ccdproc":
            notes = r["rejection"]
        print(
            f"{label:<14}{r['per_frame_s']:>10.3f}{ratio:>9.2f}{r['cpu_per_frame_s']:>13.3f}{r['peak_rss_mb']:>10.0f}"
            f"{r.get('rms_over_ideal', float('nan')):>11.3f}{r.get('trail_worst_over_ideal', float('nan')):>13.1f}"
            f"  {notes}"
        )
    after = machine()["load_average_1_5_15"]
    print(f"\nload average after: {after}")
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "load_average_after": after, "runs": runs}, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
