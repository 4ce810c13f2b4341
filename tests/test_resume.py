"""Resume: a rerun keeps complete, up-to-date outputs and redoes the rest; rejection moves files."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from astropy.io import fits

from nsg_gpu.io import FrameMeta
from nsg_gpu.params import Parameters
from nsg_gpu.rejection import reject_frames
from nsg_gpu.results import FrameResult
from nsg_gpu.run import normalize
from nsg_gpu.synthetic import write_synthetic_set

SMALL = dict(width=700, height=500, n_stars=900)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Four small frames (frame 1 at about half the transmission) and one run over them."""
    root = tmp_path_factory.mktemp("resume")
    paths = write_synthetic_set(root / "in", n_frames=4, seed=4, **SMALL)
    run = normalize(paths, reference=paths[0], output_dir=root / "out")
    return paths, run, root / "out"


def _rerun(baseline, tmp_path, prepare=None, **kwargs):
    """Copy the baseline's outputs to a fresh directory (``prepare`` it) and run again there."""
    paths, first, out = baseline
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    if prepare:
        prepare(copy)
    snapshot = {p.relative_to(copy): p.stat().st_mtime_ns for p in copy.rglob("*_nsg.fits")}
    reference = kwargs.pop("reference", paths[0])
    run = normalize(kwargs.pop("frames", paths), reference=reference, output_dir=copy, **kwargs)
    return run, copy, snapshot


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def _rewritten(run, copy, snapshot) -> list[bool]:
    """Per frame: was its output written by this run (not the baseline's file)?"""
    out = []
    for frame in run.frames:
        relative = Path(frame.output).relative_to(copy)
        out.append(snapshot.get(relative) != Path(frame.output).stat().st_mtime_ns)
    return out


def test_rerun_keeps_complete_outputs_and_their_rows(baseline, tmp_path):
    paths, first, out = baseline
    run, copy, snapshot = _rerun(baseline, tmp_path)
    assert [f.resumed for f in run.frames] == [True] * 4
    assert _rewritten(run, copy, snapshot) == [False] * 4
    for old, new in zip(first.frames, run.frames):
        assert (new.status, new.rejected is None, new.star_pairs, new.samples) == (
            old.status,
            old.rejected is None,
            old.star_pairs,
            old.samples,
        )
        # The cards hold every value to its last bit: the rows, and the rejection read from
        # them (relative to the best frame), are the first run's, not a rounding of them (at
        # 5 digits a frame at a threshold set to 6 moved to rejected/ on a rerun).
        exact = dict(rel=0, abs=0)
        assert new.transmission == pytest.approx(old.transmission, **exact)
        assert new.weight == pytest.approx(old.weight, **exact)
        assert new.scale == pytest.approx(old.scale, **exact)
        assert new.relative_transmission == pytest.approx(old.relative_transmission, **exact)
        assert new.relative_weight == pytest.approx(old.relative_weight, **exact)
        assert new.weight_source == old.weight_source
        assert new.fwhm == pytest.approx(old.fwhm, **exact)
        assert old.beta is not None and new.beta == pytest.approx(old.beta, **exact)
        assert old.status == "reference" or old.photometry in ("psf", "aperture-fitted", "aperture")
        assert new.photometry == old.photometry
        assert old.ellipticity is not None and new.ellipticity == pytest.approx(old.ellipticity, **exact)
        assert new.elongation_angle == pytest.approx(old.elongation_angle, **exact)
        assert len(new.noise) == len(old.noise) == 1 and new.noise == pytest.approx(old.noise, **exact)
        assert new.exposure == old.exposure and new.date_obs == old.date_obs
        assert Path(new.output).relative_to(copy) == Path(old.output).relative_to(out)
    rows = _csv(copy / "results.csv")
    assert [r["resumed"] for r in rows] == ["True"] * 4
    first_rows = _csv(out / "results.csv")
    for row, first_row in zip(rows, first_rows, strict=True):  # the same text but for these
        differing = {k for k in row if row[k] != first_row[k]} - {"resumed", "seconds", "timings", "output"}
        assert not differing, {k: (first_row[k], row[k]) for k in differing}
    assert all(float(r["noise_0"]) > 0 for r in rows)  # a resumed row says what the first run's said


def test_overwrite_redoes_every_frame(baseline, tmp_path):
    run, copy, snapshot = _rerun(baseline, tmp_path, overwrite=True)
    assert [f.resumed for f in run.frames] == [False] * 4
    assert _rewritten(run, copy, snapshot) == [True] * 4
    assert sorted(p.name for p in copy.rglob("*_nsg.fits")) == [f"light_{k:03d}_nsg.fits" for k in range(4)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"params": Parameters(gradient_smoothness=-1.0)}, [False] * 4, id="parameter"),
        pytest.param({"reference": "frame 2"}, [False] * 4, id="reference"),
        pytest.param({"touch": 3}, [True, True, True, False], id="input-touched"),
        pytest.param({"truncate": 2}, [True, True, False, True], id="output-truncated"),
        pytest.param({"params": Parameters(min_weight=0.1, min_transmission=0.3)}, [True] * 4, id="thresholds-only"),
    ],
)
def test_a_change_is_detected_and_redone(baseline, tmp_path, change, expected):
    paths, first, out = baseline
    kwargs = {}
    if "params" in change:
        kwargs["params"] = change["params"]
    if change.get("reference") == "frame 2":
        kwargs["reference"] = paths[2]
    if "touch" in change:
        # A copy of the inputs, one of them touched since the first run.
        inputs = tmp_path / "in"
        shutil.copytree(paths[0].parent, inputs)  # copytree keeps modification times
        kwargs["frames"] = [inputs / p.name for p in paths]
        kwargs["reference"] = inputs / paths[0].name
        target = inputs / paths[change["touch"]].name
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    prepare = None
    if "truncate" in change:

        def prepare(copy):
            victim = copy / Path(first.frames[change["truncate"]].output).relative_to(out)
            victim.write_bytes(victim.read_bytes()[:-2880])  # as a copy cut short would leave it

    run, copy, snapshot = _rerun(baseline, tmp_path, prepare, **kwargs)
    order = [Path(f.path).name for f in run.frames]
    resumed = dict(zip(order, [f.resumed for f in run.frames]))
    assert [resumed[p.name] for p in paths] == expected
    for frame in run.frames:
        assert frame.status in ("ok", "reference")
        with fits.open(frame.output) as hdul:
            assert hdul[0].header["NSGREF"] == Path(kwargs.get("reference", paths[0])).name
            assert hdul[0].data.shape == (500, 700)
    # A frame redone has one output, and only there.
    assert len(list(copy.rglob("*_nsg.fits"))) == 4


def test_thresholds_move_outputs_between_folders(baseline, tmp_path):
    paths, first, out = baseline
    assert [bool(f.rejected) for f in first.frames] == [False, True, False, False]
    assert Path(first.frames[1].output) == out / "rejected" / "light_001_nsg.fits"
    weights = _csv(out / "weights.csv")
    assert [w["file"] for w in weights] == ["light_000_nsg.fits", "light_002_nsg.fits", "light_003_nsg.fits"]
    assert float(weights[1]["weight"]) == pytest.approx(first.frames[2].weight, rel=1e-5)
    # Lower thresholds on a rerun: the frame comes back, without being normalized again.
    run, copy, snapshot = _rerun(baseline, tmp_path, params=Parameters(min_weight=0.1, min_transmission=0.3))
    assert [f.rejected for f in run.frames] == [None] * 4 and all(f.resumed for f in run.frames)
    assert Path(run.frames[1].output) == copy / "light_001_nsg.fits"
    assert not (copy / "rejected" / "light_001_nsg.fits").exists()
    assert len(_csv(copy / "weights.csv")) == 4


def _row(name, weight, transmission, exposure, status="ok"):
    return FrameResult(
        path=name, status=status, weight=weight, transmission=transmission, meta=FrameMeta(exposure=exposure)
    )


def test_rejection_is_relative_to_the_best_per_unit_exposure(tmp_path):
    frames = [
        _row("ref", 1.0, [1.0], 60.0, status="reference"),
        _row("long", 3.0, [2.0, 2.0, 2.0], 120.0),  # per second: weight 1.5x, transmission 1x the reference
        _row("at_limit", 0.375, [0.75], 60.0),  # weight 0.25 of the best: rejected (<=), transmission 0.75 too
        _row("thin_cloud", 1.2, [0.7, 0.74, 0.78], 60.0),  # transmission 0.74
        _row("good", 1.2, [0.9], 60.0),
        FrameResult(path="broken", status="failed", error="x"),
    ]
    rejected = reject_frames(frames, min_weight=0.25, min_transmission=0.75, output_dir=tmp_path)
    assert [f.path for f in rejected] == ["at_limit", "thin_cloud"]
    assert frames[1].relative_weight == pytest.approx(1.0) and frames[0].relative_weight == pytest.approx(2 / 3)
    assert frames[2].relative_weight == pytest.approx(0.25) and frames[3].relative_transmission == pytest.approx(0.74)
    assert "weight 0.250 of the best per unit exposure" in frames[2].rejected
    assert "transmission 0.750" in frames[2].rejected
    assert frames[3].rejected.startswith("transmission 0.740 of the best per unit exposure (minimum 0.75)")
    assert frames[5].rejected is None and frames[5].relative_weight is None


def test_a_frame_whose_transmission_is_in_doubt_does_not_set_the_bar(tmp_path):
    """NGC 7023's numbers (``nsg normalize ... --reference auto``): two 20 s frames from another
    camera, whose channels disagree, set NSG's best transmission per unit exposure at 1.35
    times the 10 s reference's, and every 10 s target fell under 0.75 of it. The bar is now
    the best frame whose mean transmission is not in doubt: the 10 s targets' scales are
    flagged for one channel's error of 4.3-4.4 %, but their means are known to 1.7-2.1 % and
    count; the 20 s frames do not, and are still judged themselves."""
    frames = [
        _row("000", 1.0, [1.0, 1.0, 1.0], 10.0, status="reference"),
        _row("001", 0.988, [0.9693, 0.9893, 0.9879], 10.0),
        _row("002", 1.017, [1.0258, 0.9903, 0.9628], 10.0),
        _row("004", 6.466, [2.7936, 2.0669, 3.0925], 20.0),
        _row("005", 6.625, [2.8985, 2.0839, 3.0952], 20.0),
    ]
    errors = ([0.024, 0.017, 0.042], [0.045, 0.019, 0.041], [0.097, 0.035, 0.15], [0.091, 0.044, 0.2])
    for f, e in zip(frames[1:], errors):
        f.transmission_error = e
    assert [bool(f.scale_flag) for f in frames] == [False, True, True, True, True]
    assert [bool(f.transmission_doubt) for f in frames] == [False, False, False, True, True]
    assert "disagree" in frames[3].transmission_doubt
    assert reject_frames(frames, min_weight=0, min_transmission=0, output_dir=tmp_path) == []
    # NSG's bar, frame 005's 0.1346 per second, would reject both 10 s targets (0.73-0.74).
    assert max(f.relative_transmission for f in frames) == pytest.approx((2.8985 + 2.0839 + 3.0952) / 60 / 0.1)
    assert reject_frames(frames, min_weight=0.25, min_transmission=0.75, output_dir=tmp_path) == []
    assert frames[1].relative_transmission == pytest.approx((0.9693 + 0.9893 + 0.9879) / 3)
    assert frames[2].relative_weight == pytest.approx(1.0)  # the best weight of the sure frames
    assert frames[0].relative_weight == pytest.approx(1 / 1.017)
    # A sure frame above the reference sets the bar; a thin one under 0.75 of it goes.
    frames += [_row("sure", 1.1, [1.05, 1.05, 1.05], 10.0), _row("thin", 0.9, [0.78, 0.78, 0.78], 10.0)]
    frames[-2].transmission_error = frames[-1].transmission_error = [0.01] * 3
    rejected = reject_frames(frames, min_weight=0.25, min_transmission=0.75, output_dir=tmp_path)
    assert [f.path for f in rejected] == ["thin"]
    assert frames[1].relative_transmission == pytest.approx((0.9693 + 0.9893 + 0.9879) / 3 / 1.05)
    assert frames[6].relative_transmission == pytest.approx(0.78 / 1.05)
    # A mean uncertain by more than 3 % is in doubt too; where every frame is, NSG's bar.
    frames[5].transmission_error = [0.06] * 3
    assert "mean transmission 1.05 +- 0.035 (3.3 %, more than 3 %)" in frames[5].transmission_doubt
    doubtful = frames[3:6]
    reject_frames(doubtful, min_weight=0, min_transmission=0, output_dir=tmp_path)
    assert max(f.relative_transmission for f in doubtful) == pytest.approx(1.0)
    assert doubtful[2].relative_transmission == pytest.approx(1.05 / 10 / ((2.8985 + 2.0839 + 3.0952) / 60))


def test_without_every_exposure_rejection_uses_raw_values_and_spares_the_reference(tmp_path):
    frames = [
        _row("ref", 1.0, [1.0], None, status="reference"),
        _row("bright", 8.0, [3.0], 60.0),
        _row("mid", 2.5, [2.4], 60.0),
    ]
    rejected = reject_frames(frames, min_weight=0.25, min_transmission=0.75, output_dir=tmp_path)
    # Raw: reference 1/8 weight and 1/3 transmission, but the reference is never rejected.
    assert [f.path for f in rejected] == []
    assert frames[0].relative_weight == pytest.approx(0.125) and frames[2].relative_transmission == pytest.approx(0.8)
    assert frames[2].relative_weight == pytest.approx(2.5 / 8)
    # A threshold of 0 turns its test off, even for a frame of no weight at all.
    frames.append(_row("dark", 0.0, [0.0], 60.0))
    assert reject_frames(frames, min_weight=0, min_transmission=0, output_dir=tmp_path) == []


def test_max_scale_error_rejects_uncertain_and_disagreeing_frames(tmp_path):
    frames = [
        _row("ref", 1.0, [1.0], 60.0, status="reference"),
        _row("sure", 1.0, [1.0, 1.01, 0.99], 60.0),
        _row("unsure", 1.0, [1.0, 1.0, 1.0], 60.0),
        _row("chromatic", 1.0, [1.0, 1.3, 1.0], 60.0),
    ]
    frames[1].transmission_error = [0.01, 0.01, 0.01]
    frames[2].transmission_error = [0.01, 0.045, 0.01]
    frames[3].transmission_error = [0.01, 0.01, 0.01]
    # Off by default: flagged frames are kept.
    assert reject_frames(frames, min_weight=0, min_transmission=0, output_dir=tmp_path) == []
    rejected = reject_frames(frames, min_weight=0, min_transmission=0, max_scale_error=0.03, output_dir=tmp_path)
    assert [f.path for f in rejected] == ["unsure", "chromatic"]
    assert "scale in doubt: channel 1 transmission 1 +- 0.045 (4.5 %, more than 3 %)" in frames[2].rejected
    assert "disagree beyond their errors" in frames[3].rejected
    # A looser threshold keeps the uncertain frame, never the disagreeing one.
    rejected = reject_frames(frames, min_weight=0, min_transmission=0, max_scale_error=0.05, output_dir=tmp_path)
    assert [f.path for f in rejected] == ["chromatic"]
    with pytest.raises(ValueError, match=r"max_scale_error \(--max-scale-error\) must be positive"):
        Parameters(max_scale_error=0)
    assert Parameters(max_scale_error=0.02).normalization_items() == Parameters().normalization_items()


def test_thresholds_are_checked_and_not_part_of_the_history():
    with pytest.raises(ValueError, match=r"min_weight \(--min-weight\) must be in"):
        Parameters(min_weight=1.5)
    with pytest.raises(ValueError, match=r"min_transmission \(--min-transmission\) must be in"):
        Parameters(min_transmission=-0.1)
    history = Parameters(min_weight=0.4).history()
    assert not any(line.startswith(("min_weight", "min_transmission")) for line in history)
    assert Parameters(min_weight=0.4).history() == Parameters().history()


def test_a_rerun_stopped_midway_leaves_no_summary_of_the_earlier_run(baseline, tmp_path):
    """A changed parameter redoes every frame; stopped after its reference, the rerun leaves
    no results.csv, results.json nor weights.csv that would list the outputs it removed (nor
    their temporaries); run to its end, it writes them anew."""
    paths, first, out = baseline

    class Stop(Exception):
        pass

    def stop_after_the_reference(row, done, total):
        if done == 1:
            raise Stop

    def prepare(copy):
        (copy / ".results.csv.abc123.tmp").write_text("a killed run's half-written summary")
        (copy / ".report.html.abc123.tmp").write_text("a killed run's half-written report")
        (copy / "plots").mkdir(exist_ok=True)
        (copy / "plots" / ".light_001_photometry.png.abc123.tmp").write_text("a half-written plot")

    with pytest.raises(Stop):
        _rerun(
            baseline, tmp_path, prepare, params=Parameters(gradient_smoothness=1.0), progress=stop_after_the_reference
        )
    copy = tmp_path / "out"
    assert not any((copy / name).exists() for name in ("results.csv", "results.json", "weights.csv"))
    assert not list(copy.glob(".*.tmp")) and not list((copy / "plots").glob(".*.tmp"))
    run = normalize(paths, reference=paths[0], output_dir=copy, params=Parameters(gradient_smoothness=1.0))
    listed = [row["file"] for row in _csv(copy / "weights.csv")]
    assert sorted(listed) == sorted(os.path.relpath(f.output, copy) for f in run.frames if not f.rejected)


def test_a_folder_normalized_into_itself_is_not_normalized_again(baseline, tmp_path):
    """`nsg normalize lights -o lights` twice: the second run resumes the first's outputs and
    does not take them for frames (no `_nsg_nsg` files)."""
    paths, first, out = baseline
    folder = tmp_path / "lights"
    folder.mkdir()
    for p in paths:
        shutil.copy2(p, folder / p.name)
    run = normalize([folder], reference=folder / paths[0].name, output_dir=folder)
    assert len(run.frames) == 4 and not any(f.resumed for f in run.frames)
    again = normalize([folder], reference=folder / paths[0].name, output_dir=folder)
    assert len(again.frames) == 4 and all(f.resumed for f in again.frames)
    assert not list(folder.rglob("*_nsg_nsg*"))


def test_outputs_carry_nsgs_history_lines(baseline):
    """NSG's own HISTORY lines (its readers look for them): ``NSG.gradientSmoothness: <s>``
    on every output, and on each target ``NSG.<noise type>[c]: <sigma>``, the noise its weight
    came from, per channel; the reference ``NSG.reference``."""
    _, run, _ = baseline
    for frame in run.frames:
        history = [str(line) for line in fits.getheader(frame.output)["HISTORY"]]
        assert "NSG.gradientSmoothness: -2.0" in history
        noise_lines = [line for line in history if line.startswith("NSG.noise")]
        if frame.status == "reference":
            assert "NSG.reference" in history and not noise_lines
        else:
            assert noise_lines == [f"NSG.{frame.weight_source}[0]: {frame.noise[0]!r}"], noise_lines
