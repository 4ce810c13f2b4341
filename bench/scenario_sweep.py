"""A user's run over many generator sets: transmissions and NWEIGHT against the truth.

For every scenario and seed, ``nsg synth DIR --scenario S --seed N`` writes the frames and
their truth (cached under --cache), and ``nsg normalize DIR/light_*.fits --reference auto``
normalizes them, as a user would. Each normalized target's transmission per channel is
compared with the truth relative to the reference the run chose (error, and error over the
stated NSGSERR: z), and its NWEIGHT with ``mean_c (sigma_R / (sigma_T m))^2`` from the
noise before registration and the true scale. Frames that fail are listed with their error.
Per scenario and over all: RMS and worst error, RMS and worst z, weight errors, failures.

    python bench/scenario_sweep.py [--scenarios undersampled-sparse-colour,field-dependent-psf,crowded]
                                   [--seeds 11,12,13,14] [--stars N] [--width W --height H]
                                   [--colour] [--elongation E] [--upscale K] [--cache DIR] [--json FILE]

``--elongation E``: the sets' targets have their stars drawn out by up to E (``nsg synth
--elongation``: a trailing mount), frame 0 round. ``--upscale K``: every frame written as a
registration that upscales by K writes it (``nsg synth --upscale``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, print_machine  # noqa: E402

SCENARIOS = "undersampled-sparse-colour,field-dependent-psf,crowded"


def _nsg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsg_gpu", *args], capture_output=True, text=True)


def run_set(
    directory: Path,
    scenario: str,
    seed: int,
    stars: int | None = None,
    size: tuple[int, int] | None = None,
    colour: bool = False,
    elongation: float = 0.0,
    upscale: int = 1,
) -> list[dict]:
    """Write (once) and normalize one set; one row per target. ``size``: (width, height);
    ``colour``: colour frames whatever the scenario says; ``elongation``: the targets' stars
    drawn out by up to this much."""
    if not (directory / "truth.json").exists():
        more = ["--stars", str(stars)] if stars else []
        more += ["--width", str(size[0]), "--height", str(size[1])] if size else []
        more += ["--colour"] if colour else []
        more += ["--elongation", str(elongation)] if elongation else []
        more += ["--upscale", str(upscale)] if upscale > 1 else []
        made = _nsg("synth", str(directory), "--scenario", scenario, "--seed", str(seed), *more)
        if made.returncode:
            raise RuntimeError(made.stderr)
    out = directory / "out"
    # A run into an existing output directory resumes (keeps the frames done before): the
    # sweep measures the code at hand, so every run starts from an empty one.
    shutil.rmtree(out, ignore_errors=True)
    frames = sorted(str(p) for p in directory.glob("light_*.fits"))
    run = _nsg("normalize", *frames, "--reference", "auto", "-o", str(out), "-q")
    if not (out / "results.csv").exists():
        raise RuntimeError(f"{directory}: nsg normalize wrote no results: {run.stderr}")
    truth = {f["name"]: f for f in json.loads((directory / "truth.json").read_text())["frames"]}
    results = list(csv.DictReader((out / "results.csv").open()))
    reference = truth[Path(next(r["file"] for r in results if r["status"] == "reference")).stem]
    rows = []
    for r in results:
        if r["status"] == "reference":
            continue
        row = {"scenario": scenario, "seed": seed, "frame": Path(r["file"]).stem, "reference": reference["name"]}
        if r["status"] != "ok":
            rows.append({**row, "failed": r["error"]})
            continue
        t = truth[row["frame"]]
        true_t = np.asarray(t["transmission"]) / np.asarray(reference["transmission"])
        ours = np.array([float(r[f"transmission_{c}"]) for c in range(true_t.size)])
        stated = np.array([float(r[f"transmission_error_{c}"]) for c in range(true_t.size)])
        true_weight = float(
            np.mean((np.asarray(reference["background_noise"]) * true_t / np.asarray(t["background_noise"])) ** 2)
        )
        rows.append(
            {
                **row,
                "error": list(ours / true_t - 1),
                "z": list((ours - true_t) / stated),
                "weight_error": float(r["weight"]) / true_weight - 1,
                # The fitted PSF's 1 - b/a (results' column since it was measured) and the truth's.
                "ellipticity": float(r["ellipticity"]) if r.get("ellipticity") else None,
                "true_ellipticity": t.get("ellipticity"),
            }
        )
    return rows


def summary(rows: list[dict]) -> str:
    done = [r for r in rows if "error" in r]
    if not done:
        return f"no frame normalized, {len(rows)} failed"
    error = np.concatenate([r["error"] for r in done])
    z = np.concatenate([r["z"] for r in done])
    weight = np.array([r["weight_error"] for r in done])
    return (
        f"{error.size} values: error RMS {100 * np.sqrt(np.mean(error**2)):.2f} %, worst {100 * np.abs(error).max():.2f} %, "
        f"within 0.5 % {np.mean(np.abs(error) < 0.005):.0%}; z RMS {np.sqrt(np.mean(z**2)):.2f}, worst "
        f"{np.abs(z).max():.2f}; weight error mean {100 * weight.mean():+.1f} %, worst {100 * np.abs(weight).max():.1f} %; "
        f"{len(rows) - len(done)} of {len(rows)} targets failed"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=SCENARIOS)
    parser.add_argument("--seeds", default="11,12,13,14")
    parser.add_argument("--stars", type=int, help="stars in every set (default: the scenario's)")
    parser.add_argument("--width", type=int, help="frame width in every set (default: the scenario's)")
    parser.add_argument("--height", type=int, help="frame height in every set (default: the scenario's)")
    parser.add_argument("--colour", action="store_true", help="colour frames in every set (default: the scenario's)")
    parser.add_argument("--elongation", type=float, default=0.0, help="targets' stars drawn out by up to this")
    parser.add_argument(
        "--upscale", type=int, default=1, help="frames written as an upscaling registration writes them"
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nsg-scenario-sweep")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    if (args.width is None) != (args.height is None):
        parser.error("--width and --height go together")
    size = (args.width, args.height) if args.width else None
    rows = []
    for scenario in args.scenarios.split(","):
        these = []
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{scenario}-{seed}" + (f"-{args.stars}-stars" if args.stars else "")
            name += (f"-{size[0]}x{size[1]}" if size else "") + ("-colour" if args.colour else "")
            name += f"-elongated-{args.elongation:g}" if args.elongation else ""
            name += f"-x{args.upscale}" if args.upscale > 1 else ""
            found = run_set(
                args.cache / name, scenario, seed, args.stars, size, args.colour, args.elongation, args.upscale
            )
            for row in found:
                these.append(row)
                head = f"{scenario} seed {seed} {row['frame']} (reference {row['reference']})"
                if "failed" in row:
                    print(f"{head}: failed: {row['failed']}", flush=True)
                else:
                    print(
                        f"{head}: error "
                        + " ".join(f"{100 * e:+.2f}" for e in row["error"])
                        + " %, z "
                        + " ".join(f"{v:+.2f}" for v in row["z"])
                        + f", weight {100 * row['weight_error']:+.1f} %"
                        + (
                            f", 1 - b/a {row['ellipticity']:.2f} (true {row['true_ellipticity']:.2f})"
                            if row["ellipticity"] is not None and row["true_ellipticity"] is not None
                            else ""
                        ),
                        flush=True,
                    )
        print(f"{scenario}: {summary(these)}", flush=True)
        rows += these
    print(f"all: {summary(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
