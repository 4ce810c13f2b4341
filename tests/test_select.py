"""Choosing the reference (``--reference auto``, ``nsg inspect``) on synthetic frames whose
seeing, transparency, sky, coverage and gradient are set one at a time."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from nsg_gpu.cli import app
from nsg_gpu.select import (
    MIN_SHARED_FRACTION,
    ReferenceScore,
    choose_reference,
    common_stars,
    inspect_frames,
    rank_frames,
    score_frame,
)
from nsg_gpu.synthetic import SyntheticField, SyntheticSpec, write_synthetic_set

runner = CliRunner()
#: A small, dense field: a few dozen saturated stars and plenty of bright linear ones.
FIELD = dict(width=640, height=480, n_stars=1400, seed=11, borders=False, trail_frame=None)
SKY = 0.06


def write_conditions(
    directory: Path, conditions: list[dict], *, white: float | None = None, n_stars: int = FIELD["n_stars"]
) -> list[Path]:
    """Frames of one field (of ``n_stars``) under ``conditions`` (FrameTruth fields per frame,
    by default transmission 0.9, FWHM 3, Moffat index 3, the same sky level and gradient as
    frame 0, full coverage), written as float FITS, or as 16-bit integers in units where 1.0
    is ``white``."""
    field = SyntheticField(n_frames=len(conditions), **{**FIELD, "n_stars": n_stars})
    base = field.frames[0]
    paths = []
    for k, changes in enumerate(conditions):
        plain = dict(
            transmission=[0.9],
            fwhm=3.0,
            beta=3.0,
            sky_level=[SKY],
            gradient_ptp_sigma=2.0,
            gradient_coefficients=base.gradient_coefficients,
        )
        changes = {**plain, **changes}
        if "transmission" in changes and np.isscalar(changes["transmission"]):
            changes["transmission"] = [changes["transmission"]]
        field.frames[k] = dataclasses.replace(field.frames[k], **changes)
        data = field.render(k)[0]
        if white is not None:
            data = np.where(data > 0, np.maximum(np.rint(data * white), 1), 0).astype(np.uint16)
        path = directory / f"{field.frames[k].name}.fits"
        fits.PrimaryHDU(data, header=field.header(k)).writeto(path)
        paths.append(path)
    return paths


def ranked_indices(ranked: list[ReferenceScore], paths: list[Path]) -> list[int]:
    return [paths.index(s.path) for s in ranked]


def test_sharper_frame_wins_at_equal_transparency_and_sky(tmp_path):
    """Seeing alone differs: the sharpest frame is chosen, and the score falls as 1/FWHM.

    The stars' flux does not depend on the seeing; a score from it alone (or from each frame's
    own brightest unsaturated stars, which are brighter where the seeing spreads them) ranks
    these frames the other way round."""
    fwhms = [3.8, 2.4, 3.0]
    paths = write_conditions(tmp_path, [{"fwhm": f} for f in fwhms])
    ranked = inspect_frames(paths)
    assert ranked_indices(ranked, paths) == [1, 2, 0]
    assert all(s.candidate for s in ranked)
    chosen, reason = choose_reference(paths)
    assert chosen == paths[1] and "star signal-to-noise" in reason
    # Equal transparency and noise: star_snr * FWHM is the same in every frame.
    product = np.array([s.star_snr * fwhms[paths.index(s.path)] for s in ranked])
    assert np.ptp(product) / product.mean() < 0.15, product


def test_a_frame_crossed_by_a_trail_is_no_candidate(tmp_path):
    """The sharpest frame of a field of 300 stars carries a satellite trail (13 sky noises):
    as the reference, the trail would lie in every target's photometry of the stars beside it
    and in the samples on it. It is no candidate, with a note that says so, and the next best
    is chosen; where every frame has one, the sharpest is chosen still."""
    fwhms = [3.8, 3.0, 3.4]
    conditions = [{"fwhm": f, "trail": k == 1} for k, f in enumerate(fwhms)]
    paths = write_conditions(tmp_path, conditions, n_stars=300)
    ranked = inspect_frames(paths)
    assert ranked_indices(ranked, paths) == [2, 0, 1]
    crossed = ranked[2]
    assert crossed.trails == 1 and not crossed.candidate
    assert crossed.note == "crossed by 1 satellite trail(s)"
    chosen, reason = choose_reference(paths)
    assert chosen == paths[2] and "1 for a satellite trail" in reason
    every = tmp_path / "every"
    every.mkdir()
    paths = write_conditions(every, [{"fwhm": f, "trail": True} for f in fwhms], n_stars=300)
    ranked = inspect_frames(paths)
    assert all(s.trails == 1 and s.candidate for s in ranked)
    assert ranked[0].path == paths[1] == choose_reference(paths)[0]


def test_clearer_frame_wins_at_equal_seeing_and_sky(tmp_path):
    """Transparency alone differs: the clearest frame is chosen, and the score follows it."""
    transmissions = [0.6, 0.95, 0.8]
    paths = write_conditions(tmp_path, [{"transmission": t} for t in transmissions])
    ranked = inspect_frames(paths)
    assert ranked_indices(ranked, paths) == [1, 2, 0]
    assert choose_reference(paths)[0] == paths[1]
    ratio = np.array([s.star_snr / transmissions[paths.index(s.path)] for s in ranked])
    assert np.ptp(ratio) / ratio.mean() < 0.1, ratio


def test_coverage_and_gradient_still_exclude_the_best_stars(tmp_path):
    """The clearest frame has a registration border and the next a strong gradient: neither is
    chosen, each says why, and the rest rank by transparency."""
    conditions = [
        {"transmission": 0.7},
        {"transmission": 1.0, "border": [70, 0, 0, 0]},  # about 11 % of the width without data
        {"transmission": 1.0, "gradient_ptp_sigma": 30.0},
        {"transmission": 0.85},
        {"transmission": 0.78},
    ]
    paths = write_conditions(tmp_path, conditions)
    ranked = inspect_frames(paths)
    by_index = {paths.index(s.path): s for s in ranked}
    assert ranked_indices(ranked, paths) == [3, 4, 0, 2, 1]
    assert [by_index[k].candidate for k in (3, 4, 0, 2, 1)] == [True, True, True, False, False]
    assert by_index[1].note.startswith("coverage") and by_index[2].note.startswith("gradient")
    # Both were measured; the one with the gradient would have won on its stars alone (the
    # bordered one, whose band holds more non-linear stars at transmission 1, scores within a
    # few per cent of the chosen frame: 0.99-1.05 of it as the FWHM reads its stars).
    assert by_index[1].star_snr > 0.9 * by_index[3].star_snr and by_index[2].star_snr > by_index[3].star_snr
    chosen, reason = choose_reference(paths)
    assert chosen == paths[3]
    assert "1 for their gradient" in reason and "1 for their coverage" in reason


def test_dithered_set_without_its_registration_reference(tmp_path):
    """Every frame has a registration border of its own (a dithered set registered to a frame
    that is not among them). The frame with the smallest border is the cloudiest; the clearest
    misses a strip of 70 px on the left that the others cover. Judged by coverage against the
    best frame, only the cloudy one was a candidate; judged by the area at least half of the
    frames cover, the frames whose borders lie outside it are candidates, the clearest of them
    is chosen, and the one with the wide strip is still left out, with the share it misses."""
    borders = [[2, 3, 1, 2], [16, 0, 0, 6], [0, 12, 8, 0], [15, 0, 14, 0], [70, 0, 0, 0]]
    transmissions = [0.55, 1.0, 0.8, 0.7, 1.0]
    paths = write_conditions(tmp_path, [{"transmission": t, "border": b} for t, b in zip(transmissions, borders)])
    ranked = inspect_frames(paths)
    by_index = {paths.index(s.path): s for s in ranked}
    coverage = np.array([by_index[k].coverage for k in range(5)])
    assert np.all(coverage[1:] < 0.98 * coverage[0])  # the old rule's only candidate: frame 0
    assert [by_index[k].candidate for k in range(5)] == [True, True, True, True, False]
    assert by_index[4].note.startswith("coverage") and by_index[4].star_snr > by_index[2].star_snr
    # At least half of the frames cover 15 <= x < 640 (frames 0, 2 and 3 on the left, 1, 3 and
    # 4 on the right): frame 4 misses 55 of those 625 columns.
    assert by_index[4].missing_area == pytest.approx(55 / 625, abs=0.01)
    assert by_index[1].missing_area < 0.03
    chosen, reason = choose_reference(paths)
    assert chosen == paths[1] and "1 for their coverage" in reason


def test_score_does_not_depend_on_the_data_units(tmp_path):
    """The same frames as floats in [0, 1] and as 16-bit ADU rank alike, with the same scores."""
    conditions = [{"fwhm": 3.4}, {"fwhm": 2.6, "transmission": 0.7}]
    floats = write_conditions(tmp_path, conditions)
    (tmp_path / "adu").mkdir()
    adu = write_conditions(tmp_path / "adu", conditions, white=65535.0)
    a, b = inspect_frames(floats), inspect_frames(adu)
    assert [s.path.name for s in a] == [s.path.name for s in b]
    for x, y in zip(a, b):
        assert y.star_snr == pytest.approx(x.star_snr, rel=1e-3)
        assert y.gradient == pytest.approx(x.gradient, rel=1e-3)
        assert y.noise == pytest.approx(65535.0 * x.noise, rel=1e-3)


def test_common_stars_are_those_most_other_frames_show():
    """Ten stars in four registered frames (each seen within 1 px, one missing from frame 3),
    and junk of each frame's own (hot pixels, a trail's pieces) at places no other frame has.
    A star is common where at least half of the other frames show it; junk never is; a lone
    frame keeps everything; the order of the frames does not matter."""
    rng = np.random.default_rng(2)
    sx, sy = rng.uniform(20, 980, 10), rng.uniform(20, 780, 10)
    frames = []
    for k in range(4):
        jx, jy = rng.uniform(20, 980, 30), rng.uniform(20, 780, 30)
        keep = np.arange(10) if k != 3 else np.arange(9)
        x = np.concatenate([sx[keep] + rng.uniform(-0.7, 0.7, keep.size), jx])
        y = np.concatenate([sy[keep] + rng.uniform(-0.7, 0.7, keep.size), jy])
        frames.append((x, y, keep.size))
    masks = common_stars([(x, y) for x, y, _ in frames])
    for (_, _, n), mask in zip(frames, masks):
        assert mask[:n].all() and not mask[n:].any()
    # The 10th star is in frames 0-2 only: for each of them, 2 of the 3 others show it.
    assert masks[0][9]
    reordered = common_stars([(x, y) for x, y, _ in frames[::-1]])[::-1]
    for a, b in zip(masks, reordered):
        np.testing.assert_array_equal(a, b)
    alone = common_stars([frames[0][:2]])
    assert alone[0].all()


@pytest.mark.parametrize(
    ("scenario", "seed"), [("field-dependent-psf", 6), ("field-dependent-psf", 8), ("default", 10)]
)
def test_a_sparse_fields_reference_is_chosen_by_its_stars(tmp_path, scenario, seed):
    """40 stars: the registered targets carry their hot pixels spread by the registration (a
    frame near half a pixel's shift kept about 250 of them), frame 2 a satellite trail (150
    pieces), and the reference's band of 50 stars was mostly those: the field-dependent
    scenario's seed 6 chose frame 4 (0.65 of frame 0's true star signal-to-noise), seed 8 the
    trail frame (0.73), which then failed every target's registration check; the default
    scenario's seed 10 the trail frame too, scored on all its detections where it shared
    none of them (its FWHM read 20 px from the trail). Judged on the stars that most frames
    share, frame 0 is chosen, the best of the candidates in truth."""
    spec = SyntheticSpec.from_scenario(scenario, n_stars=40, seed=seed)
    paths = write_synthetic_set(tmp_path, spec)
    truth = json.loads((tmp_path / "truth.json").read_text())["frames"]
    snr = [f["transmission"][0] / (f["fwhm"] * f["pixel_noise"][0]) for f in truth]
    ranked = inspect_frames(paths)  # choose_reference takes its first row
    candidates = [paths.index(s.path) for s in ranked if s.candidate]
    assert ranked[0].path == paths[0], [(s.path.name, s.star_snr, s.note) for s in ranked]
    assert max(snr[k] for k in candidates if k != 0) < 0.9 * snr[0]
    assert all(s.shared_stars >= 10 for s in ranked)


def test_a_frame_sharing_few_of_the_others_stars_is_no_candidate(tmp_path):
    """The colour field-dependent scenario's seed 12: frame 2 carries a satellite trail and
    was registered from nearly half a pixel's shift, which spreads its hot pixels into blobs
    of a star's size. Its detections shared 9 stars with the other frames (they share about
    410), its FWHM read 1.66 px for 3.53 and its star signal-to-noise led the frames; as the
    reference, its four targets failed as not registered. Since the FWHM is read where the
    detections' light is (``typical_fwhm``), it shares as many stars as the others and is no
    candidate for its trail. The same frame moved by 40 px (a frame not registered) shares
    few: it is no candidate for that, and frame 0, the best in truth, is chosen both times.
    (What ``inspect_frames`` does, with the unchanged frames' scores kept for the second.)"""
    spec = SyntheticSpec.from_scenario("field-dependent-psf", colour=True, seed=12)
    paths = write_synthetic_set(tmp_path, spec)
    truth = json.loads((tmp_path / "truth.json").read_text())["frames"]
    assert truth[2]["trail"]
    scores = [score_frame(p) for p in paths]
    kept = copy.deepcopy(scores)
    ranked = rank_frames(scores)
    by_path = {s.path: s for s in ranked}
    trail = by_path[paths[2]]
    median = float(np.median([s.shared_stars for s in ranked]))
    assert trail.shared_stars > 0.9 * median, (trail.shared_stars, median)
    assert not trail.candidate and trail.note.startswith("crossed by 1 satellite trail"), trail.note
    assert ranked[0].path == paths[0], [(s.path.name, s.star_snr, s.note) for s in ranked]

    with fits.open(paths[2]) as hdul:
        data, header = hdul[0].data, hdul[0].header.copy()
    moved = np.roll(data, 40, axis=-1)
    moved[..., :40] = 0
    fits.writeto(paths[2], moved, header, overwrite=True)
    kept[2] = score_frame(paths[2])
    ranked = rank_frames(kept)
    away = {s.path: s for s in ranked}[paths[2]]
    median = float(np.median([s.shared_stars for s in ranked]))
    assert away.shared_stars < MIN_SHARED_FRACTION * median, (away.shared_stars, median)
    assert not away.candidate and away.note.startswith("shares"), away.note
    assert ranked[0].path == paths[0], [(s.path.name, s.star_snr, s.note) for s in ranked]


def test_rank_frames_keeps_a_given_score_without_a_star_table():
    """Scores built by hand (no star table) rank by their own star_snr; unmeasured frames last."""
    scores = [
        ReferenceScore(Path("a.fits"), coverage=1.0, noise=1.0, star_snr=10.0, gradient=1.0, stars=100),
        ReferenceScore(Path("b.fits"), coverage=1.0, noise=1.0, star_snr=20.0, gradient=1.0, stars=100),
        ReferenceScore(Path("c.fits"), coverage=1.0, noise=1.0, star_snr=99.0, gradient=1.0, stars=0),
    ]
    ranked = rank_frames(scores)
    assert [s.path.name for s in ranked] == ["b.fits", "a.fits", "c.fits"]
    assert [s.star_snr for s in ranked] == [20.0, 10.0, 99.0]
    assert ranked[2].note == "no stars detected" and not ranked[2].candidate


def test_footprint_is_the_region_with_data_not_the_scattered_zeros():
    """A frame clipped at 0 over 70 % of its sky (a dark sky less its dark frame) with a
    registration border of 40 px on the left: its footprint misses the border and nothing
    else."""
    from nsg_gpu.select import footprint

    rng = np.random.default_rng(1)
    valid = rng.random((480, 640)) > 0.7
    valid[:, :40] = False
    cells = footprint(valid)
    cell = 640 // cells.shape[1]
    assert cell == 8
    assert cells[:, : 40 // cell].sum() == 0 and cells[:, 40 // cell :].all()


def test_a_frame_of_another_size_does_not_set_the_coverage_rule():
    """Footprints of four dithered frames (borders of 4-5 % on different sides) and one frame of
    another size, fully covered: it cannot be the others' reference, and the others are judged
    among themselves (the least they miss, not the stray frame's nothing, is the baseline)."""

    def bordered(left=0, right=0, bottom=0, top=0):
        footprint = np.ones((100, 100), bool)
        footprint[:bottom], footprint[100 - top :], footprint[:, :left], footprint[:, 100 - right :] = (False,) * 4
        return footprint

    footprints = [bordered(left=5), bordered(right=5), bordered(bottom=4), bordered(top=5), np.ones((50, 50), bool)]
    scores = [
        ReferenceScore(
            Path(f"{k}.fits"),
            coverage=float(f.mean()),
            noise=1.0,
            star_snr=10.0 + k,
            gradient=1.0,
            stars=100,
            footprint=f,
        )
        for k, f in enumerate(footprints)
    ]
    ranked = rank_frames(scores)
    by_name = {s.path.name: s for s in ranked}
    assert [by_name[f"{k}.fits"].candidate for k in range(5)] == [True, True, True, True, False]
    assert by_name["4.fits"].missing_area is None and "size" in by_name["4.fits"].note
    assert ranked[0].path.name == "3.fits"


@pytest.fixture(scope="module")
def inspected_set(tmp_path_factory):
    """Four 700x500 mono synthetic frames (random conditions and borders) and their field."""
    field = SyntheticField(width=700, height=500, n_frames=4, n_stars=900, seed=4)
    return field, write_synthetic_set(tmp_path_factory.mktemp("select") / "in", field.spec)


def test_inspect_ranks_as_reference_auto_chooses(inspected_set):
    field, paths = inspected_set
    result = runner.invoke(app, ["inspect", *map(str, paths), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted(r["path"] for r in rows) == sorted(map(str, paths))
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert not {"star_flux", "star_linear"} & set(rows[0])  # the star table stays out of the rows
    chosen, reason = choose_reference(paths)
    assert rows[0]["path"] == str(chosen) and rows[0]["candidate"]
    candidates = [r["star_snr"] for r in rows if r["candidate"]]
    assert candidates == sorted(candidates, reverse=True)
    assert all(r["candidate"] for r in rows[: len(candidates)])  # candidates come first
    by_path = {r["path"]: r for r in rows}
    for k, path in enumerate(paths):
        row, truth = by_path[str(path)], field.frames[k]
        assert row["exposure"] == truth.exposure and row["date_obs"] == truth.date_obs
        assert row["coverage"] == pytest.approx(field.coverage(k).mean(), abs=0.01)
        assert row["noise_per_second"] == pytest.approx(row["noise"] / truth.exposure)
        assert row["fwhm"] == pytest.approx(truth.fwhm, rel=0.25)
    table = runner.invoke(app, ["inspect", *map(str, paths)])
    assert table.exit_code == 0
    assert f"--reference auto would choose {Path(chosen).name}" in table.output
    assert table.output.index(Path(chosen).name) < min(table.output.index(p.name) for p in paths if p != Path(chosen))


def test_the_choice_does_not_depend_on_the_order_the_frames_are_given_in(inspected_set, tmp_path):
    """The best frame and a copy of it (equal scores) among the set, given forwards and
    backwards: the same frame is chosen, the first of the two by name, and the ranks are the
    same."""
    _, paths = inspected_set
    best = choose_reference(paths)[0]
    twin = tmp_path / "zz_copy.fits"
    shutil.copy(best, twin)
    frames = [*paths, twin]
    forwards, backwards = inspect_frames(frames), inspect_frames(frames[::-1])
    assert [s.path for s in forwards] == [s.path for s in backwards]
    assert forwards[0].path == Path(best) and forwards[1].path == twin
    assert forwards[0].star_snr == forwards[1].star_snr  # a tie, broken by name
    assert choose_reference(frames[::-1])[0] == Path(best)


def test_frames_a_registration_upscaled_are_scored_on_their_capture_noise(tmp_path):
    """The automatic choice reads every frame's noise as the weights do: on frames written as
    an x2 registration writes them (targets registered at up to half a pixel), at every 2nd
    pixel, within 3 % of each frame's noise before registration, where every pixel reads
    the zoom's smoothing (1.55-1.77 of it here, unequally for frames shifted unequally)."""
    from nsg_gpu.noise import multiscale_noise
    from nsg_gpu.stars import detection_image

    shifts = [[0, 0], [0.5, 0.5], [0.05, -0.1]]
    field = SyntheticField(width=600, height=500, n_frames=3, n_stars=350, seed=8, registration=True, shifts=shifts)
    paths = write_synthetic_set(tmp_path, field.spec, upscale=2)
    truth = json.loads((tmp_path / "truth.json").read_text())["frames"]
    every = []
    for k, path in enumerate(paths):
        noise = truth[k]["background_noise"][0]
        assert score_frame(path).noise == pytest.approx(noise, rel=0.03)
        every.append(multiscale_noise(detection_image(fits.getdata(path)[None])) / noise)
    assert max(every) > 1.5 and abs(every[1] - every[2]) > 0.05, every


def test_a_frame_of_another_size_and_an_unreadable_file_leave_the_others_scores_alone(inspected_set, tmp_path):
    """A frame cut to another size and a file that is no FITS among the set: the others'
    shared stars and scores are those of the set alone; the odd frame is no candidate, and
    the unreadable file has no measured values (null, not 0)."""
    field, paths = inspected_set
    alone = {r["path"]: r for r in json.loads(runner.invoke(app, ["inspect", *map(str, paths), "--json"]).stdout)}
    with fits.open(paths[1]) as hdul:
        fits.PrimaryHDU(hdul[0].data[:-40, :-60], hdul[0].header).writeto(tmp_path / "cut.fits")
        fits.PrimaryHDU(hdul[0].data[:, :-2], hdul[0].header).writeto(tmp_path / "trim.fits")  # one footprint
    (tmp_path / "junk.fits").write_text("not a frame\n")
    odd = [str(tmp_path / name) for name in ("cut.fits", "trim.fits", "junk.fits")]
    result = runner.invoke(app, ["inspect", *map(str, paths), *odd, "--json"])
    assert result.exit_code == 3
    rows = {r["path"]: r for r in json.loads(result.stdout)}
    for path in map(str, paths):
        assert (rows[path]["shared_stars"], rows[path]["star_snr"], rows[path]["candidate"]) == (
            alone[path]["shared_stars"],
            alone[path]["star_snr"],
            alone[path]["candidate"],
        )
    for name, shape in (("cut.fits", [460, 640]), ("trim.fits", [500, 698])):
        row = rows[str(tmp_path / name)]
        assert not row["candidate"] and row["shape"] == shape and "size differs" in row["note"], row
    junk = rows[str(tmp_path / "junk.fits")]
    measured = ("coverage", "noise", "star_snr", "gradient", "stars", "trails")
    assert junk["error"] and all(junk[k] is None for k in measured)
