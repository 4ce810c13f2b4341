"""The command line through typer's CliRunner, on small synthetic frames."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from nsg_gpu import __version__
from nsg_gpu.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def small_frames(tmp_path_factory):
    """Four 700x500 mono synthetic frames written by ``nsg synth``."""
    root = tmp_path_factory.mktemp("cli")
    result = runner.invoke(
        app,
        [
            "synth",
            str(root / "in"),
            "--frames",
            "4",
            "--width",
            "700",
            "--height",
            "500",
            "--stars",
            "900",
            "--seed",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_the_command_line_starts_without_what_a_run_may_not_need():
    """Importing the command line and the cluster's tasks loads neither ``scipy.signal``
    with ``scipy.stats`` (0.5 s; the gradient's lattice convolution calls ``scipy.fft``
    itself) nor photutils with astropy's coordinates, tables and WCS (0.3-0.45 s; imported
    where the plain aperture is first used): every ``nsg`` command and every cluster worker
    starts without them."""
    import subprocess
    import sys

    heavy = ("scipy.signal", "scipy.stats", "photutils", "astropy.wcs", "astropy.coordinates", "astropy.table")
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, nsg_gpu.cli, nsg_gpu.cluster; print([m for m in {heavy!r} if m in sys.modules])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_normalize_writes_outputs_and_results(small_frames, tmp_path):
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    inputs_before = {p: fits.getdata(p).copy() for p in frames}
    out = tmp_path / "out"
    result = runner.invoke(app, ["normalize", *frames, "--reference", frames[0], "-o", str(out), "--backend", "numpy"])
    assert result.exit_code == 0, result.output
    truth = json.loads((small_frames / "in" / "truth.json").read_text())
    rows = json.loads((out / "results.json").read_text())["frames"]
    assert [r["status"] for r in rows] == ["reference", "ok", "ok", "ok"]
    # Frame 1 has about half the reference's transmission: NSG's default thresholds reject it.
    assert [bool(r["rejected"]) for r in rows] == [False, True, False, False]
    assert rows[1]["output"] == str(out / "rejected" / "light_001_nsg.fits")
    for k, path in enumerate(frames):
        with fits.open(rows[k]["output"]) as hdul:
            header = hdul[0].header
            data = hdul[0].data
        assert header["NSGREF"] == "light_000.fits" and "NWEIGHT" in header and "NSGHIGH" in header
        assert header["CTYPE1"] == "RA---TAN"  # WCS carried over
        assert "NSGS1" not in header
        assert 1 / header["NSGS0"] == pytest.approx(
            truth["frames"][k]["scale"][0], rel=0.05
        )  # few stars; accuracy is tested on full-size sets
        np.testing.assert_array_equal(data == 0, inputs_before[path] == 0)  # no-data stays no-data
    with fits.open(out / "light_000_nsg.fits") as hdul:
        assert "NSG.reference" in [str(h) for h in hdul[0].header["HISTORY"]]
    assert (out / "results.csv").read_text().count("\n") == 5
    for p, before in inputs_before.items():
        np.testing.assert_array_equal(fits.getdata(p), before)


def test_reference_auto_picks_a_frame(small_frames, tmp_path):
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    result = runner.invoke(app, ["normalize", *frames, "--reference", "auto", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "reference: light_" in result.output and "signal-to-noise" in result.output


def test_bad_frames_fail_alone(small_frames, tmp_path):
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    wrong = tmp_path / "wrong_shape.fits"
    fits.PrimaryHDU(np.full((100, 120), 0.1, np.float32)).writeto(wrong)
    broken = tmp_path / "broken.fits"
    shutil.copy(frames[1], broken)
    broken.write_bytes(broken.read_bytes()[:5000])
    result = runner.invoke(
        app, ["normalize", frames[0], frames[1], str(wrong), str(broken), "-r", frames[0], "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 3
    assert "wrong_shape.fits: is 120x100 mono but the reference" in result.output
    assert "broken.fits" in result.output
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["frames"]
    assert [r["status"] for r in rows] == ["reference", "ok", "failed", "failed"]


def test_missing_reference_is_one_line(small_frames, tmp_path):
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    result = runner.invoke(app, ["normalize", *frames, "-r", str(tmp_path / "nope.fits"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "nope.fits: the reference frame does not exist" in result.output
    assert "Traceback" not in result.output


def test_a_reference_without_stars_in_the_linear_range_is_one_line(small_frames, tmp_path):
    """Every star of the reference above --linear-range: one line naming the reference and
    why, exit code 1, nothing written (it crashed in the photometry with a traceback)."""
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    out = tmp_path / "o"
    result = runner.invoke(app, ["normalize", *frames, "-r", frames[0], "--linear-range", "0.01", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert f"{frames[0]}: only 0 of the " in result.output
    assert "peak below the linear range (0.01)" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cupy_backend_without_gpu_is_one_line(small_frames, tmp_path):
    from nsg_gpu.backend import cupy_status

    if cupy_status()[0]:
        pytest.skip("a GPU is usable here")
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    result = runner.invoke(app, ["normalize", *frames[:2], "--backend", "cupy", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--backend cupy is not usable here" in result.output


def test_noise_cards_give_the_weight(small_frames, tmp_path):
    """With NOISE00 in both frames, SNR = sigma_R / (sigma_T * m) and NWEIGHT = SNR^2."""
    frames = sorted((small_frames / "in").glob("*.fits"))[:2]
    copies = []
    for path, noise in zip(frames, (0.002, 0.004)):
        with fits.open(path) as hdul:
            hdul[0].header["NOISE00"] = noise
            copy = tmp_path / path.name
            hdul.writeto(copy)
        copies.append(str(copy))
    out = tmp_path / "o"
    result = runner.invoke(app, ["normalize", *copies, "-r", copies[0], "-o", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "results.json").read_text())["frames"][1]
    assert row["weight_source"] == "NOISExx"
    expected_snr = 0.002 / (0.004 * row["scale_0"])
    assert row["snr_0"] == pytest.approx(expected_snr, rel=1e-9)
    assert row["weight"] == pytest.approx(expected_snr**2, rel=1e-9)
    with fits.open(row["output"]) as hdul:
        assert hdul[0].header["NWEIGHT"] == pytest.approx(expected_snr**2, rel=1e-5)


def test_output_never_lands_on_an_input(small_frames, tmp_path):
    frames = sorted((small_frames / "in").glob("*.fits"))[:2]
    for p in frames:
        shutil.copy(p, tmp_path / p.name)
    copies = [str(tmp_path / p.name) for p in frames]
    before = [(tmp_path / p.name).read_bytes() for p in frames]
    result = runner.invoke(app, ["normalize", *copies, "-r", copies[0], "-o", str(tmp_path), "--postfix", ""])
    assert result.exit_code == 1
    assert "would overwrite an input frame" in result.output
    assert [(tmp_path / p.name).read_bytes() for p in frames] == before


def test_every_parameter_is_an_option_with_its_help_and_default(small_frames, tmp_path, monkeypatch):
    """The options are declared once, by Parameters; each reaches the run as given."""
    import dataclasses

    from nsg_gpu import cli
    from nsg_gpu.params import Parameters

    seen = {}

    def fake_normalize(frames, *, params, **kwargs):
        seen["params"] = params
        raise cli.NSGError("stopped")

    monkeypatch.setattr("nsg_gpu.run.normalize", fake_normalize)
    # In a terminal of 80 columns, every option's name in full (typer's boxed tables cut them).
    result = runner.invoke(app, ["normalize", "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert max(len(line) for line in result.output.splitlines()) <= 80
    for item in dataclasses.fields(Parameters):
        flag = item.metadata["flag"] or "--" + item.name.replace("_", "-")
        assert flag.split("/")[0] in result.output, flag
        if item.default is None and item.metadata["auto"]:
            assert f"[default: Auto, {item.metadata['auto'][:20]}" in " ".join(result.output.split()), item.name
    frames = [str(p) for p in sorted((small_frames / "in").glob("*.fits"))]
    args = ["normalize", *frames, "-o", str(tmp_path), "--sample-size", "40", "--photometry", "aperture"]
    result = runner.invoke(
        app, [*args, "--no-truncate", "--focal-length", "530", "--min-weight", "0.1", "--max-scale-error", "0.02"]
    )
    assert result.exit_code == 1 and "stopped" in result.output
    assert seen["params"] == Parameters(
        sample_size=40,
        photometry="aperture",
        truncate=False,
        focal_length_mm=530.0,
        min_weight=0.1,
        max_scale_error=0.02,
    )


def test_a_parameter_out_of_range_is_one_line_and_a_bug_keeps_its_traceback(small_frames, tmp_path, monkeypatch):
    frames = [str(p) for p in sorted((small_frames / "in").glob("*.fits"))]
    result = runner.invoke(app, ["normalize", *frames, "-o", str(tmp_path), "--star-flux-tolerance", "0.5"])
    assert result.exit_code == 1 and result.output.startswith("nsg: error: star_flux_tolerance")

    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's error")

    monkeypatch.setattr("nsg_gpu.run.normalize", broken)
    result = runner.invoke(app, ["normalize", *frames, "-o", str(tmp_path)])
    assert isinstance(result.exception, ValueError)  # not swallowed into a one-line message

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of a run

    monkeypatch.setattr("nsg_gpu.run.normalize", interrupted)
    result = runner.invoke(app, ["normalize", *frames, "-o", str(tmp_path)])
    assert result.exit_code == 130
    assert result.output.strip().startswith("nsg: interrupted: the same command again finishes the job")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("", "--reference is empty: give the reference frame's path or name, or auto"),
        ("light_009", "light_009: no such file, nor a frame of that name among the frames given"),
        ("pipe", "pipe: is not a regular file (a pipe or a device?); give the reference frame"),
        ("dangling", "dangling: is a link to nothing; give the reference frame itself"),
    ],
    ids=["empty", "not-among-frames", "fifo", "dangling-link"],
)
def test_a_reference_that_is_no_frame_is_named_for_what_it_is(small_frames, tmp_path, monkeypatch, reference, message):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("pipe")
    os.symlink("nothing", "dangling")
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    result = runner.invoke(app, ["normalize", *frames, "-r", reference, "-o", "out"])
    assert result.exit_code == 1 and result.output.strip() == f"nsg: error: {message}", result.output
    assert not (tmp_path / "out").exists()


def test_directories_stand_for_their_frames_and_errors_speak_our_words(small_frames, tmp_path):
    directory = small_frames / "in"
    result = runner.invoke(app, ["normalize", str(directory), "-o", str(tmp_path / "out"), "-q", "--no-report"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").rglob("*_nsg.fits"))) == 4
    result = runner.invoke(app, ["normalize", str(directory), "-r", str(directory), "-o", str(tmp_path / "o2")])
    assert result.exit_code == 1 and "is a directory; give the reference frame itself" in result.output
    readme = tmp_path / "README.md"
    readme.write_text("# not a frame\n")
    result = runner.invoke(app, ["inspect", str(directory / "light_000.fits"), str(readme), "--json"])
    assert result.exit_code == 3
    rows = json.loads(result.stdout)
    bad = next(r for r in rows if r["path"].endswith("README.md"))
    assert "is not a FITS file" in bad["error"] and "ignore_missing_simple" not in bad["error"]
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing_dir")])
    assert result.exit_code == 3


def test_output_directory_that_is_a_file_is_one_line_before_any_work(small_frames, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    frames = [str(p) for p in sorted((small_frames / "in").glob("*.fits"))]
    result = runner.invoke(app, ["normalize", *frames, "-r", frames[0], "-o", str(afile)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "the output directory is a file" in result.output and afile.read_text() == "x"


def test_exit_codes_json_rejections_and_quiet_reference(small_frames, tmp_path):
    frames = [str(p) for p in sorted((small_frames / "in").glob("*.fits"))]
    result = runner.invoke(app, ["normalize", *frames, "--no-such-option"])
    assert result.exit_code == 2  # usage error: click's code, not "some frames failed"
    result = runner.invoke(app, ["normalize", "--help"], env={"COLUMNS": "200"})
    assert "--quiet" in result.output and "<bool>" not in result.output.split("--help")[0]
    args = ["normalize", *frames, "-o", str(tmp_path / "j"), "--no-report", "--json", "--min-transmission", "0.99"]
    result = runner.invoke(app, args)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    rejected = [e for e in events if e["event"] == "rejected"]
    run = events[-1]
    assert run["event"] == "run" and run["rejected"] == len(rejected) > 0
    assert all(e["rejected"] and "transmission" in e["rejected"] for e in rejected)
    result = runner.invoke(app, ["normalize", *frames, "-o", str(tmp_path / "q"), "--no-report", "-q"])
    assert (
        result.exit_code == 0 and "reference: " in result.output and "auto" not in result.output.split("reference: ")[0]
    )


def test_stack_after_normalize_reads_the_weight_keyword_given(small_frames, tmp_path):
    """``--weight-keyword WGT --stack m.fits`` normalized every frame, then failed each in the
    stack for want of an NWEIGHT card (exit 1, no master)."""
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    out, master = tmp_path / "out", tmp_path / "m.fits"
    args = ["normalize", *frames, "-r", frames[0], "-o", str(out), "--weight-keyword", "wgt", "--stack", str(master)]
    result = runner.invoke(app, [*args, "--min-weight", "0", "--min-transmission", "0", "--no-report", "-q"])
    assert result.exit_code == 0, result.output
    weights = [fits.getheader(p)["WGT"] for p in sorted(out.glob("*_nsg.fits"))]
    assert len(weights) == len(frames) and "NWEIGHT" not in fits.getheader(sorted(out.glob("*_nsg.fits"))[1])
    header = fits.getheader(master)
    assert header["NCOMBINE"] == len(frames) and header["NSGSWGT"] == "WGT"


def test_normalize_refuses_a_master_name_before_it_starts(small_frames, tmp_path):
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    args = ["normalize", *frames, "-r", frames[0], "-o", str(tmp_path / "out"), "--stack", str(tmp_path / "m.xisf")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "the master is written as plain FITS" in result.output
    result = runner.invoke(app, [*args[:-1], frames[2]])
    assert result.exit_code == 1 and "--stack names one of the frames" in result.output
    assert not (tmp_path / "out").exists()


def test_a_master_among_the_frames_is_not_a_frame(small_frames, tmp_path):
    """A master of nsg stack among FRAMES (written beside them): normalize fails it alone and
    never takes it for the reference; inspect says what it is."""
    frames = sorted((small_frames / "in").glob("*.fits"))
    with fits.open(frames[1]) as hdul:
        header = hdul[0].header.copy()
        header["NSGSTACK"] = "nsg-gpu"
        fits.PrimaryHDU(hdul[0].data * 2, header).writeto(tmp_path / "master.fits")
    inputs = [str(tmp_path / "master.fits"), *map(str, frames[:3])]
    result = runner.invoke(app, ["normalize", *inputs, "-o", str(tmp_path / "out"), "--backend", "numpy", "--json"])
    assert result.exit_code == 3, result.output
    table = (tmp_path / "out" / "results.csv").read_text().splitlines()
    rows = {Path(r["file"]).name: r for r in csv.DictReader(table)}
    assert (
        rows["master.fits"]["status"] == "failed" and "is a master written by nsg stack" in rows["master.fits"]["error"]
    )
    assert sum(r["status"] == "reference" for r in rows.values()) == 1 and rows["master.fits"]["status"] != "reference"
    shown = runner.invoke(app, ["inspect", *inputs, "--json"])
    listed = {Path(r["path"]).name: r for r in json.loads(shown.output)}
    assert (
        "is a master written by nsg stack" in listed["master.fits"]["error"] and not listed["master.fits"]["candidate"]
    )


def test_normalize_then_stack_against_the_truth(small_frames, tmp_path):
    """``normalize --stack``: the accepted outputs (not rejected/) integrated; against the
    synthetic field's truth the trail of frame 2 and the hot pixels are gone, the coverage is
    the frames' and the borders are at the level of the rest."""
    from nsg_gpu.synthetic import SyntheticField

    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))
    out = tmp_path / "out"
    master_path = tmp_path / "master.fits"
    result = runner.invoke(
        app, ["normalize", *frames, "-r", frames[0], "-o", str(out), "--backend", "numpy", "--stack", str(master_path)]
    )
    assert result.exit_code == 0, result.output
    assert "stacked 3 frames into" in result.output  # frame 1 was rejected by its transmission
    truth = json.loads((small_frames / "in" / "truth.json").read_text())
    field = SyntheticField(**truth["spec"])
    with fits.open(master_path) as hdul:
        master = hdul[0].data.astype(np.float64)
        coverage = hdul["COVERAGE"].data
        history = [str(h) for h in hdul[0].header["HISTORY"]]
    assert [h for h in history if h.startswith("NSG.stack frame")] == [
        f"NSG.stack frame {k + 1}: light_00{n}_nsg.fits weight {w}"
        for k, (n, w) in enumerate(
            zip((0, 2, 3), [f"{float(r.split(',')[1]):.6g}" for r in (out / "weights.csv").read_text().split()[1:]])
        )
    ]
    accepted = (0, 2, 3)
    np.testing.assert_array_equal(coverage, sum(field.coverage(k).astype(int) for k in accepted))
    reference = field.noise_free(0)[0].astype(np.float64)
    sky = field.stars(0)[0] < 0.05 * field.pixel_noise(0)[0]  # away from stars, whose PSFs differ per frame
    residual = master - reference
    noise = field.pixel_noise(0)[0] / np.sqrt(3)
    everywhere = coverage == 3
    trail = field.render(2)[0] - field.noise_free(2)[0] > 0.01  # the trail and frame 2's hot pixels
    trail &= sky & everywhere
    assert trail.sum() > 100
    level = np.median(residual[sky & everywhere])  # what the gradient fit leaves: a fraction of the noise
    assert abs(level) < noise
    assert np.percentile(np.abs(residual[trail] - level), 99) < 5 * noise
    partial = sky & (coverage > 0) & ~everywhere
    assert partial.sum() > 1000
    assert abs(np.median(residual[partial]) - level) < 0.5 * noise  # borders not darkened
    assert '<h2 id="stack">Stack</h2>' in (out / "report.html").read_text()
    assert (tmp_path / "master_stack.csv").is_file()


def test_reference_named_among_the_frames(small_frames, tmp_path):
    """``-r`` with a frame's stem picks that frame from a directory of frames, and the run
    equals the run with the reference's path."""
    frames_dir = small_frames / "in"
    reference = sorted(frames_dir.glob("*.fits"))[1]
    by_path = runner.invoke(app, ["normalize", str(frames_dir), "-r", str(reference), "-o", str(tmp_path / "a")])
    by_stem = runner.invoke(app, ["normalize", str(frames_dir), "-r", reference.stem, "-o", str(tmp_path / "b")])
    assert by_path.exit_code == 0 and by_stem.exit_code == 0, by_stem.output
    rows_a = json.loads((tmp_path / "a" / "results.json").read_text())["frames"]
    rows_b = json.loads((tmp_path / "b" / "results.json").read_text())["frames"]
    assert [Path(r["file"]).name for r in rows_b if r["status"] == "reference"] == [reference.name]
    assert [(Path(r["file"]).name, r["status"], r["scale_0"], r["weight"]) for r in rows_a] == [
        (Path(r["file"]).name, r["status"], r["scale_0"], r["weight"]) for r in rows_b
    ]


def test_reference_name_that_fits_two_frames_is_refused(small_frames, tmp_path):
    frames_dir = small_frames / "in"
    first = sorted(frames_dir.glob("*.fits"))[0]
    other = tmp_path / "other"
    other.mkdir()
    (other / first.name).write_bytes(first.read_bytes())
    result = runner.invoke(app, ["normalize", str(frames_dir), str(other), "-r", first.stem, "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"{first.stem}: names 2 of the frames given" in result.output
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["normalize", "x.fits", "--backend", "foo"],
        ["normalize", "x.fits", "--output-format", "tiff"],
        ["normalize", "x.fits", "--photometry", "foo"],
        ["stack", "x", "-o", "m.fits", "--backend", "foo"],
        ["stack", "x", "-o", "m.fits", "--rejection", "foo"],
        ["info", "--backend", "foo"],
    ],
)
def test_a_value_not_among_an_options_choices_is_a_usage_error(args, tmp_path, monkeypatch):
    """--backend and --output-format exited 1 for a value not among their choices, where every
    other option with choices exits 2 (README: a usage error); now all exit 2, nothing done."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Invalid value for" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_backend_and_format_names_are_read_in_any_case(small_frames, tmp_path):
    frames = sorted(str(p) for p in (small_frames / "in").glob("*.fits"))[:2]
    args = ["normalize", *frames, "-r", frames[0], "-o", str(tmp_path / "o"), "--no-report", "-q"]
    result = runner.invoke(app, [*args, "--backend", "NumPy", "--output-format", "XISF"])
    assert result.exit_code == 0, result.output
    assert sorted(p.suffix for p in (tmp_path / "o").rglob("*_nsg.*")) == [".xisf", ".xisf"]


@pytest.mark.parametrize("columns", ["80", "100", "200", "320"])
def test_inspect_shows_every_name_whole_at_any_width(small_frames, tmp_path, columns):
    """At 100 columns every cell of nsg inspect's table was cut short ('000...', 'ca...'), at 150
    the file names; now a narrow terminal gets a paragraph per frame and a wide one a table
    whose cells fold: every name and note whole, nothing cut."""
    long_names = []
    for k, path in enumerate(sorted((small_frames / "in").glob("*.fits"))[:3]):
        long_names.append(tmp_path / f"{k:03d}_Light_NGC_7023_10.0s_IRCUT_20240730-2244{k:02d}.fits")
        shutil.copy(path, long_names[-1])
    result = runner.invoke(app, ["inspect", *map(str, long_names)], env={"COLUMNS": columns, "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "candidate" in result.output
    flat = "".join(c for c in result.output if c not in "│ \n")
    assert all(p.name in flat for p in long_names), result.output
    assert max(len(line) for line in result.output.splitlines()) <= int(columns)
    assert ("┃ file" in result.output) == (columns == "320")  # a table where every cell fits whole
