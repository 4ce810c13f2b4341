"""The catalogue's FWHM reading (``nsg_gpu.stars.detect_stars``) against the generator's
FWHM, over fields of broad and ordinary stars.

For each FWHM range and seed, a default-scenario set of three frames (2000 x 1400 px, 3500
stars on the generator's nebula, Moffat index 2.8-3.3, frames not resampled) is rendered and
each frame's stars detected; prints every reading more than 12 % off the truth, and how many
there were and the worst. The reading sizes every filter, aperture and PSF stamp after it
(docs/scale-accuracy.md, "The quick FWHM: only the star's own pixels").

    python bench/fwhm_readings.py [--ranges 3-5,5-7,6-9,8-11] [--seeds 1,2,3,4,5,6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402

from nsg_gpu.stars import detect_stars  # noqa: E402
from nsg_gpu.synthetic import SyntheticField  # noqa: E402

#: A reading this far off the truth is reported.
OFF = 0.12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranges", default="3-5,5-7,6-9,8-11")
    parser.add_argument("--seeds", default="1,2,3,4,5,6")
    args = parser.parse_args()
    print_machine(machine())
    ranges = [tuple(float(v) for v in r.split("-")) for r in args.ranges.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    errors = []
    for lo, hi in ranges:
        for seed in seeds:
            field = SyntheticField(seed=seed, n_frames=3, fwhm_range=(lo, hi))
            for k in range(field.spec.n_frames):
                truth = field.frames[k].fwhm
                catalog = detect_stars(field.render(k))
                error = catalog.fwhm / truth - 1
                errors.append(error)
                if abs(error) > OFF:
                    print(
                        f"FWHM {lo:g}-{hi:g} px, seed {seed}, frame {k}: {truth:.2f} px read {catalog.fwhm:.2f} "
                        f"({100 * error:+.0f} %), {len(catalog)} stars",
                        flush=True,
                    )
    errors = np.abs(np.array(errors))
    print(
        f"readings more than {100 * OFF:.0f} % off: {int(np.sum(errors > OFF))} of {errors.size}; "
        f"median {100 * np.median(errors):.1f} %, worst {100 * errors.max():.1f} %"
    )


if __name__ == "__main__":
    main()
