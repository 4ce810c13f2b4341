"""Sparse sets cut from the real frames: does any frame fail for want of stars where an
extractor finds them, and do the scales still agree with sep?

Every frame of ../shared/data/ngc7023 and ../shared/data/stargate is cut into five regions
(the four quarters and the centre half; with ``--grid N`` an N x N grid of tiles, sparser
still), each region's frames are written as one set, and
``nsg normalize SET -r <the set's reference stem>`` runs on it as a user would. Each target is
then compared with the independent photometry of ``tests/independent.py`` (sep, wide
apertures; not our code): per channel, our transmission and NSGSERR against sep's median ratio
and bootstrap error, where sep keeps at least three stars. sep's 5-sigma detections (less
single hot pixels) are counted on the region's reference and target. Prints one line per
target, then the frames that failed with the extractor's counts, the RMS and worst of
(ours - sep) / combined error, and the median |ours / sep - 1|.

    python bench/real_crops.py [--grid N] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "tests"), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402
from independent import (  # noqa: E402
    NGC7023,
    NGC7023_REFERENCE,
    STARGATE,
    STARGATE_REFERENCE,
    extractor_stars,
    independent_transmission,
    read_planes,
)

SETS = {
    "ngc7023": (NGC7023, NGC7023_REFERENCE),
    "stargate": (STARGATE, STARGATE_REFERENCE),
}
#: sep must keep at least this many stars in a channel for a comparison.
MIN_SEP_STARS = 3


def regions(height: int, width: int, grid: int = 0) -> list[tuple[slice, slice]]:
    """The four quarters and the centre half; with ``grid`` the tiles of a grid x grid cut."""
    if grid:
        rows = [slice(height * i // grid, height * (i + 1) // grid) for i in range(grid)]
        cols = [slice(width * j // grid, width * (j + 1) // grid) for j in range(grid)]
        return [(r, c) for r in rows for c in cols]
    h2, w2, h4, w4 = height // 2, width // 2, height // 4, width // 4
    return [
        (slice(0, h2), slice(0, w2)),
        (slice(0, h2), slice(w2, width)),
        (slice(h2, height), slice(0, w2)),
        (slice(h2, height), slice(w2, width)),
        (slice(h4, height - h4), slice(w4, width - w4)),
    ]


def cut(files: list[Path], rows: slice, cols: slice, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for path in files:
        with fits.open(path) as hdul:
            data, header = hdul[0].data[..., rows, cols].copy(), hdul[0].header.copy()
        fits.writeto(directory / path.name.removesuffix(".gz"), data, header, overwrite=True)


def run_region(directory: Path, reference_stem: str) -> list[dict]:
    out = directory / "nsg"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nsg_gpu",
            "normalize",
            str(directory),
            "-r",
            reference_stem,
            "-o",
            str(out),
            "-q",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
    )
    if (out / "results.csv").exists():
        results = {Path(r["file"]).name: r for r in csv.DictReader((out / "results.csv").open())}
    else:
        # The run stopped before any frame (its reference unusable): every target failed with
        # the run's error.
        message = (run.stderr.strip().splitlines() or ["no results"])[-1]
        results = {p.name: {"status": "failed", "error": message, "scale_flag": ""} for p in directory.glob("*.fits")}
    reference_path = directory / f"{reference_stem.removesuffix('.fits.gz')}.fits"
    reference = read_planes(reference_path)
    reference_stars = len(extractor_stars(reference)[0])
    rows = []
    for path in sorted(directory.glob("*.fits")):
        if path == reference_path:
            continue
        target = read_planes(path)
        r = results[path.name]
        row = {
            "region": directory.name,
            "frame": path.stem,
            "reference_stars": reference_stars,
            "target_stars": len(extractor_stars(target)[0]),
            "status": r["status"],
            "error": r["error"],
            "flag": r["scale_flag"],
            "channels": [],
        }
        if r["status"] == "ok":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sep = independent_transmission(reference, target)
            for c, s in enumerate(sep):
                ours, stated = float(r[f"transmission_{c}"]), float(r[f"transmission_error_{c}"])
                channel = {"ours": ours, "stated": stated, "sep_stars": int(s.ratios.size)}
                if s.ratios.size >= MIN_SEP_STARS:
                    combined = float(np.hypot(stated, s.bootstrap_error()))
                    channel.update(sep=s.transmission, sep_error=s.bootstrap_error())
                    channel.update(z=(ours - s.transmission) / combined, difference=ours / s.transmission - 1)
                row["channels"].append(channel)
        rows.append(row)
    return rows


def line(row: dict) -> str:
    head = f"{row['region']:<10} {row['frame'][:8]:<8} sep stars {row['reference_stars']:>3}/{row['target_stars']:>3}"
    if row["status"] != "ok":
        return f"{head}: {row['status'].upper()}: {row['error']}"
    parts = []
    for ch in row["channels"]:
        if "z" in ch:
            parts.append(
                f"{ch['ours']:.3f}+-{ch['stated']:.3f} sep {ch['sep']:.3f}+-{ch['sep_error']:.3f} "
                f"({ch['sep_stars']}) {100 * ch['difference']:+.1f} % z {ch['z']:+.2f}"
            )
        else:
            parts.append(f"{ch['ours']:.3f}+-{ch['stated']:.3f} sep: {ch['sep_stars']} stars")
    return f"{head}: " + " | ".join(parts) + ("  flagged" if row["flag"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nsg-real-crops")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("--grid", type=int, default=0, help="cut N x N tiles instead of the five regions")
    args = parser.parse_args()
    info = machine("sep")
    print_machine(info)
    rows = []
    for name, (folder, reference) in SETS.items():
        files = sorted(folder.glob("*.fits.gz"))
        if not files:
            print(f"{name}: no frames at {folder}")
            continue
        height, width = fits.getdata(files[0]).shape[-2:]
        for k, (r, c) in enumerate(regions(height, width, args.grid)):
            directory = args.work / (f"{name}-{args.grid}x{args.grid}-{k}" if args.grid else f"{name}-{k}")
            cut(files, r, c, directory)
            for row in run_region(directory, reference.removesuffix(".fits.gz")):
                rows.append(row)
                print(line(row), flush=True)
    failed = [r for r in rows if r["status"] != "ok"]
    z = np.array([ch["z"] for r in rows for ch in r["channels"] if "z" in ch])
    difference = np.array([abs(ch["difference"]) for r in rows for ch in r["channels"] if "z" in ch])
    print(f"{len(rows)} targets in {len(rows) and len({r['region'] for r in rows})} regions; {len(failed)} failed")
    for r in failed:
        print(
            f"  {r['region']} {r['frame']}: sep finds {r['reference_stars']} stars on the reference, {r['target_stars']} on the target"
        )
    if z.size:
        print(
            f"against sep: {z.size} channels, RMS z {np.sqrt(np.mean(z**2)):.2f}, worst {np.abs(z).max():.2f}, "
            f"median |difference| {100 * np.median(difference):.1f} %"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
