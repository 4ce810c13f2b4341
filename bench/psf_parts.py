"""What limits the PSF weights on undersampled registered frames, taken apart on generator sets.

Every target of a set is measured on the PSF path alone (``scale._measure`` with PSFs, the
choice against the plain aperture left out) three ways, each with its own seeing correction
and the same scale fit:

- ``model``: as shipped, one factor for every star (``photometry.seeing_correction``: the
  kept shares averaged over where a star falls within its pixel);
- ``per star``: each star's kept shares in both frames from its own model star, the PSF
  integrated over the pixels at the star's place (and for the target through the
  registration's kernel), measured by ``photometry.measure_stars`` exactly as the frames are;
- ``oracle``: each star's kept shares from the generator's own noise-free star light (the
  reference's, and the target's captured at its offset and registered back), measured the
  same way: everything known.

``--psfs true`` replaces the fitted PSFs by the generator's (its FWHM and index, the cubic
spline's kernel at the frame's true offset); ``--positions true`` measures both frames at the
generator's star positions instead of the shared centroids (``scale.shared_positions``).
Prints each target's scale errors and the RMS over the set.

    python bench/psf_parts.py [--scenario undersampled-sparse-mono] [--seeds 11,12,13,14]
        [--psfs fitted|true] [--positions measured|true]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage
from scipy.spatial import cKDTree

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine, print_machine  # noqa: E402

from nsg_gpu import photometry  # noqa: E402
from nsg_gpu import scale as scale_stage  # noqa: E402
from nsg_gpu.io import Frame  # noqa: E402
from nsg_gpu.noise import ksigma_noise  # noqa: E402
from nsg_gpu.params import Parameters  # noqa: E402
from nsg_gpu.psf import MIN_WEIGHT_FWHM, MoffatPSF, pixel_mean  # noqa: E402
from nsg_gpu.reference import prepare_reference  # noqa: E402
from nsg_gpu.resampling import InterpolationKernel, interpolation_taps  # noqa: E402
from nsg_gpu.stamps import channel_peaks  # noqa: E402
from nsg_gpu.stars import detection_image  # noqa: E402
from nsg_gpu.synthetic import SyntheticField  # noqa: E402

#: A sky level under the noise-free frames (0 reads as no data); the annulus takes it off.
SKY = 0.05
#: Half-size (px) of each model star's square.
HALF = 9


def model_frame(shape, psf: MoffatPSF, xs, ys) -> np.ndarray:
    """Unit-flux model stars of ``psf`` at ``xs, ys`` over ``SKY``: integrated over the
    pixels where the camera saw them and, where ``psf.blur`` is set, registered through it."""
    h, w = shape
    out = np.zeros((h, w))
    offsets = np.arange(-HALF, HALF + 1)
    kernel = psf.blur
    cx, cy = kernel.centre if kernel is not None else (0.0, 0.0)
    for x, y in zip(xs, ys):
        xi, yi = int(round(x)), int(round(y))
        if not (HALF <= xi < w - HALF and HALF <= yi < h - HALF):
            continue
        gx, gy = np.meshgrid(offsets + xi, offsets + yi)
        light = pixel_mean(psf, gx - (x + cx), gy - (y + cy))
        if kernel is not None:
            # registered(p) = sum_a taps[a] * captured(p + a), along x then y.
            k = kernel.half
            padded = np.pad(light, k)
            along_x = sum(t * padded[:, i : i + light.shape[1]] for i, t in enumerate(kernel.x))
            light = sum(t * along_x[j : j + light.shape[0], :] for j, t in enumerate(kernel.y))
        out[yi - HALF : yi + HALF + 1, xi - HALF : xi + HALF + 1] += light
    return out[None] + SKY


def true_psfs(field: SyntheticField, k: int) -> tuple[MoffatPSF, MoffatPSF]:
    dy, dx = field.frames[k].shift
    kernel = InterpolationKernel(
        interpolation_taps("cubic spline", dx), interpolation_taps("cubic spline", dy), "cubic spline"
    )

    def psf(j: int, blur) -> MoffatPSF:
        p = MoffatPSF.from_fwhm(field.frames[j].fwhm, field.frames[j].beta, 60, pixel_integrated=True)
        return MoffatPSF(p.alpha, p.beta, 60, True, None, blur, (1e-8, 0.0, 1e-8))

    return psf(0, None), psf(k, kernel)


def measure(field: SyntheticField, reference, k: int, psfs_from: str, positions: str) -> dict:
    truth = field.frames[k].scale(field.reference)[0]
    frame = Frame.from_array(field.render(k), name=str(k))
    dy, dx = field.frames[k].shift
    clean_r = field.stars(0).astype(np.float64) + SKY
    clean_t = (
        np.array(
            [
                scipy.ndimage.shift(p, [-dy, -dx], order=3, mode="nearest")
                for p in field.stars(k, captured=True).astype(np.float64)
            ]
        )
        + SKY
    )
    image = detection_image(frame.data)
    noise_t = ksigma_noise(image, max_pixels=scale_stage.DETECT_NOISE_PIXELS)
    fwhm_t = scale_stage._target_fwhm(reference, image, noise_t)
    tx, ty, found, shared = scale_stage._find_stars(reference, frame, image, noise_t, fwhm_t)
    peak_t = channel_peaks(frame.data, tx, ty)
    psfs = true_psfs(field, k) if psfs_from == "true" else scale_stage.fit_psfs(reference, frame, fwhm_t)
    if psfs is None:
        return {"error": "no PSF fit"}
    reference_psf, target_psf = psfs
    weight = max((p.weights() for p in psfs), key=lambda p: p.fwhm)
    if weight.fwhm < MIN_WEIGHT_FWHM:
        weight = weight.at(MIN_WEIGHT_FWHM / weight.fwhm)
    params = reference.params
    geometry = photometry.geometry_for(weight.pixel_fwhm, params)
    rx, ry = reference.stars.x[reference.photometry_index], reference.stars.y[reference.photometry_index]
    px, py = shared
    ref_at, tgt_at = (px, py), (px + (tx - rx), py + (ty - ry))
    if positions == "true":
        distance, index = cKDTree(np.c_[field.star_x, field.star_y]).query(np.c_[px, py])
        matched = distance < 0.7
        qx, qy = np.where(matched, field.star_x[index], px), np.where(matched, field.star_y[index], py)
        ref_at = tgt_at = (qx, qy)
        if k == 1:
            print(
                f"shared centroids of {matched.sum()} stars against the true places: median "
                f"{np.median(distance[matched]):.3f} px",
                flush=True,
            )
    ref_cut = photometry.cut_out(reference.frame.data, *ref_at, geometry)
    tgt_cut = photometry.cut_out(frame.data, *tgt_at, geometry, keep_mosaic=False)
    ref_defects, tgt_defects = photometry.shared_defects(
        ref_cut, *ref_at, tgt_cut, *tgt_at, photometry.DEFECT_CORE_FWHM * weight.pixel_fwhm
    )

    def photometry_of(data, at, cut, defects):
        return photometry.measure_stars(data, *at, geometry, weight, cutouts=cut, excluded=defects)

    tgt_m = photometry_of(frame.data, tgt_at, tgt_cut, tgt_defects)
    ref_m = photometry_of(reference.frame.data, ref_at, ref_cut, ref_defects)
    shape = clean_r.shape[1:]
    shares = {
        "oracle": (
            photometry_of(clean_t, tgt_at, None, tgt_defects),
            photometry_of(clean_r, ref_at, None, ref_defects),
        ),
        "per star": (
            photometry_of(model_frame(shape, target_psf, *tgt_at), tgt_at, None, tgt_defects),
            photometry_of(model_frame(shape, reference_psf, *ref_at), ref_at, None, ref_defects),
        ),
    }
    usable = (
        ref_m.ok & tgt_m.ok & found & (peak_t < params.linear_range) & (reference.channel_peak < params.linear_range)
    )
    for t, r in shares.values():
        usable &= t.ok & r.ok & (r.flux[0] > 0)
    corrections = {
        "model": np.broadcast_to(
            photometry.seeing_correction(
                geometry, reference_psf=reference_psf, target_psf=target_psf, weight=weight, x=rx, y=ry
            ),
            rx.shape,
        )
    }
    for name, (t, r) in shares.items():
        corrections[name] = np.where(usable, t.flux[0] / np.where(r.flux[0] > 0, r.flux[0], 1.0), 1.0)
    row = {}
    for name, correction in corrections.items():
        x, y = tgt_m.flux[0], ref_m.flux[0] * correction
        sx, sy = tgt_m.flux_error[0], ref_m.flux_error[0] * correction
        fit, _ = scale_stage.fit_pairs(x, y, sx, sy, usable, params)
        row[name] = fit.scale / truth - 1
    oracle = corrections["oracle"][usable]
    row["spread"] = float(np.std(np.log(oracle)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="undersampled-sparse-mono")
    parser.add_argument("--seeds", default="11,12,13,14")
    parser.add_argument("--psfs", choices=("fitted", "true"), default="fitted")
    parser.add_argument("--positions", choices=("measured", "true"), default="measured")
    args = parser.parse_args()
    print_machine(machine())
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        field = SyntheticField(scenario=args.scenario, seed=seed)
        reference = prepare_reference(Frame.from_array(field.render(0), name=f"seed {seed} 0"), Parameters())
        for k in range(1, field.spec.n_frames):
            row = measure(field, reference, k, args.psfs, args.positions)
            if "error" in row:
                print(f"seed {seed} frame {k}: {row['error']}", flush=True)
                continue
            rows.append(row)
            print(
                f"seed {seed} frame {k}: "
                + ", ".join(f"{name} {100 * row[name]:+.2f} %" for name in ("model", "per star", "oracle"))
                + f"; the true shares scatter by {100 * row['spread']:.1f} % between stars",
                flush=True,
            )
    for name in ("model", "per star", "oracle"):
        errors = np.array([r[name] for r in rows])
        print(
            f"{name}: RMS {100 * np.sqrt(np.mean(errors**2)):.2f} %, mean {100 * errors.mean():+.2f} %, "
            f"within 0.5 %: {np.sum(np.abs(errors) <= 0.005)} of {errors.size}"
        )


if __name__ == "__main__":
    main()
