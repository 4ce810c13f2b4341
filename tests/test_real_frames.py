"""Real frames, where present: Seestar S50 colour frames of NGC 7023 (../shared/data/ngc7023) and
mono frames of the StarGate asterism registered at sub-pixel shifts (../shared/data/stargate).

Our transmissions are checked against an independent wide-aperture photometry with sep
(``tests/independent.py``), and the weights of the registered StarGate frames against how much
registration smoothed each frame's noise, measured from the noise's own pixel differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import SHARED_DATA
from independent import (
    NGC7023,
    NGC7023_REFERENCE,
    STARGATE,
    STARGATE_REFERENCE,
    _aperture_flux,
    extractor_shape,
    extractor_stars,
    independent_transmission,
    read_planes,
    spline_smoothing,
    stacked_stars,
    star_colours,
)

from nsg_gpu.io import Frame, read_frame
from nsg_gpu.noise import ksigma_noise
from nsg_gpu.params import Parameters
from nsg_gpu.reference import prepare_reference
from nsg_gpu.run import normalize
from nsg_gpu.scale import measure_scale
from nsg_gpu.stacking import stack

pytestmark = [
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real frames not present at {SHARED_DATA}"),
    pytest.mark.slow,
]
needs_stargate = pytest.mark.skipif(not STARGATE.is_dir(), reason=f"real frames not present at {STARGATE}")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """All six frames normalized to the first 10 s frame."""
    frames = sorted(SHARED_DATA.glob("*.fits.gz"))
    out = tmp_path_factory.mktemp("ngc7023")
    return frames, normalize(frames, reference=frames[0], output_dir=out), out


def test_a_master_of_four_real_frames_keeps_its_stars_light(real_run, tmp_path):
    """The four 10 s frames of one night (stars of 1.3-1.6 px) stacked with auto (noise
    clipping at 4 frames), without rejection and with NSG's percentile clipping; each star's
    flux in a master over its flux in the master without rejection, by sep's apertures (5 px,
    annulus 8-12 px) at the stars sep finds on it: noise clipping keeps the light of every
    star within 4 % and of most within 1 %, where percentile clipping takes 6-10 % (median)."""
    _, _, out = real_run
    frames = sorted(out.glob("00[0-3]_*_nsg.fits"))
    assert len(frames) == 4
    masters = {}
    for method in ("none", "auto", "percentile"):
        stack(
            frames,
            tmp_path / f"{method}.fits",
            rejection=method,
            backend="numpy",
            maps="none",
            csv_path=tmp_path / "s.csv",
        )
        masters[method] = read_planes(tmp_path / f"{method}.fits")
    x, y = extractor_stars(masters["none"], edge=30)
    for c in range(3):
        plain, error = _aperture_flux(masters["none"][c], x, y, 5.0, 8.0, 12.0)
        measurable = plain > 30 * error
        assert measurable.sum() >= 7
        kept = _aperture_flux(masters["auto"][c], x, y, 5.0, 8.0, 12.0)[0][measurable] / plain[measurable]
        assert abs(np.median(kept) - 1) < 0.005 and np.percentile(kept, 10) > 0.985 and kept.min() > 0.95, (c, kept)
        clipped = _aperture_flux(masters["percentile"][c], x, y, 5.0, 8.0, 12.0)[0][measurable] / plain[measurable]
        assert np.median(clipped) < 0.96, (c, clipped)


def test_all_frames_normalize(real_run):
    frames, run, _ = real_run
    assert run.ok, [f.error for f in run.failed]
    assert len(run.frames) == len(frames)


def test_twenty_second_frames_are_about_twice_as_bright_in_green(real_run):
    """The 20 s frames' green transmission against the 10 s reference: 2.06-2.08 by sep
    (``tests/independent.py``); red and blue, which another Seestar's sensor renders otherwise,
    are checked against sep below."""
    _, run, _ = real_run
    long = [f for f in run.frames if "20.0s" in f.path]
    assert len(long) == 2
    for f in long:
        assert 1.95 < f.transmission[1] < 2.2, f.transmission


def test_frames_in_doubt_do_not_set_the_rejection_bar(real_run):
    """The 20 s frames (another camera: red and blue 35-55 % above green per unit exposure,
    channels that disagree) would set NSG's best transmission per unit exposure 1.3 times the
    10 s frames', and NSG's 0.75 would reject every 10 s target; the bar is the best frame
    whose mean transmission is not in doubt."""
    _, run, _ = real_run
    short = [f for f in run.frames if "10.0s" in f.path and f.status == "ok"]
    long = [f for f in run.frames if "20.0s" in f.path]
    assert len(short) == 3 and all("disagree" in (f.transmission_doubt or "") for f in long)
    assert not any(f.transmission_doubt for f in short)
    assert all(f.relative_transmission > 1.2 for f in long), [f.relative_transmission for f in long]
    assert [f.rejected for f in short] == [None] * 3
    assert all(0.9 < f.relative_transmission < 1.1 for f in short), [f.relative_transmission for f in short]


def _background_rms(image, reference, covered, block=32):
    diff = np.where(covered, image - reference, np.nan)
    h, w = diff.shape
    b = diff[: h // block * block, : w // block * block].reshape(h // block, block, w // block, block)
    b = b.transpose(0, 2, 1, 3).reshape(h // block, w // block, -1)
    full = np.mean(np.isfinite(b), axis=-1) > 0.9
    medians = np.nanmedian(b[full], axis=-1)
    return float(np.sqrt(np.mean((medians - np.median(medians)) ** 2)))


def test_background_matches_better_than_global_scale_and_offset(real_run):
    frames, run, _ = real_run
    reference = read_frame(frames[0]).data
    for result in run.frames[1:]:
        target = read_frame(result.path).data
        with fits.open(result.output) as hdul:
            ours = np.asarray(hdul[0].data, np.float32)
        covered = np.all(target != 0, axis=0) & np.all(reference != 0, axis=0)
        for c in range(3):
            m = result.scale[c]
            offset = np.median(reference[c][covered]) - m * np.median(target[c][covered])
            global_fit = m * target[c] + offset
            assert _background_rms(ours[c], reference[c], covered) < _background_rms(global_fit, reference[c], covered)


# -- detection against a standard extractor -----------------------------------------------------
@pytest.mark.parametrize(
    ("directory", "name"),
    [
        (NGC7023, NGC7023_REFERENCE),
        (NGC7023, "004_Light_NGC_7023_20.0s_IRCUT_20250630-023420.fits.gz"),
        (STARGATE, STARGATE_REFERENCE),
    ],
    ids=["ngc7023", "ngc7023-sky-clipped-at-zero", "stargate"],
)
def test_reference_detection_finds_the_extractors_stars_and_no_hot_pixel(directory, name):
    """Our reference catalogue holds at least 85 % of the stars sep finds at 5 sigma (less
    single hot pixels; NGC 7023's stars of 1.6 px included, which an undersampled star centred
    on a pixel makes look like one), and none of ours is a single hot pixel. NGC 7023's 20 s
    frames have a dim sky clipped at zero in 4 % of each channel's pixels (12 % of the
    intensity's), scattered everywhere: taken for no data, they left 1 of sep's 93 stars."""
    if not directory.is_dir():
        pytest.skip(f"real frames not present at {directory}")
    from nsg_gpu.params import Parameters
    from nsg_gpu.reference import prepare_reference
    from nsg_gpu.stars import detection_image

    path = directory / name
    x, y = extractor_stars(read_planes(path))
    reference = prepare_reference(read_frame(path), Parameters())
    ours = reference.stars
    distance = np.hypot(x[:, None] - ours.x[None], y[:, None] - ours.y[None]).min(axis=1)
    assert np.mean(distance < 1.5) >= 0.85, (int(np.sum(distance < 1.5)), x.size)
    image = np.asarray(detection_image(reference.frame.data))
    xi, yi = np.rint(ours.x).astype(int), np.rint(ours.y).astype(int)
    sky = np.median(image[image > 0])
    neighbours = np.maximum.reduce([image[yi + dy, xi + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    sky_noise = 1.4826 * np.median(np.abs(image[image > 0] - sky))
    bright = image[yi, xi] - sky > 10 * sky_noise
    assert np.all(neighbours[bright] - sky > 0.1 * (image[yi, xi][bright] - sky))


@needs_stargate
@pytest.mark.parametrize("name", [f"sg_{k:04d}.fits.gz" for k in range(1, 11)])
def test_every_stargate_frame_finds_the_stars_not_its_hot_pixels(name):
    """The StarGate frames are raw (uncalibrated) 30 s frames, registered to sg_0005: every
    other frame was resampled, some also rotated (their hot pixels come out at different
    sub-pixel phases across the frame), and the registration spread their hundred or so hot
    pixels into blobs of two to four pixels, brighter than most of the 15 stars. On sg_0001,
    sg_0006, sg_0007 and sg_0008 those blobs were most of the catalogue (93-157 detections of
    which 3-7 were stars, FWHM read 1.60-1.95 px against 3.0), and `--reference auto`, which
    took one of them, had 7 or 8 of the 9 targets refused as unregistered. Now each frame's
    ten brightest detections are stars that sep finds on sg_0005, and the catalogue holds at
    least 85 % of those."""
    x, y = extractor_stars(read_planes(STARGATE / STARGATE_REFERENCE))
    from nsg_gpu.stars import detect_stars

    ours = detect_stars(read_frame(STARGATE / name).data)
    near = np.hypot(ours.x[:, None] - x[None], ours.y[:, None] - y[None]).min(axis=1) < 2
    assert np.all(near[:10]), (name, np.round(ours.x[:10]), np.round(ours.y[:10]))
    found = np.hypot(x[:, None] - ours.x[None], y[:, None] - ours.y[None]).min(axis=1) < 2
    assert found.mean() >= 0.85, (name, int(found.sum()), x.size)


@needs_stargate
def test_no_stargate_catalogue_holds_faint_hot_pixels_that_the_registration_spread():
    """The StarGate sensor's fainter hot pixels (9-28 pixel sigmas), spread by the Lanczos-3
    registration over two to four pixels, fit a star of 0.8 px about as well as a single pixel
    seen through the interpolation: 12 of sg_0001's 39 detections (the frame `--reference auto`
    picks) were such pixels, and 3, 1, 1, 3 and 1 of sg_0002's, sg_0003's, sg_0004's, sg_0008's
    and sg_0010's. As the registration moved them only by a sub-pixel amount, they stood
    in sg_0002 (hardly resampled, single pixels there) where the reference had them, read
    its stars' FWHM as 2.09 px where they have 3.6, and left it to the plain aperture.
    Judged against stars of at least half each frame's FWHM, every frame's catalogue holds at
    most one detection that sep does not find on the median of the ten frames (3 sigma), which
    keeps the stars and loses the hot pixels."""
    paths = sorted(STARGATE.glob("*.fits.gz"))
    x, y = stacked_stars([read_planes(p) for p in paths])
    from nsg_gpu.stars import detect_stars

    for path in paths:
        ours = detect_stars(read_frame(path).data)
        apart = np.hypot(ours.x[:, None] - x[None], ours.y[:, None] - y[None]).min(axis=1) > 2
        assert apart.sum() <= 1, (path.name, len(ours), np.round(ours.x[apart]), np.round(ours.y[apart]))


@needs_stargate
def test_stargate_with_an_automatic_reference(tmp_path):
    """``--reference auto`` on the ten StarGate frames: every frame normalized (7 or 8 of the 9
    targets were refused while the hot pixels set the chosen reference's catalogue), and each
    frame's transmission relative to sg_0005's within 3 combined standard errors of sep's."""
    frames = sorted(STARGATE.glob("*.fits.gz"))
    run = normalize(frames, reference="auto", output_dir=tmp_path)
    assert run.ok, [f.error for f in run.failed]
    base = _ours(run, STARGATE_REFERENCE)
    for path in frames:
        if path.name == STARGATE_REFERENCE:
            continue
        ours = _ours(run, path.name)
        ratio = ours.transmission[0] / base.transmission[0]
        relative = [f.transmission_error[0] / f.transmission[0] for f in (ours, base) if f.transmission_error]
        error = ratio * float(np.sqrt(np.sum(np.square(relative))))
        sep = independent_transmission(read_planes(STARGATE / STARGATE_REFERENCE), read_planes(path))[0]
        assert abs(ratio - sep.transmission) < 3 * np.hypot(error, sep.bootstrap_error()), (
            path.name,
            ratio,
            sep.transmission,
        )


@needs_stargate
def test_drawn_out_stars_are_measured_and_corrected():
    """sg_0009's stars are drawn out (sep: ``1 - b/a`` about 0.24 at 54 degrees; the other
    frames' 0.05-0.12). Against sg_0001 (what ``--reference auto`` chooses) its fit reads the
    elongation sep reads, within 0.06 and 10 degrees, and its transmission is within 2 % and 3
    combined standard errors of sep's: a round Moffat's correction read it 7.0 % low (-2.8
    sigma)."""
    reference_path, path = STARGATE / "sg_0001.fits.gz", STARGATE / "sg_0009.fits.gz"
    measured = measure_scale(prepare_reference(read_frame(reference_path), Parameters()), read_frame(path))
    ellipticity, angle = extractor_shape(read_planes(path))
    shape = measured.target_psf
    assert shape is not None and shape.ellipticity == pytest.approx(ellipticity, abs=0.06), (shape, ellipticity)
    turn = (shape.elongation_angle - angle) % 180
    assert min(turn, 180 - turn) < 10, (shape.elongation_angle, angle)
    ours = 1 / measured.scale[0]
    stated = measured.fits[0].scale_error / measured.scale[0] ** 2
    sep = independent_transmission(read_planes(reference_path), read_planes(path))[0]
    assert abs(ours / sep.transmission - 1) < 0.02, (ours, sep.transmission)
    assert abs(ours - sep.transmission) < 3 * np.hypot(stated, sep.bootstrap_error())


def _within_sep_on_stargate(result, independent_photometry) -> None:
    """``result``'s transmission within 3 combined standard errors of sep's on the StarGate
    frame of the same name as it was (not cut, dimmed or clipped)."""
    _within_sep(result, independent_photometry("stargate", result.path.rsplit("/", 1)[-1] + ".gz")[0])


def _within_sep(result, theirs) -> None:
    """``result``'s transmission within 3 combined standard errors of sep's ``theirs``."""
    combined = float(np.hypot(result.transmission_error[0], theirs.bootstrap_error()))
    assert abs(result.transmission[0] - theirs.transmission) <= 3 * combined, (
        result.path,
        result.transmission[0],
        result.transmission_error[0],
        theirs.transmission,
        theirs.bootstrap_error(),
    )


@needs_stargate
def test_a_sparse_corner_of_stargate_normalizes_every_frame(tmp_path, independent_photometry):
    """The StarGate frames cut to the quarter of their last rows and columns (376 x 290 px;
    the upper right as displayed), where sep finds
    two or three stars: every frame normalized (7 of the 9 targets failed with 2 usable star
    pairs while 3 were required), those scaled from fewer than 3 pairs flagged, and each
    transmission within 3 combined standard errors of sep's on the whole frames, which the
    quarter's transmission is too."""
    paths = []
    for path in sorted(STARGATE.glob("*.fits.gz")):
        with fits.open(path) as hdul:
            data, header = hdul[0].data, hdul[0].header.copy()
        height, width = data.shape[-2:]
        paths.append(tmp_path / path.name.replace(".gz", ""))
        fits.writeto(paths[-1], np.ascontiguousarray(data[..., height // 2 :, width // 2 :]), header)
    run = normalize(paths, reference=tmp_path / STARGATE_REFERENCE.replace(".gz", ""), output_dir=tmp_path / "out")
    assert run.ok, [f.error for f in run.failed]
    targets = [f for f in run.frames if f.status != "reference"]
    assert len(targets) == len(paths) - 1 and any(f.star_pairs < 3 for f in targets)
    for f in targets:
        assert (f.star_pairs < 3) <= ("star pairs" in (f.scale_flag or "")), (f.path, f.star_pairs, f.scale_flag)
        _within_sep_on_stargate(f, independent_photometry)


@needs_stargate
@pytest.mark.parametrize("binning", [5, 6])
def test_stargate_binned_to_stars_under_a_pixel_reads_their_width(tmp_path, binning):
    """The StarGate frames averaged over 5 x 5 and 6 x 6 pixels (150 x 115 and 125 x 96 px):
    stars of 0.8 and 0.7 px, the four brightest saturated, two or three unsaturated ones and
    the raw frames' hot pixels. The frame's FWHM is read from those few stars, and every frame
    is normalized, each transmission within 3 combined standard errors of sep's on the same
    binned frames. With the FWHM read from five stars at least, the 3 px guess stayed: binned
    5 x 5 every target came out 1.7-5.4 times sep's (apertures of 10 px held more of the hot
    pixels' light than of the stars'), and binned 6 x 6 every target failed for want of pairs."""
    paths = []
    for path in sorted(STARGATE.glob("*.fits.gz")):
        with fits.open(path) as hdul:
            data, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
        height, width = (s // binning * binning for s in data.shape)
        binned = data[:height, :width].reshape(height // binning, binning, width // binning, binning).mean(axis=(1, 3))
        paths.append(tmp_path / path.name.removesuffix(".gz"))
        fits.writeto(paths[-1], binned.astype(np.float32), header)
    reference = tmp_path / STARGATE_REFERENCE.removesuffix(".gz")
    run = normalize(paths, reference=reference, output_dir=tmp_path / "out")
    assert run.ok, [f.error for f in run.failed]
    targets = [f for f in run.frames if f.status != "reference"]
    assert len(targets) == len(paths) - 1
    planes = read_planes(reference)
    for f in targets:
        _within_sep(f, independent_transmission(planes, read_planes(Path(f.path)))[0])


@needs_stargate
def test_stargate_with_its_sky_clipped_at_zero_or_below_it_normalizes_every_frame(tmp_path, independent_photometry):
    """StarGate's frames less their sky plus one sky noise: the reference (sg_0005, the frame
    the others were registered to) clipped at 0 as a calibration without a pedestal leaves a
    dim sky (a sixth of its sky at 0, scattered), the registered targets holding the same
    share of negative sky. Every frame is normalized, each within 3 combined standard errors of
    sep's on the frames as they were. Pixels at or below 0 were read as no data: every target
    failed with no usable star pair (the reference's scattered zeros in every aperture)."""
    paths = []
    for path in sorted(STARGATE.glob("*.fits.gz")):
        with fits.open(path) as hdul:
            data, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
        held = data != 0
        sky = np.median(data[held])
        sigma = 1.4826 * np.median(np.abs(data[held] - sky))
        dim = data - sky + sigma
        if path.name == STARGATE_REFERENCE:
            dim = np.clip(dim, 0, None)
            assert 0.1 < np.mean(dim[held] == 0) < 0.25
        paths.append(tmp_path / path.name.removesuffix(".gz"))
        fits.writeto(paths[-1], np.where(held, dim, 0).astype(np.float32), header)
    run = normalize(paths, reference=tmp_path / STARGATE_REFERENCE.removesuffix(".gz"), output_dir=tmp_path / "out")
    assert run.ok, [f.error for f in run.failed]
    for f in run.frames:
        if f.status == "reference":
            continue
        _within_sep_on_stargate(f, independent_photometry)


def test_ngc7023_tiles_where_the_extractor_finds_ten_stars_normalize_every_frame(tmp_path):
    """The NGC 7023 frames cut into a 3 x 3 grid of tiles (320 x 180 px): on every tile whose
    reference holds ten or more of sep's 5-sigma stars, every frame is normalized, and every
    channel where sep keeps three stars or more is within 3 combined standard errors of sep's
    transmission on the same tile (``bench/real_crops.py --grid 3``)."""
    paths = sorted(NGC7023.glob("*.fits.gz"))
    height, width = fits.getdata(paths[0]).shape[-2:]
    tiles = 0
    for i in range(3):
        for j in range(3):
            rows, cols = slice(height * i // 3, height * (i + 1) // 3), slice(width * j // 3, width * (j + 1) // 3)
            folder = tmp_path / f"tile{i}{j}"
            folder.mkdir()
            tile_paths = []
            for path in paths:
                with fits.open(path) as hdul:
                    data, header = hdul[0].data[..., rows, cols], hdul[0].header.copy()
                tile_paths.append(folder / path.name.removesuffix(".gz"))
                fits.writeto(tile_paths[-1], np.ascontiguousarray(data), header)
            reference = folder / NGC7023_REFERENCE.removesuffix(".gz")
            reference_planes = read_planes(reference)
            if len(extractor_stars(reference_planes)[0]) < 10:
                continue
            tiles += 1
            run = normalize(tile_paths, reference=reference, output_dir=folder / "out")
            assert run.ok, [f.error for f in run.failed]
            for f in run.frames:
                if f.status == "reference":
                    continue
                theirs = independent_transmission(reference_planes, read_planes(f.path))
                for c, s in enumerate(theirs):
                    if s.ratios.size < 3:
                        continue
                    combined = float(np.hypot(f.transmission_error[c], s.bootstrap_error()))
                    assert abs(f.transmission[c] - s.transmission) <= 3 * combined, (
                        f.path,
                        c,
                        f.transmission[c],
                        f.transmission_error[c],
                        s.transmission,
                    )
    assert tiles >= 2


def test_ngc7023_as_mono_frames_match_independent_photometry(tmp_path):
    """The NGC 7023 frames made mono (the channels' mean; stars read 1.3-1.7 px), where each
    target is measured with PSF weights and with the plain aperture and keeps the one that
    states the smaller uncertainty: every frame normalized, each transmission within 3
    combined standard errors of sep's on the same mono frames, and the 10 s frames within one
    (0.14-0.31; they keep the aperture, which states 1.1-1.5 % where the weights state
    1.7-2.0 %; the weights alone would put them 0.96, 0.38 and 1.47 away)."""
    paths = []
    for path in sorted(NGC7023.glob("*.fits.gz")):
        with fits.open(path) as hdul:
            data, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
        mono = data.mean(axis=0)
        mono[(data == 0).any(axis=0)] = 0
        paths.append(tmp_path / path.name.replace(".gz", ""))
        fits.writeto(paths[-1], mono, header)
    run = normalize(paths, reference=paths[0], output_dir=tmp_path / "out")
    assert run.ok, [f.error for f in run.failed]
    reference = read_planes(paths[0])
    targets = [f for f in run.frames if f.status != "reference"]
    assert len(targets) == len(paths) - 1
    for f in targets:
        theirs = independent_transmission(reference, read_planes(f.path))[0]
        combined = float(np.hypot(f.transmission_error[0], theirs.bootstrap_error()))
        limit = 1 if "_10.0s_" in f.path else 3
        assert abs(f.transmission[0] - theirs.transmission) <= limit * combined, (
            f.path,
            f.transmission[0],
            f.transmission_error[0],
            theirs.transmission,
        )


def _under_cloud(planes: np.ndarray, transmission: float, rng) -> np.ndarray:
    """A frame under cloud: its stars and nebula dimmed to ``transmission`` about each
    channel's sky level (a sky lit by the town's light), the noise kept at the frame's own (the
    cloud takes light, not read noise), no-data pixels left at 0."""
    out = planes.copy()
    for c, plane in enumerate(planes):
        data = plane != 0
        sky = np.median(plane[data])
        sigma = 1.4826 * np.median(np.abs(plane[data] - sky))
        dimmed = sky + transmission * (plane - sky) + rng.normal(0, sigma * np.sqrt(1 - transmission**2), plane.shape)
        out[c] = np.where(data, dimmed, 0)
    return out.astype(np.float32)


@pytest.mark.parametrize(
    ("directory", "reference_name", "frame"),
    [
        pytest.param(STARGATE, STARGATE_REFERENCE, "sg_0001.fits.gz", id="stargate-0001", marks=needs_stargate),
        pytest.param(STARGATE, STARGATE_REFERENCE, "sg_0008.fits.gz", id="stargate-0008", marks=needs_stargate),
        pytest.param(NGC7023, NGC7023_REFERENCE, "001", id="ngc7023-001"),
    ],
)
def test_frames_under_cloud_keep_their_scale_where_few_stars_show(directory, reference_name, frame):
    """Real targets dimmed to 0.3 and 0.1 of their light (noise as before): each is scaled, and
    each channel's transmission is within 3 of its stated errors of the dimming times the
    frame's own transmission, the errors under a quarter of it. sep keeps 3-8 stars per channel
    at signal-to-noise 10 at 0.3, and 0-1 at 0.1, where we use 5 pairs on StarGate (errors
    2.8-3.6 %) and 24 on NGC 7023 (7.6-19 %)."""
    reference = prepare_reference(read_frame(directory / reference_name), Parameters())
    path = next(p for p in sorted(directory.glob("*.fits.gz")) if p.name.startswith(frame))
    planes = read_planes(path)
    clear = measure_scale(reference, read_frame(path))
    rng = np.random.default_rng(7)
    for dimming in (0.3, 0.1):
        measured = measure_scale(reference, Frame.from_array(_under_cloud(planes, dimming, rng), name=path.name))
        transmission = 1 / measured.scale
        stated = np.array([fit.scale_error / fit.scale for fit in measured.fits]) * transmission
        truth = dimming / clear.scale
        assert np.all(stated < 0.25 * transmission), (dimming, transmission, stated)
        assert np.all(np.abs(transmission - truth) <= 3 * stated), (dimming, transmission, stated, truth)


# -- transmission against an independent photometry ---------------------------------------------


def _frames(directory, reference_name):
    return [p for p in sorted(directory.glob("*.fits.gz")) if p.name != reference_name] if directory.is_dir() else []


def _cases():
    cases = []
    for name, directory, reference, channels in (
        ("ngc7023", NGC7023, NGC7023_REFERENCE, 3),
        ("stargate", STARGATE, STARGATE_REFERENCE, 1),
    ):
        for path in _frames(directory, reference):
            for c in range(channels):
                key = path.name[:3] if name == "ngc7023" else path.name[3:7]
                cases.append(pytest.param(name, path.name, c, id=f"{name}-{key}-{'RGB'[c] if channels == 3 else 'L'}"))
    return cases


@pytest.fixture(scope="module")
def stargate_run(tmp_path_factory):
    """The ten StarGate frames normalized to sg_0005, the frame they were registered to."""
    frames = sorted(STARGATE.glob("*.fits.gz"))
    return normalize(frames, reference=STARGATE / STARGATE_REFERENCE, output_dir=tmp_path_factory.mktemp("stargate"))


@pytest.fixture(scope="module")
def independent_photometry():
    """sep's transmissions per (set, frame file), computed once each."""
    cache = {}

    def get(name: str, frame: str):
        if (name, frame) not in cache:
            directory = NGC7023 if name == "ngc7023" else STARGATE
            reference = sorted(NGC7023.glob("*.fits.gz"))[0] if name == "ngc7023" else STARGATE / STARGATE_REFERENCE
            cache[name, frame] = independent_transmission(read_planes(reference), read_planes(directory / frame))
        return cache[name, frame]

    return get


def _ours(run, frame: str):
    return next(f for f in run.frames if f.path.endswith(frame))


@pytest.mark.parametrize(("name", "frame", "channel"), _cases())
def test_transmission_matches_independent_photometry(name, frame, channel, request, independent_photometry):
    """Our transmission within 3 combined standard errors (our NSGSERR, sep's bootstrap error)
    of sep's median flux ratio."""
    if name == "stargate" and not STARGATE.is_dir():
        pytest.skip(f"real frames not present at {STARGATE}")
    run = request.getfixturevalue("real_run")[1] if name == "ngc7023" else request.getfixturevalue("stargate_run")
    result = _ours(run, frame)
    ours, error = result.transmission[channel], result.transmission_error[channel]
    theirs = independent_photometry(name, frame)[channel]
    assert 0 < error < 0.1 * ours
    combined = float(np.hypot(error, theirs.bootstrap_error()))
    assert abs(ours - theirs.transmission) <= 3 * combined, (
        f"ours {ours:.4f} +- {error:.4f}, sep {theirs.transmission:.4f} +- {theirs.bootstrap_error():.4f} "
        f"from {theirs.ratios.size} stars"
    )


@pytest.mark.parametrize("prefix", ["001", "002", "003", "004", "005"])
def test_scale_uses_the_stars_an_independent_photometry_can_use(real_run, independent_photometry, prefix):
    """At least half as many pairs as sep measures with signal-to-noise >= 10 in the green channel."""
    frames, run, _ = real_run
    frame = next(p.name for p in frames if p.name.startswith(prefix))
    usable = independent_photometry("ngc7023", frame)[1].ratios.size
    assert _ours(run, frame).star_pairs >= usable / 2, (_ours(run, frame).star_pairs, usable)


def _disagree(values, errors) -> bool:
    """The channels' chi-square about their weighted mean beyond p = 0.001."""
    from scipy import stats

    values, weights = np.asarray(values), 1 / np.asarray(errors) ** 2
    mean = np.sum(weights * values) / np.sum(weights)
    return stats.chi2.sf(np.sum(weights * (values - mean) ** 2), values.size - 1) < 1e-3


@pytest.mark.parametrize("prefix", ["001", "002", "003", "004", "005"])
def test_channels_disagree_only_where_the_independent_photometry_says_so(real_run, independent_photometry, prefix):
    """A frame's channels are flagged as disagreeing exactly where sep's transmissions
    disagree beyond their bootstrap errors (the 20 s frames of 2025, from another Seestar at
    another site: red and blue 2.7-3.2, green 2.06, by sep and by us alike)."""
    frames, run, _ = real_run
    frame = next(p.name for p in frames if p.name.startswith(prefix))
    ours = _ours(run, frame)
    theirs = independent_photometry("ngc7023", frame)
    sep_disagree = _disagree([t.transmission for t in theirs], [t.bootstrap_error() for t in theirs])
    assert _disagree(ours.transmission, ours.transmission_error) == sep_disagree
    assert ("disagree" in (ours.scale_flag or "")) == sep_disagree, ours.scale_flag


@pytest.fixture(scope="module")
def frame_colours():
    """sep's star colours of each NGC 7023 frame, measured in that frame alone."""
    return {p.name: star_colours(read_planes(p)) for p in sorted(SHARED_DATA.glob("*.fits.gz"))}


@pytest.mark.parametrize("prefix", ["001", "002", "003", "004", "005"])
def test_channel_ratios_follow_the_star_colours_each_frame_shows(real_run, frame_colours, prefix):
    """Our red-to-green and blue-to-green transmission ratios equal the change of the stars'
    median colours from the reference to the frame, each frame's colours measured by sep in
    that frame alone (no star matched, no scale), within 3 combined errors; and the colours
    change beyond 3 errors exactly where the frame is flagged for disagreeing channels (the
    20 s frames: their camera sees the stars' B/G as 0.89-0.94 where the reference's sees
    0.61), so no photometric scale can make those channels agree."""
    frames, run, _ = real_run
    frame = next(p.name for p in frames if p.name.startswith(prefix))
    reference, target = frame_colours[frames[0].name], frame_colours[frame]
    change = np.log(target.median() / reference.median())
    change_error = np.hypot(target.log_error(), reference.log_error())
    ours = _ours(run, frame)
    t, e = np.asarray(ours.transmission), np.asarray(ours.transmission_error)
    ratios = np.log(t[[0, 2]] / t[1])
    ratio_errors = np.hypot(e[[0, 2]] / t[[0, 2]], e[1] / t[1])
    z = (ratios - change) / np.hypot(ratio_errors, change_error)
    assert np.all(np.abs(z) < 3), (ratios, change, z)
    colours_changed = bool(np.any(np.abs(change / change_error) > 3))
    assert colours_changed == ("disagree" in (ours.scale_flag or "")), (change / change_error, ours.scale_flag)


# -- weights of frames registered at sub-pixel shifts --------------------------------------------
@pytest.fixture(scope="module")
def stargate_noise(stargate_run):
    """Per target: the registration's smoothing of the pixel noise (from the noise's own pixel
    differences), the target's noise before scaling by our estimate and by the per-pixel one,
    relative to the reference's, and the two weights."""
    reference = read_planes(STARGATE / STARGATE_REFERENCE)[0].astype(np.float32)
    per_pixel_reference = ksigma_noise(reference)
    ours_reference = next(f for f in stargate_run.frames if f.status == "reference").noise[0]
    rows = []
    for f in stargate_run.frames:
        if f.status == "reference":
            continue
        smoothing, _ = spline_smoothing(read_planes(f.path)[0])
        with fits.open(f.output) as hdul:
            per_pixel = ksigma_noise(np.asarray(hdul[0].data, np.float32))
        t = f.transmission[0]
        rows.append(
            dict(
                smoothing=smoothing,
                noise=f.noise[0] * t / ours_reference,
                per_pixel_noise=per_pixel * t / per_pixel_reference,
                weight=f.weight,
                per_pixel_weight=(per_pixel_reference / per_pixel) ** 2,
            )
        )
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


@needs_stargate
def test_stargate_targets_were_smoothed_by_registration(stargate_noise):
    """The premise: the targets' registration smoothed their pixel noise by 0.80-0.98."""
    s = stargate_noise["smoothing"]
    assert s.min() < 0.85 and np.ptp(s) > 0.1
    # The per-pixel noise follows it (log-log slope near 1): what fooled the old weight.
    slope = np.polyfit(np.log(s), np.log(stargate_noise["per_pixel_noise"]), 1)[0]
    assert 0.7 < slope < 1.5 and np.corrcoef(s, stargate_noise["per_pixel_noise"])[0, 1] > 0.9


@needs_stargate
def test_stargate_noise_does_not_follow_the_smoothing(stargate_noise):
    """Our noise of every target within 3 % of the reference's (one sky, one exposure), with a
    log-log slope against the smoothing under 0.2 where the per-pixel noise's is about 1.3."""
    s, noise = stargate_noise["smoothing"], stargate_noise["noise"]
    assert np.all(np.abs(noise - 1) < 0.03), noise
    assert abs(np.polyfit(np.log(s), np.log(noise), 1)[0]) < 0.2


@needs_stargate
def test_stargate_weights_of_equal_exposures_agree(stargate_noise, independent_photometry):
    """NWEIGHT of these 30 s frames is what their transmission makes it: within 10 % of the
    square of sep's transmission (one sky, one exposure, so only the transmission moves it;
    sg_0004 is 9 % dimmer by sep and by us), and the rest does not follow the smoothing
    (log-log slope under 0.3 in size); the per-pixel weight spreads by 1.8x and goes as the smoothing
    to the power -2.9."""
    s, weight, old = stargate_noise["smoothing"], stargate_noise["weight"], stargate_noise["per_pixel_weight"]
    frames = [p.name for p in sorted(STARGATE.glob("*.fits.gz")) if p.name != STARGATE_REFERENCE]
    expected = np.array([independent_photometry("stargate", f)[0].transmission ** 2 for f in frames])
    assert np.all(np.abs(weight / expected - 1) < 0.1), weight / expected
    # What is left of the weight once the transmission is divided out does not follow the
    # smoothing. (The weight itself does, with a slope of -0.76: sg_0004, the dimmest frame by
    # sep too, happens to be among the most smoothed.)
    slope = np.polyfit(np.log(s), np.log(weight / expected), 1)[0]
    assert abs(slope) < 0.3, slope
    assert old.max() / old.min() > 1.5 and np.polyfit(np.log(s), np.log(old), 1)[0] < -2


def _upscaled_copies(paths, directory: Path, factor: int, order: int = 3) -> list[Path]:
    """The frames at ``paths`` as a registration that upscales by ``factor`` writes them (Siril's
    x2, a drizzle's grid): every plane zoomed by a spline of ``order`` (SciPy, on the pixels'
    areas), its negative lobes clamped at 0, the pixels without data in every channel kept so;
    float32 FITS in ``directory``, each named as its frame without ``.gz``."""
    import scipy.ndimage

    written = []
    for path in paths:
        with fits.open(path) as hdul:
            data, header = np.asarray(hdul[0].data, np.float64), hdul[0].header.copy()
        planes = data if data.ndim == 3 else data[None]
        held = np.repeat(np.repeat(np.any(planes > 0, axis=0), factor, axis=0), factor, axis=1)
        zoomed = [scipy.ndimage.zoom(p, factor, order=order, grid_mode=True, mode="nearest") for p in planes]
        out = np.where(held, np.clip(np.stack(zoomed), 0, None), 0).astype(np.float32)
        for key in ("BZERO", "BSCALE"):
            header.remove(key, ignore_missing=True)
        written.append(directory / path.name.removesuffix(".gz"))
        fits.PrimaryHDU(out if data.ndim == 3 else out[0], header=header).writeto(written[-1])
    return written


@needs_stargate
def test_stargate_upscaled_by_its_registration_keeps_its_noise_ratios(stargate_run, stargate_noise, tmp_path):
    """The StarGate frames upscaled by 2 with a cubic spline (Siril's x2 registration, a
    drizzle's grid), the reference too: the registration's kernel is then stretched over 2 px,
    where the weight's noise reads; read at the step (every 2nd pixel), every target's noise
    before scaling, relative to the reference's, is within 1.5 % of the frames' as they are;
    read at every pixel it follows each frame's sub-pixel shift again (up to 10 % low)."""
    from nsg_gpu.noise import multiscale_noise

    paths = _upscaled_copies(sorted(STARGATE.glob("*.fits.gz")), tmp_path, 2)
    run = normalize(paths, reference=tmp_path / STARGATE_REFERENCE[:-3], output_dir=tmp_path / "out")
    reference = next(f for f in run.frames if f.status == "reference")
    reference_pixels = multiscale_noise(read_planes(tmp_path / STARGATE_REFERENCE[:-3])[0].astype(np.float32))
    ours, every_pixel = [], []
    for f in run.frames:
        if f.status == "reference":
            continue
        assert f.status == "ok", (f.path, f.error)
        t = f.transmission[0]
        ours.append(f.noise[0] * t / reference.noise[0])
        with fits.open(f.output) as hdul:
            every_pixel.append(multiscale_noise(np.asarray(hdul[0].data, np.float32)) * t / reference_pixels)
    as_they_are = stargate_noise["noise"]
    assert np.all(np.abs(np.array(ours) / as_they_are - 1) < 0.015), np.array(ours) / as_they_are
    assert np.min(np.array(every_pixel) / as_they_are) < 0.95, np.array(every_pixel) / as_they_are


@needs_stargate
def test_stargate_upscaled_by_three_finds_its_stars_not_its_hot_pixels(stargate_run, tmp_path):
    """The StarGate frames (uncalibrated: hot pixels) upscaled linearly by 3, the reference too:
    each hot pixel became a blob of the zoom's kernel, and among the reference's 256
    detections they read the FWHM (2.5 px for stars of 12); all 9 targets were refused as
    unregistered (with a cubic spline 3.4 px and 8 of 9; docs/scale-accuracy.md). The
    correlations now read the step (3) where the rows between captured ones had blinded them,
    and the point tests take every 3rd pixel: on the reference and five targets, every frame
    normalized, the reference's FWHM 3 times the frames' as they are, each transmission within
    2 stated errors of theirs and each NWEIGHT over the squared transmission within 2 % of
    theirs."""
    # The reference and five targets: sg_0006 (on the plain aperture) and sg_0004 (the
    # dimmest) among them.
    kept = ("sg_0001", "sg_0004", "sg_0005", "sg_0006", "sg_0008", "sg_0010")
    frames = [p for p in sorted(STARGATE.glob("*.fits.gz")) if p.name.startswith(kept)]
    paths = _upscaled_copies(frames, tmp_path, 3, order=1)
    run = normalize(paths, reference=tmp_path / STARGATE_REFERENCE[:-3], output_dir=tmp_path / "o")
    assert len(run.frames) == len(kept)
    for x3 in run.frames:
        as_read = _ours(stargate_run, Path(x3.path).name + ".gz")
        if as_read.status == "reference":
            assert x3.fwhm == pytest.approx(3 * as_read.fwhm, rel=0.1)
            continue
        assert x3.status == "ok", (x3.path, x3.error)
        stated = x3.transmission_error[0] / x3.transmission[0]
        assert abs(x3.transmission[0] / as_read.transmission[0] - 1) < 2 * stated, x3.path
        light = (x3.transmission[0] / as_read.transmission[0]) ** 2
        assert x3.weight / as_read.weight / light == pytest.approx(1, abs=0.02), x3.path


def test_ngc7023_upscaled_by_its_registration_keeps_its_weights(real_run, tmp_path):
    """NGC 7023's colour frames (a photosite per pixel) upscaled by 2 with a cubic spline, the
    reference too: their neighbours correlate by only 0.72 (a full-resolution debayer reads up
    to 0.70 registered), but the stretched kernel's negative lobe shows at lag 3, so the weight's
    noise is read at every 2nd pixel. Every target's NWEIGHT over its mean squared transmission
    is within 2 % of the frames' as they are (read at every pixel: 19-31 % high over the five
    targets; here 001 and 004)."""
    frames, run, _ = real_run
    # The reference, a 10 s target and a 20 s one (another night, turned by 121 degrees).
    paths = _upscaled_copies((frames[0], frames[1], frames[4]), tmp_path, 2)
    upscaled = normalize(paths, reference=paths[0], output_dir=tmp_path / "o")

    def weight_over_light(result):
        return result.weight / float(np.mean(np.square(result.transmission)))

    assert len(upscaled.frames) == 3
    for x2 in upscaled.frames:
        as_read = _ours(run, Path(x2.path).name + ".gz")
        if as_read.status == "reference":
            continue
        assert x2.status == "ok", (x2.path, x2.error)
        assert weight_over_light(x2) / weight_over_light(as_read) == pytest.approx(1, abs=0.02), x2.path
