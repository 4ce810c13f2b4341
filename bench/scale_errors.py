"""The scale stage alone, in memory: each frame's scale error and its stated uncertainty.

For synthetic sets (``nsg_gpu.synthetic``, known truth) every target is measured against frame
0 with ``measure_scale`` and its error per channel is printed next to the stated uncertainty
(what becomes NSGSERR, relative) and their ratio z, with the photometry it took (PSF-weighted
with the fitted FWHM / index and whether the fit integrated over the pixels, or the plain
aperture); the RMS of z over all sets closes. ``--override`` changes every set's spec (e.g.
``'{"registration": false}'``); ``--scenario NAME --seeds LIST`` measures that generator
scenario's sets (its own frame count) instead; ``--sparse`` measures the undersampled scenarios with 20-130
stars instead (eight fields each) and closes with each star count's figures. With ``--real`` the real frames in ../shared/data are measured
instead, against sep's wide-aperture transmissions (``tests/independent.py``: the median
ratio, and the summed fluxes of the 7 brightest stars); the median |ours / sep - 1| per set
closes; ``--resampled-reference`` takes a frame that registration resampled as each set's
reference (``RESAMPLED``), as ``--reference auto`` does on StarGate. With ``--halo SHARE,WIDTH``
the sets are drawn without our generator (``tests/independent.py``: ``core_and_halo_frames``):
stars of a Gaussian core and a Gaussian halo WIDTH times as broad holding SHARE of the light, no
Moffat, a 3 px reference and four targets of 2.3-4 px per seed of ``--seeds``; each line also
gives the PSF weights' check against the plain aperture (``scale.aperture_check``). Prints
the machine and library versions; --json writes the figures.

    python bench/scale_errors.py [--sets "undersampled seed 1,mid seed 7"] [--override JSON] [--sparse] [--real]
        [--resampled-reference] [--scenario NAME --seeds 11,12,13,14] [--reference 1]
        [--photometry aperture] [--halo 0.2,2.5 --seeds 1,2,3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests"), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402

from nsg_gpu.io import Frame, read_frame  # noqa: E402
from nsg_gpu.params import Parameters  # noqa: E402
from nsg_gpu.reference import as_measured, prepare_reference  # noqa: E402
from nsg_gpu.scale import measure_scale  # noqa: E402
from nsg_gpu.synthetic import SyntheticField  # noqa: E402

#: Stars of 1.5-2.5 px before the pixels (read as 1.95-2.8 px), 1500 on 1200 x 800 px.
_MID = dict(width=1200, height=800, n_stars=1500, fwhm_range=(1.5, 2.5), beta_range=(2.5, 4.0), pixel_integrated=True)
SETS = {
    "undersampled seed 1": dict(scenario="undersampled-sparse-colour", n_frames=4, seed=1),
    "undersampled seed 3": dict(scenario="undersampled-sparse-colour", n_frames=4, seed=3),
    "undersampled seed 5": dict(scenario="undersampled-sparse-colour", n_frames=4, seed=5),
    "field-dependent": dict(scenario="field-dependent-psf", width=1200, height=800, n_stars=1200, n_frames=3),
    "crowded": dict(scenario="crowded", width=1200, height=800, n_stars=8700, n_frames=3),
    "mono seed 1": dict(seed=1, n_frames=5),
    "colour seed 11": dict(seed=11, n_frames=3, colour=True),
    **{f"mid seed {s}": dict(_MID, registration=True, n_frames=5, seed=s) for s in (7, 8, 9)},
    **{f"mid unregistered seed {s}": dict(_MID, n_frames=5, seed=s) for s in (7, 8, 9)},
}
#: Sparse sets: the undersampled scenarios with fewer stars, eight fields each (``--sparse``).
SPARSE = {
    f"sparse {kind} {n} stars seed {seed}": dict(
        scenario=f"undersampled-sparse-{kind}", n_stars=n, n_frames=4, seed=seed
    )
    for kind in ("colour", "mono")
    for n in (20, 35, 50, 130)
    for seed in range(21, 29)
}
REAL = {"ngc7023": "000_Light_NGC_7023_10.0s_IRCUT_20240730-224436.fits.gz", "stargate": "sg_0005.fits.gz"}
#: With ``--resampled-reference``: a frame that registration resampled, as ``--reference auto``
#: chooses on StarGate.
RESAMPLED = {"ngc7023": "001_Light_NGC_7023_10.0s_IRCUT_20240730-224448.fits.gz", "stargate": "sg_0001.fits.gz"}


def _path(measured) -> str:
    psf = measured.target_psf
    if psf is None:
        return "aperture"
    reference = f"{measured.reference_psf.fwhm:.2f}/{measured.reference_psf.beta:.2f}"
    # getattr: so that the script measures commits from before these attributes too.
    if not getattr(measured, "weighted", True):
        return f"aperture, fitted {reference} -> {psf.fwhm:.2f}/{psf.beta:.2f}"
    kind = "integrated" if getattr(psf, "pixel_integrated", False) else "sampled"
    text = f"PSF {kind} {reference}"
    text += _shape(measured.reference_psf) + f" -> {psf.fwhm:.2f}/{psf.beta:.2f}" + _shape(psf)
    return text


def _check(measured, c: int) -> str:
    checks = getattr(measured, "aperture_check", None)
    if not checks or checks[c] is None:
        return ""
    difference, sigma = checks[c]
    crowding = getattr(measured, "crowding", None)
    annulus = "" if crowding is None else f", annulus {crowding:.2f} noise"
    return f", against the aperture {100 * difference:+.2f} % ({difference / sigma:+.1f} sigma{annulus})"


def _check_figures(measured, c: int) -> dict:
    checks = getattr(measured, "aperture_check", None)
    if not checks or checks[c] is None:
        return {}
    return {"check": checks[c][0], "check_sigma": checks[c][1]}


def halo(seeds: list[int], share: float, width: float, params: Parameters) -> list[dict]:
    """Sets of stars no Moffat is (``independent.core_and_halo_frames``), each target against
    the 3 px reference."""
    from independent import core_and_halo_frames, halo_settings

    rows = []
    for seed in seeds:
        settings = halo_settings(seed)
        frames = core_and_halo_frames(settings, seed=seed, halo_share=share, halo_width=width)
        reference = prepare_reference(Frame.from_array(frames[0], name="reference"), params)
        name = f"halo {share:g} x {width:g} seed {seed}"
        for k, (transmission, fwhm, _, _) in enumerate(settings[1:], 1):
            measured = measure_scale(reference, Frame.from_array(frames[k], name=f"{name} {k}"))
            fit = measured.fits[0]
            error, stated = fit.scale * transmission - 1, fit.scale_error / fit.scale
            rows.append({"set": name, "frame": k, "channel": 0, "fwhm": fwhm, "error": error, "stated": stated})
            rows[-1].update(z=error / stated, **_check_figures(measured, 0))
            print(
                f"{name} frame {k} ({fwhm:.2f} px): {_path(measured)}, error {100 * error:+.3f} % "
                f"(stated {100 * stated:.3f} %, z {error / stated:+.2f}){_check(measured, 0)}",
                flush=True,
            )
    return rows


def _shape(psf) -> str:
    """`` e 0.24 at 54`` for a drawn-out fit (1 - b/a, major axis in degrees); empty for round
    ones and commits before the fits measured the shape."""
    if getattr(psf, "round", True):
        return ""
    return f" e {psf.ellipticity:.2f} at {psf.elongation_angle:.0f}"


def synthetic(
    names: list[str], override: dict, extra: dict | None = None, params: Parameters | None = None, reference: int = 0
) -> list[dict]:
    rows = []
    for name in names:
        field = SyntheticField(**{**{**SETS, **SPARSE, **(extra or {})}[name], **override})
        chosen = prepare_reference(
            Frame.from_array(field.render(reference), name=f"{name} {reference}"), params or Parameters()
        )
        for k in range(field.spec.n_frames):
            if k == reference:
                continue
            truth = field.frames[k].scale(field.frames[reference])
            try:
                measured = measure_scale(chosen, Frame.from_array(field.render(k), name=f"{name} {k}"))
            except Exception as exc:  # a frame that fails is a result too
                print(f"{name} frame {k}: failed: {exc}", flush=True)
                rows.append({"set": name, "frame": k, "error": str(exc)})
                continue
            for c, fit in enumerate(measured.fits):
                error, stated = fit.scale / truth[c] - 1, fit.scale_error / fit.scale
                rows.append(
                    {"set": name, "frame": k, "channel": c, "error": error, "stated": stated, "z": error / stated}
                )
                rows[-1].update(_check_figures(measured, c))
                print(
                    f"{name} frame {k} ch {c}: {_path(measured)}, error {100 * error:+.3f} % "
                    f"(stated {100 * stated:.3f} %, z {error / stated:+.2f}), {fit.n_pairs} pairs{_check(measured, c)}",
                    flush=True,
                )
    return rows


def real(names: list[str], references: dict[str, str] = REAL, params: Parameters | None = None) -> list[dict]:
    from independent import SHARED_DATA_ROOT, independent_transmission, read_planes

    rows = []
    for name in names:
        directory = SHARED_DATA_ROOT / name
        if not directory.is_dir():
            print(f"{name}: no frames at {directory}")
            continue
        reference_path = directory / references[name]
        reference = prepare_reference(read_frame(reference_path), params or Parameters())
        planes = read_planes(reference_path)
        for path in sorted(directory.glob("*.fits.gz")):
            if path == reference_path:
                continue
            # As normalize_frame measures it: scattered zeros as data, a pedestal for negative data.
            measured = measure_scale(reference, as_measured(read_frame(path))[0])
            for c, (fit, sep) in enumerate(zip(measured.fits, independent_transmission(planes, read_planes(path)))):
                ours, stated = 1 / fit.scale, fit.scale_error / fit.scale**2
                combined = float(np.hypot(stated, sep.bootstrap_error()))
                deviation = (ours - sep.transmission) / combined
                rows.append({"set": name, "frame": path.name, "channel": c, "transmission": ours, "stated": stated})
                summed, summed_error = sep.summed()
                rows[-1].update(sep=sep.transmission, sep_error=sep.bootstrap_error(), z=deviation)
                rows[-1].update(sep_summed=summed, sep_summed_error=summed_error)
                print(
                    f"{path.name[:7]} ch {c}: {_path(measured)}, transmission {ours:.4f} +- {stated:.4f}, "
                    f"sep {sep.transmission:.4f} +- {sep.bootstrap_error():.4f}: {100 * (ours / sep.transmission - 1):+.2f} % "
                    f"({deviation:+.2f} sigma); sep's 7 brightest summed {summed:.4f} +- {summed_error:.4f}: "
                    f"{100 * (ours / summed - 1):+.2f} %",
                    flush=True,
                )
    return rows


def _sparse_summary(rows: list[dict]) -> None:
    """Per scenario and star count: RMS, median and worst error, RMS z, failed frames."""
    for group in dict.fromkeys(row["set"].rsplit(" seed", 1)[0] for row in rows):
        mine = [row for row in rows if row["set"].rsplit(" seed", 1)[0] == group]
        e = np.array([row["error"] for row in mine if "z" in row])
        z = np.array([row["z"] for row in mine if "z" in row])
        failed = sum(1 for row in mine if "z" not in row)
        print(
            f"{group}: {e.size} channel scales, RMS {100 * np.sqrt(np.mean(e**2)):.2f} %, median |error| "
            f"{100 * np.median(np.abs(e)):.2f} %, worst {100 * np.max(np.abs(e)):.1f} %, RMS z "
            f"{np.sqrt(np.mean(z**2)):.2f}; {failed} frames failed"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", help="comma-separated set names (default: all)")
    parser.add_argument("--override", default="{}", help="JSON of spec fields set in every synthetic set")
    parser.add_argument("--real", action="store_true", help="the real frames against sep instead")
    parser.add_argument(
        "--resampled-reference", action="store_true", help="with --real: a resampled frame as each set's reference"
    )
    parser.add_argument(
        "--real-reference",
        action="append",
        default=[],
        metavar="SET=FRAME",
        help="with --real: FRAME (a file name in the set's directory) as SET's reference; repeatable",
    )
    parser.add_argument(
        "--sparse", action="store_true", help="the undersampled scenarios with 20-130 stars, 8 fields each, instead"
    )
    parser.add_argument("--scenario", help="a generator scenario measured at --seeds instead (its own frames)")
    parser.add_argument("--seeds", default="11,12,13,14", help="with --scenario or --halo: comma-separated seeds")
    parser.add_argument(
        "--reference", type=int, default=0, help="with --scenario: this frame as the reference (1: a registered one)"
    )
    parser.add_argument("--photometry", default="psf", help="psf (the default) or aperture")
    parser.add_argument("--halo", help="SHARE,WIDTH: stars of a core and a halo (no Moffat) at --seeds instead")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    info = machine("sep")
    print_machine(info)
    if args.real:
        references = dict(RESAMPLED if args.resampled_reference else REAL)
        references.update(item.split("=", 1) for item in args.real_reference)
        rows = real(
            [n.strip() for n in args.sets.split(",")] if args.sets else list(REAL),
            references,
            Parameters(photometry=args.photometry),
        )
    elif args.halo:
        share, width = (float(v) for v in args.halo.split(","))
        rows = halo([int(s) for s in args.seeds.split(",")], share, width, Parameters(photometry=args.photometry))
    elif args.scenario:
        extra = {f"{args.scenario} seed {s}": dict(scenario=args.scenario, seed=int(s)) for s in args.seeds.split(",")}
        rows = synthetic(
            list(extra), json.loads(args.override), extra, Parameters(photometry=args.photometry), args.reference
        )
        errors = np.array([row["error"] for row in rows if "z" in row])
        failed = sum("z" not in row for row in rows)
        print(
            f"{args.scenario}: RMS error {100 * np.sqrt(np.mean(errors**2)):.2f} %, within 0.5 %: "
            f"{np.sum(np.abs(errors) <= 0.005)} of {errors.size}; {failed} failed"
        )
    else:
        names = [n.strip() for n in args.sets.split(",")] if args.sets else list(SPARSE if args.sparse else SETS)
        rows = synthetic(names, json.loads(args.override), params=Parameters(photometry=args.photometry))
        if args.sparse:
            _sparse_summary(rows)
    for name in sorted({row["set"] for row in rows if "sep" in row}):
        mine = [row for row in rows if row["set"] == name and "sep" in row]
        median = np.median([abs(row["transmission"] / row["sep"] - 1) for row in mine])
        summed = np.median([abs(row["transmission"] / row["sep_summed"] - 1) for row in mine])
        mean = np.mean([row["transmission"] / row["sep_summed"] - 1 for row in mine])
        print(
            f"{name}: median |ours / sep - 1| {100 * median:.2f} %; against the 7 brightest summed "
            f"{100 * summed:.2f} % (mean {100 * mean:+.2f} %)"
        )
        # A reference's own measurement moves every target's ratio alike: the mean per channel.
        by_channel = [
            np.mean([row["transmission"] / row["sep"] - 1 for row in mine if row["channel"] == c])
            for c in sorted({row["channel"] for row in mine})
        ]
        print(f"{name}: mean ours / sep - 1 per channel " + ", ".join(f"{100 * v:+.2f} %" for v in by_channel))
    z = np.array([row["z"] for row in rows if "z" in row])
    print(f"RMS z {np.sqrt(np.mean(z**2)):.2f} over {z.size}, worst {np.max(np.abs(z)):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
