"""Each halo target measured by every photometry the scale stage can take.

On the sets of ``bench/scale_errors.py --halo`` (stars of a Gaussian core and a Gaussian halo,
``tests/independent.py``: ``core_and_halo_frames``), every target is measured as shipped and,
from the same detections, with the PSF weights (W), the plain aperture corrected by the fitted
PSFs (AF) and the plain aperture with its assumed Moffat of index 3 (AA): each one's error
against the truth and its stated uncertainty, the check's difference in standard errors, and
which one the frame took. Closes with the RMS of each over the targets that have all three,
and of the one taken. Prints the machine and library versions; --json writes the figures.

    python bench/halo_apertures.py [--sets 0.2,2.5:1,2,3 0.3,2:1,2,3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests"), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402
from independent import core_and_halo_frames, halo_settings  # noqa: E402

from nsg_gpu import scale  # noqa: E402
from nsg_gpu.io import Frame  # noqa: E402
from nsg_gpu.params import Parameters  # noqa: E402
from nsg_gpu.reference import prepare_reference  # noqa: E402

SETS = ["0.2,2.5:1,2,3", "0.3,2:1,2,3", "0.1,2.5:1,2,3", "0.15,3:4,5,6", "0.25,1.8:4,5,6"]


def _kind(measured) -> str:
    if measured.weighted:
        return "W"
    return "AF" if measured.target_psf is not None else "AA"


def target_rows(spec: str) -> list[dict]:
    shape, seeds = spec.split(":")
    share, width = (float(v) for v in shape.split(","))
    measure = scale._measure
    rows = []
    for seed in (int(v) for v in seeds.split(",")):
        settings = halo_settings(seed)
        frames = core_and_halo_frames(settings, seed=seed, halo_share=share, halo_width=width)
        reference = prepare_reference(Frame.from_array(frames[0], name="reference"), Parameters())
        for k in range(1, len(settings)):
            transmission = settings[k][0]
            calls = []

            def spy(*args, calls=calls, **kwargs):
                calls.append(args)
                return measure(*args, **kwargs)

            scale._measure = spy
            try:
                taken = scale.measure_scale(reference, Frame.from_array(frames[k], name=f"target {k}"))
            finally:
                scale._measure = measure
            args = calls[0]  # the first: the fitted PSFs, or None where none were fitted
            measured = {"AA": measure(*args[:-1], None)}
            if args[-1] is not None:
                measured["W"] = measure(*args)
                measured["AF"] = measure(*args, weighted=False)
            row = {"set": f"halo {shape} seed {seed}", "frame": k, "fwhm": settings[k][1], "taken": _kind(taken)}
            for name, m in measured.items():
                row[name] = (m.scale[0] * transmission - 1, m.fits[0].scale_error / m.scale[0])
            check = measured["W"].aperture_check if "W" in measured else None
            row["check_sigmas"] = check[0][0] / check[0][1] if check and check[0] is not None else None
            rows.append(row)
            text = " ".join(
                f"{n} {100 * row[n][0]:+.2f} % ({100 * row[n][1]:.2f})" for n in ("W", "AF", "AA") if n in row
            )
            sigmas = "" if row["check_sigmas"] is None else f", check {row['check_sigmas']:+.1f} sigma"
            print(f"{row['set']} frame {k} ({row['fwhm']:.2f} px): took {row['taken']}; {text}{sigmas}", flush=True)
    return rows


def _rms(values) -> float:
    values = list(values)
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=SETS, help="SHARE,WIDTH:SEEDS per set")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    rows = [row for spec in args.sets for row in target_rows(spec)]
    full = [r for r in rows if "AF" in r]
    for name in ("W", "AF", "AA"):
        errors = [r[name][0] for r in full]
        within = sum(abs(e) <= 0.005 for e in errors)
        z = _rms(r[name][0] / r[name][1] for r in full)
        print(
            f"{name} on the {len(full)} targets with fitted PSFs: RMS {100 * _rms(errors):.2f} %, {within} within 0.5 %, RMS z {z:.2f}"
        )
    taken = [r[r["taken"]] for r in rows]
    within = sum(abs(e) <= 0.005 for e, _ in taken)
    print(
        f"taken, all {len(rows)} targets: RMS {100 * _rms(e for e, _ in taken):.2f} %, {within} within 0.5 %, "
        f"RMS z {_rms(e / s for e, s in taken):.2f}, worst z {max(abs(e / s) for e, s in taken):.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
