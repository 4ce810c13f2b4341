"""One generator set over several noise draws: are a target's misses its noise, and do the
stated uncertainties say so?

A set's stars, seeing, transmissions and gradients are fixed by its seed; ``noise_seed``
draws its noise (and hot pixels) again. For every draw the set is rendered in memory, its
first frame prepared as the reference and every target measured (``scale.measure_scale``, as
``nsg normalize`` does). Per target: the transmission's error against the truth and over the
stated NSGSERR (z); the fitted Moffat indices of the reference and the target against the
generator's, over the sigma of each fit's own covariance (``MoffatPSF.covariance``). Per set:
the scale's RMS error, mean and RMS z, and for each frame's index the mean error, its spread
over the draws and the RMS of error over stated sigma. A miss that comes and goes with the
draw, at an RMS z near 1, is noise the uncertainty holds; one that stays, a bias.

    python bench/noise_draws.py [--scenario default] [--seeds 8] [--draws 0,1,2,3,4,5]
                                [--stars N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402

from nsg_gpu.errors import NSGError  # noqa: E402
from nsg_gpu.io import Frame  # noqa: E402
from nsg_gpu.params import Parameters  # noqa: E402
from nsg_gpu.reference import prepare_reference  # noqa: E402
from nsg_gpu.scale import measure_scale  # noqa: E402
from nsg_gpu.synthetic import SyntheticField  # noqa: E402


def measure_draw(scenario: str, seed: int, draw: int, stars: int | None) -> list[dict]:
    """Every target of one noise draw of a set: its scale error and z, and both fits' index
    errors with their stated sigmas (first channel)."""
    more = {"n_stars": stars} if stars else {}
    field = SyntheticField(scenario=scenario, seed=seed, noise_seed=draw, **more)
    reference = prepare_reference(Frame.from_array(field.render(0), name=f"seed {seed} draw {draw} 0"), Parameters())
    truth_r = field.frames[0]
    rows = []
    for k in range(1, field.spec.n_frames):
        truth_t = field.frames[k]
        row = {"seed": seed, "draw": draw, "frame": k}
        try:
            measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"seed {seed} draw {draw} {k}"))
        except NSGError as exc:
            rows.append({**row, "failed": str(exc)})
            continue
        true = truth_t.transmission[0] / truth_r.transmission[0]
        fit = measured.fits[0]
        error = (1 / measured.scale[0]) / true - 1
        row.update(error=error, z=error / (fit.scale_error / fit.scale), photometry=measured.photometry)
        for name, psf, truth in (
            ("reference", measured.reference_psf, truth_r),
            ("target", measured.target_psf, truth_t),
        ):
            if psf is not None and psf.covariance is not None:
                row[name] = {"index_error": psf.beta - truth.beta, "index_sigma": math.sqrt(psf.covariance[2])}
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> list[str]:
    done = [r for r in rows if "error" in r]
    lines = []
    if not done:
        return [f"no target measured, {len(rows)} failed"]
    error = np.array([r["error"] for r in done])
    z = np.array([r["z"] for r in done])
    lines.append(
        f"scale: {error.size} values, RMS {100 * np.sqrt(np.mean(error**2)):.2f} %, mean {100 * error.mean():+.2f} %, "
        f"RMS z {np.sqrt(np.mean(z**2)):.2f}, worst z {np.abs(z).max():.2f}; {len(rows) - len(done)} failed"
    )
    for name in ("reference", "target"):
        # The reference's fit is the same for targets that share its stamps: counted once.
        fits = {(r["draw"], r[name]["index_error"]): r[name] for r in done if name in r}
        if not fits:
            continue
        e = np.array([f["index_error"] for f in fits.values()])
        s = np.array([f["index_sigma"] for f in fits.values()])
        lines.append(
            f"{name}'s index: {e.size} fits, error mean {e.mean():+.3f}, spread {e.std():.3f}, stated sigma "
            f"(median) {np.median(s):.3f}, RMS z {np.sqrt(np.mean((e / s) ** 2)):.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--seeds", default="8")
    parser.add_argument("--draws", default="0,1,2,3,4,5")
    parser.add_argument("--stars", type=int, help="stars in the field (default: the scenario's)")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args()
    print_machine(machine())
    every = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows = []
        for draw in (int(d) for d in args.draws.split(",")):
            for row in measure_draw(args.scenario, seed, draw, args.stars):
                rows.append(row)
                if "failed" in row:
                    print(f"seed {seed} draw {draw} frame {row['frame']}: failed: {row['failed']}", flush=True)
                    continue
                fits = ", ".join(
                    f"{name} index {row[name]['index_error']:+.3f} (sigma {row[name]['index_sigma']:.3f})"
                    for name in ("reference", "target")
                    if name in row
                )
                print(
                    f"seed {seed} draw {draw} frame {row['frame']}: error {100 * row['error']:+.2f} %, "
                    f"z {row['z']:+.2f} ({row['photometry']}); {fits}",
                    flush=True,
                )
        stars = f", {args.stars} stars" if args.stars else ""
        for line in summary(rows):
            print(f"{args.scenario} seed {seed}{stars}: {line}", flush=True)
        every += rows
    if args.json:
        args.json.write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()
