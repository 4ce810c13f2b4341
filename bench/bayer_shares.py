"""What limits the undersampled colour scenario: each star's Bayer share, or the noise.

With the generator's 2x2 cells (``SyntheticSpec.bayer``, a superpixel debayer), the red and
blue pixels of a star are the light on one photosite of each cell: a star of about one cell
FWHM puts 10-30 % more or less of its light there depending on where it falls in the cell,
and a registered target was captured at another sub-pixel place than the reference. This
script measures every target of a set with ``measure_scale`` twice in one run: as shipped,
and with each star's seeing correction multiplied per channel by the true ratio of its
shares (target over reference, from the generator's own stamps at the star's captured
place, ``SyntheticField.bayer_shares``), which removes the cells' effect and leaves everything else. Both are printed
against the truth, with the RMS of the errors; ``--override`` changes the spec (e.g.
``'{"noise_sigma": 1.5e-5}'`` for frames almost without noise, ``'{"registration": false}'``).

    python bench/bayer_shares.py [--seeds 1,3,5] [--override JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402

from nsg_gpu import photometry  # noqa: E402
from nsg_gpu.io import Frame  # noqa: E402
from nsg_gpu.params import Parameters  # noqa: E402
from nsg_gpu.reference import prepare_reference  # noqa: E402
from nsg_gpu.scale import measure_scale  # noqa: E402
from nsg_gpu.synthetic import SyntheticField  # noqa: E402


def measure(field: SyntheticField, k: int, reference, *, shares: bool) -> list[float]:
    """Frame ``k``'s scale errors per channel, with the true shares or as shipped."""
    shipped = photometry.seeing_correction

    def corrected(geometry, **kw):
        base = shipped(geometry, **kw)
        x, y = kw["x"], kw["y"]
        # The catalogue's stars matched to the generator's within 1 px.
        distance = np.hypot(field.star_x[None] - x[:, None], field.star_y[None] - y[:, None])
        nearest = distance.argmin(axis=1)
        matched = distance[np.arange(x.size), nearest] < 1.0
        sx, sy = field.star_x[nearest], field.star_y[nearest]
        ratio = field.bayer_shares(k, sx, sy) / field.bayer_shares(0, sx, sy)
        ratio[:, ~matched] = 1.0
        return np.asarray(base)[None] * ratio

    truth = field.frames[k].scale(field.reference)
    photometry.seeing_correction = corrected if shares else shipped
    try:
        measured = measure_scale(reference, Frame.from_array(field.render(k), name=f"frame {k}"))
    finally:
        photometry.seeing_correction = shipped
    return [fit.scale / truth[c] - 1 for c, fit in enumerate(measured.fits)], [
        fit.scale_error / fit.scale for fit in measured.fits
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,3,5")
    parser.add_argument("--override", default="{}", help="JSON of spec fields")
    args = parser.parse_args()
    print_machine(machine())
    errors = {False: [], True: []}
    for seed in (int(s) for s in args.seeds.split(",")):
        spec = {"scenario": "undersampled-sparse-colour", "n_frames": 4, "seed": seed, **json.loads(args.override)}
        field = SyntheticField(**spec)
        reference = prepare_reference(Frame.from_array(field.render(0), name="frame 0"), Parameters())
        for k in range(1, field.spec.n_frames):
            row = []
            for shares in (False, True):
                try:
                    error, stated = measure(field, k, reference, shares=shares)
                except Exception as exc:  # a frame that fails is a result too
                    row.append(f"failed: {exc}")
                    continue
                errors[shares].extend(error)
                row.append(", ".join(f"{100 * e:+.2f}" for e in error) + " %")
            print(
                f"seed {seed} frame {k}: shipped {row[0]}; true shares {row[1]} (stated "
                + ", ".join(f"{100 * s:.2f}" for s in stated)
                + " %)",
                flush=True,
            )
    for shares, values in errors.items():
        v = np.array(values)
        label = "with the true shares" if shares else "shipped"
        print(f"{label}: RMS {100 * np.sqrt(np.mean(v**2)):.2f} %, worst {100 * np.abs(v).max():.2f} % over {v.size}")


if __name__ == "__main__":
    main()
