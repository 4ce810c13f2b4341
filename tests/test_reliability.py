"""Bad input, crashes and faults: every problem is one frame's clear error, nothing is lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import mutation_fuzz, read_mutated

from nsg_gpu.atomic import atomic_write
from nsg_gpu.errors import ReferenceFrameError
from nsg_gpu.params import Parameters
from nsg_gpu.run import normalize
from nsg_gpu.synthetic import write_synthetic_set

SMALL = dict(width=700, height=500, n_stars=900)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Path]:
    """Five small synthetic frames."""
    return write_synthetic_set(tmp_path_factory.mktemp("rel"), n_frames=5, seed=21, **SMALL)


def _keep_centre(data: np.ndarray) -> np.ndarray:
    """Only a central box of 4 % of the pixels keeps data."""
    out = np.zeros_like(data)
    h, w = data.shape[-2:]
    box = (slice(int(0.4 * h), int(0.6 * h)), slice(int(0.4 * w), int(0.6 * w)))
    out[box] = data[box]
    return out


def _one_pixel_at_float32s_largest(data: np.ndarray) -> np.ndarray:
    """A pixel at float32's largest value, which the frame's scale (above 1) carries beyond."""
    out = data.copy()
    out[..., 50, 50] = np.finfo(np.float32).max
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid_output(path: Path) -> bool:
    with fits.open(path) as hdul:
        hdul.verify("exception")
        return "NSGREF" in hdul[0].header and hdul[0].data is not None and np.all(np.isfinite(hdul[0].data))


def test_inputs_are_never_modified(frames, tmp_path):
    before = {p: _digest(p) for p in frames}
    normalize(frames, reference=frames[0], output_dir=tmp_path / "o")
    assert {p: _digest(p) for p in frames} == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda d: (d * 65535).astype(np.uint16), "units unlike the reference", id="adu-vs-normalized"),
        pytest.param(lambda d: np.zeros_like(d), "every pixel is 0", id="all-zero"),
        pytest.param(lambda d: np.full_like(d, np.nan), "every pixel is 0 or not finite", id="all-nan"),
        pytest.param(lambda d: np.full_like(d, 0.1), "does not look registered", id="constant"),
        pytest.param(lambda d: np.roll(d, 12, axis=-1), "does not look registered", id="not-registered"),
        pytest.param(_keep_centre, "of the pixels hold data", id="mostly-zero"),
        pytest.param(_one_pixel_at_float32s_largest, "beyond float32's range once scaled", id="float32-largest"),
    ],
)
def test_bad_frames_fail_alone_with_a_clear_message(frames, tmp_path, make, message):
    data = fits.getdata(frames[1])
    bad = tmp_path / "bad.fits"
    fits.PrimaryHDU(make(data), header=fits.getheader(frames[1])).writeto(bad)
    run = normalize([frames[0], bad, frames[2]], reference=frames[0], output_dir=tmp_path / "o")
    statuses = {Path(f.path).name: f.status for f in run.frames}
    assert statuses == {frames[0].name: "reference", "bad.fits": "failed", frames[2].name: "ok"}
    failed = next(f for f in run.frames if f.status == "failed")
    assert "bad.fits" in failed.error and message in failed.error
    assert failed.date_obs == fits.getheader(frames[1])["DATE-OBS"]  # the row keeps the header facts
    assert not (tmp_path / "o" / "bad_nsg.fits").exists()


def test_a_colour_frame_with_a_channel_empty_is_named_for_it(tmp_path):
    """A colour target whose green channel is all 0, or whose blue is all NaN: it fails
    alone, named, and the message names the channel (it said every pixel was empty)."""
    paths = write_synthetic_set(tmp_path / "in", n_frames=2, seed=22, colour=True, width=300, height=240, n_stars=250)
    data, header = fits.getdata(paths[1]), fits.getheader(paths[1])
    for channel, fill in ((1, 0.0), (2, np.nan)):
        bad = tmp_path / f"bad{channel}.fits"
        broken = data.copy()
        broken[channel] = fill
        fits.PrimaryHDU(broken, header).writeto(bad)
    run = normalize(
        [paths[0], tmp_path / "bad1.fits", tmp_path / "bad2.fits", paths[1]],
        reference=paths[0],
        output_dir=tmp_path / "o",
        params=Parameters(min_weight=0, min_transmission=0),
    )
    statuses = [f.status for f in run.frames]
    assert statuses == ["reference", "failed", "failed", "ok"], statuses
    assert "bad1.fits: channel 1 holds no data" in run.frames[1].error
    assert "bad2.fits: channel 2 holds no data" in run.frames[2].error


def test_nan_pixels_are_no_data_not_an_error(frames, tmp_path):
    data = fits.getdata(frames[1]).astype(np.float32)
    data[100:140, 200:260] = np.nan
    nan_frame = tmp_path / "nan.fits"
    fits.PrimaryHDU(data, header=fits.getheader(frames[1])).writeto(nan_frame)
    run = normalize([frames[0], nan_frame], reference=frames[0], output_dir=tmp_path / "o")
    assert run.ok
    out = fits.getdata(run.frames[1].output)
    assert np.all(out[100:140, 200:260] == 0)


def _fault_for(name: str, function):
    """``function``, raising ZeroDivisionError (as a defect would) where called for ``name``."""

    def faulty(*args, **kwargs):
        if any(name in str(getattr(a, "path", a)) for a in args):
            if function.__name__ == "write_frame":  # a part of the file first
                atomic_write(args[0], lambda handle, _: handle.write(b"SIMPLE  =  T" * 500) and 1 / 0)
            raise ZeroDivisionError("a defect")
        return function(*args, **kwargs)

    return faulty


@pytest.mark.parametrize("executor", ["serial", "threads", "processes"])
@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_an_unforeseen_exception_fails_its_frame_alone(frames, tmp_path, monkeypatch, stage, executor):
    """An exception nsg-gpu does not raise on purpose (here a ZeroDivisionError put into one
    frame's read, computation or write) stopped the whole run, frames after it never done and
    no results.csv; now that frame fails, named with the exception and the line that raised
    it, no part of its output is left, and the other frames are the same bytes as without it."""
    from nsg_gpu import jobs
    from nsg_gpu.executors import InProcessExecutor, ProcessExecutor

    bad = tmp_path / "bad.fits"
    shutil.copy(frames[2], bad)
    target = {"read": "read_frame", "compute": "normalize_frame", "write": "write_frame"}[stage]
    monkeypatch.setattr(jobs, target, _fault_for("bad", getattr(jobs, target)))
    monkeypatch.delenv("NSG_DEBUG", raising=False)
    make = {
        "serial": lambda: InProcessExecutor(threads=False),
        "threads": lambda: InProcessExecutor(compute_threads=2),
        "processes": lambda: ProcessExecutor(processes=2, pending=1),
    }[executor]
    inputs = [frames[0], frames[1], bad, frames[3]]
    run = normalize(inputs, reference=frames[0], output_dir=tmp_path / "o", executor=make())
    assert [f.status for f in run.frames] == ["reference", "ok", "failed", "ok"]
    error = run.frames[2].error
    assert error.startswith(f"{bad}: unexpected ZeroDivisionError at test_reliability.py:"), error
    assert ("in <lambda>: division by zero" if stage == "write" else "in faulty: a defect") in error
    assert "NSG_DEBUG=1" in error
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if "bad" in p.name) == []
    assert (tmp_path / "o" / "results.csv").exists()
    clean = normalize([frames[0], frames[1], frames[3]], reference=frames[0], output_dir=tmp_path / "clean")
    for faulted, alone in zip((run.frames[1], run.frames[3]), clean.frames[1:], strict=True):
        assert Path(faulted.output).name == Path(alone.output).name
        assert _digest(Path(faulted.output)) == _digest(Path(alone.output))


def test_nsg_debug_raises_the_unforeseen_exception(frames, tmp_path, monkeypatch):
    from nsg_gpu import jobs

    monkeypatch.setattr(jobs, "normalize_frame", _fault_for(frames[1].name, jobs.normalize_frame))
    assert frames[1].name not in frames[0].name
    monkeypatch.setenv("NSG_DEBUG", "1")
    with pytest.raises(ZeroDivisionError, match="a defect"):
        normalize(frames[:2], reference=frames[0], output_dir=tmp_path / "o")


def test_a_directory_without_frames_fails_alone_named(frames, tmp_path):
    (tmp_path / "empty").mkdir()
    run = normalize([frames[0], tmp_path / "empty", frames[1]], reference=frames[0], output_dir=tmp_path / "o")
    assert [f.status for f in run.frames] == ["reference", "failed", "ok"]
    assert run.frames[1].error == f"{tmp_path / 'empty'}: is a directory holding no FITS or XISF frame"


def test_auto_reference_among_unreadable_frames_names_each(tmp_path):
    (tmp_path / "text.fits").write_text("not a FITS file " * 200)
    fits.PrimaryHDU(np.zeros((50, 60), np.float32)).writeto(tmp_path / "zero.fits")
    with pytest.raises(ReferenceFrameError, match="no frame could be measured") as caught:
        normalize([tmp_path / "text.fits", tmp_path / "zero.fits"], output_dir=tmp_path / "o")
    assert "text.fits: is not a FITS file" in str(caught.value) and "zero.fits" in str(caught.value)


def test_a_truncated_frame_is_one_line_without_astropys_warnings(frames, tmp_path):
    """Run as a user runs it (no test's warning filters): the truncated frame's line names it,
    and nothing of astropy's own reaches the terminal."""
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(frames[1].read_bytes()[:300_000])
    args = [str(frames[0]), str(truncated), "-r", str(frames[0]), "-o", str(tmp_path / "o"), "--no-report"]
    done = subprocess.run(
        [sys.executable, "-m", "nsg_gpu", "normalize", *args, "--json"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 3, done.stderr
    assert "WARNING" not in done.stderr and "Warning" not in done.stderr, done.stderr
    failed = [json.loads(line) for line in done.stdout.splitlines() if '"failed"' in line]
    assert failed and "truncated.fits" in json.dumps(failed)


def test_same_path_twice_is_processed_once(frames, tmp_path):
    run = normalize([frames[0], frames[1], frames[1], frames[0]], reference=frames[0], output_dir=tmp_path / "o")
    assert [f.status for f in run.frames] == ["reference", "failed", "failed", "ok"]
    assert "given twice" in run.frames[1].error and "given twice" in run.frames[2].error


def test_a_pixel_far_below_the_sky_is_no_data_not_the_pedestal(frames, tmp_path):
    """One pixel at -1 on a sky of about 0.1 (a hot pixel of the dark the light did not
    have): as a target and as the reference, the same transmissions and weights as without
    it, and that pixel no data in the output (its magnitude was the pedestal, and the frame
    lost its star pairs as a target and every target its samples as the reference)."""
    data, header = fits.getdata(frames[2]), fits.getheader(frames[2])
    cold = tmp_path / "cold.fits"
    data = data.copy()
    data[..., 60, 70] = -1.0
    fits.PrimaryHDU(data, header).writeto(cold)
    params = Parameters(min_weight=0, min_transmission=0)
    for reference in (frames[0], None):
        plain = normalize(frames[:3], reference=reference or frames[2], output_dir=tmp_path / "p", params=params)
        marked = normalize(
            [*frames[:2], cold], reference=reference or cold, output_dir=tmp_path / "m", params=params, overwrite=True
        )
        assert [f.status for f in marked.frames] == [f.status for f in plain.frames]
        for a, b in zip(plain.frames, marked.frames, strict=True):
            assert b.transmission == pytest.approx(a.transmission, rel=1e-4)
            assert b.weight == pytest.approx(a.weight, rel=1e-3)  # the hole moves the noise a little
        if reference is not None:
            assert fits.getdata(tmp_path / "m" / "cold_nsg.fits")[..., 60, 70] == 0
        shutil.rmtree(tmp_path / "p")


def test_a_frame_given_twice_counts_once_in_the_automatic_choice(frames, tmp_path):
    """The automatic choice is the same with a frame given twice as without: the copy does
    not weigh twice in the coverage the frames are compared on (of two frames, the one given
    twice made the majority's footprint, and was chosen)."""
    pair = [frames[1], frames[2]]  # frame 0 covers all: the others have borders
    alone = normalize(pair, reference="auto", output_dir=tmp_path / "a")
    other = next(p for p in pair if str(p) != alone.reference)
    twice = normalize([*pair, other], reference="auto", output_dir=tmp_path / "t")
    assert twice.reference == alone.reference


def test_file_names_beyond_ascii_are_escaped_in_the_cards(frames, tmp_path):
    """A reference and a target named with letters beyond ASCII (which a FITS card cannot
    hold; the run stopped on writing them): normalized, their names escaped in NSGREF and in
    the master's history, the outputs kept by a rerun, and stacked."""
    from nsg_gpu.stacking import stack

    folder = tmp_path / "in"
    folder.mkdir()
    reference, target = folder / "réf.fits", folder / "cible_é.fits"
    reference.write_bytes(frames[0].read_bytes())
    target.write_bytes(frames[1].read_bytes())
    params = Parameters(min_weight=0, min_transmission=0)
    run = normalize([reference, target], reference=reference, output_dir=tmp_path / "o", params=params)
    assert [f.status for f in run.frames] == ["reference", "ok"]
    outputs = sorted((tmp_path / "o").glob("*_nsg.fits"))
    assert all(fits.getheader(p)["NSGREF"] == "r\\xe9f.fits" for p in outputs) and len(outputs) == 2
    again = normalize([reference, target], reference=reference, output_dir=tmp_path / "o", params=params)
    assert all(f.resumed for f in again.frames)
    stack(tmp_path / "o", tmp_path / "master.fits", backend="numpy", report=False)
    assert any("cible_\\xe9_nsg.fits" in line for line in fits.getheader(tmp_path / "master.fits")["HISTORY"])


def test_frames_of_one_name_in_two_folders_do_not_share_an_output(frames, tmp_path):
    """The second frame whose output name is taken fails with both names; the first's output,
    results and weights.csv are its own."""
    other = tmp_path / "other" / frames[1].name
    other.parent.mkdir()
    other.write_bytes(frames[2].read_bytes())
    run = normalize([frames[0], frames[1], other], reference=frames[0], output_dir=tmp_path / "o")
    assert [f.status for f in run.frames] == ["reference", "failed", "ok"]
    assert str(other) in run.frames[1].error and str(frames[1]) in run.frames[1].error
    ok = run.frames[2]
    assert Path(ok.path) == frames[1] and fits.getheader(ok.output)["NSGS0"] == pytest.approx(
        ok.transmission[0], rel=1e-4
    )
    listed = (tmp_path / "o" / "weights.csv").read_text().splitlines()
    outputs = [f.output for f in run.frames if f.output]
    assert len(set(listed)) == len(listed) and len(set(outputs)) == len(outputs) == 2


def test_a_reference_that_fails_leaves_the_earlier_outputs(frames, tmp_path):
    """--overwrite with a reference that cannot be used: the error, and the earlier run's
    outputs still there (they are cleared only once the reference is prepared)."""
    first = normalize(frames[:3], reference=frames[0], output_dir=tmp_path / "o")
    before = {f.output: _digest(Path(f.output)) for f in first.frames}
    blank = tmp_path / frames[0].name
    fits.PrimaryHDU(np.zeros_like(fits.getdata(frames[0])), fits.getheader(frames[0])).writeto(blank)
    with pytest.raises(ReferenceFrameError, match="every pixel is 0"):
        normalize([blank, *frames[1:3]], reference=blank, output_dir=tmp_path / "o", overwrite=True)
    assert {out: _digest(Path(out)) for out in before} == before


def test_blocked_output_paths_are_one_clear_error(frames, tmp_path):
    """A file above the output directory, a file named rejected, a folder named as an output:
    one line each, nothing written."""
    from typer.testing import CliRunner

    from nsg_gpu.cli import app

    (tmp_path / "afile").touch()
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "rejected").touch()
    (tmp_path / "o3" / frames[1].name.replace(".fits", "_nsg.fits")).mkdir(parents=True)
    cases = {
        tmp_path / "afile" / "sub": "is a file, not a folder",
        tmp_path / "o2": "is a file, where rejected frames' outputs go",
        tmp_path / "o3": "a folder has the name of this frame's output",
    }
    for output, message in cases.items():
        args = ["normalize", *map(str, frames[:2]), "-r", str(frames[0]), "-o", str(output), "--no-report"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == [frames[1].name.replace(".fits", "_nsg.fits")]


@mutation_fuzz
def test_reader_never_fails_unexpectedly(tmp_path_factory, position, length, fill, truncate):
    """Mutated or truncated FITS files are read or rejected with FrameError, nothing else."""
    source = tmp_path_factory.getbasetemp() / "fuzz_source.fits"
    if not source.exists():
        header = fits.Header({"EXPTIME": 10.0, "FOCALLEN": 500.0, "NOISE00": 0.001})
        fits.PrimaryHDU(np.random.default_rng(0).random((40, 50)).astype(np.float32), header=header).writeto(source)
    read_mutated(
        source, tmp_path_factory.mktemp("fuzz"), position=position, length=length, fill=fill, truncate=truncate
    )


@pytest.mark.slow
def test_killed_run_then_rerun_leaves_only_valid_outputs(tmp_path):
    """SIGKILL while outputs are being written; a rerun completes; every output is valid FITS."""
    inputs = write_synthetic_set(tmp_path / "in", n_frames=7, seed=22, **SMALL)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "nsg_gpu",
        "normalize",
        *map(str, inputs),
        "-r",
        str(inputs[0]),
        "-o",
        str(out),
        "-q",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    killed = between = 0
    # Killed once the run has written 1, 2 and 4 frames (each rerun redoes what is missing),
    # then a few milliseconds later, so that the kills land among the writes whatever the
    # machine's speed, not before the first output.
    for written, pause in ((1, 0.0), (2, 0.05), (4, 0.2)):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if len(list(out.rglob("*_nsg.fits"))) >= written:
                break
            time.sleep(0.01)
        time.sleep(pause)
        process.send_signal(signal.SIGKILL)
        if process.wait() == -signal.SIGKILL:
            killed += 1
            between += 0 < len(list(out.rglob("*_nsg.fits"))) < len(inputs)
        for path in out.rglob("*_nsg.fits"):  # rejected frames' outputs are in out/rejected
            assert _valid_output(path), path
        if (out / "results.json").exists():
            json.loads((out / "results.json").read_text())
    assert killed >= 2, "the runs finished before they could be killed; the test needs more frames"
    # On a loaded machine the last run may finish within its pause: what counts is that some
    # kill landed with part of the outputs written.
    assert between >= 1, "the kills landed before or after the writes"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    outputs = sorted(out.rglob("*_nsg.fits"))
    assert len(outputs) == len(inputs) and all(_valid_output(p) for p in outputs)
    assert not list(out.glob(".*.tmp"))
    assert len(json.loads((out / "results.json").read_text())["frames"]) == len(inputs)


def _scale_error(run, field, k=1):
    truth = field.frames[k].scale(field.reference)[0]
    return run.frames[k].scale[0] / truth - 1


@pytest.mark.parametrize(
    ("transmissions", "case"),
    [
        pytest.param([0.95, 0.1], "a frame ten times fainter than the reference", id="transmission-0.1"),
        pytest.param(
            [4.0, 1.0], "a reference four times brighter, its bright stars saturated", id="saturated-reference"
        ),
    ],
)
def test_extreme_transmissions(tmp_path, transmissions, case):
    from nsg_gpu.synthetic import SyntheticField

    field = SyntheticField(n_frames=2, seed=23, transmissions=transmissions, fwhms=[3.0, 3.0], **SMALL)
    paths = write_synthetic_set(tmp_path / "in", field.spec)
    run = normalize(paths, reference=paths[0], output_dir=tmp_path / "o")
    assert run.ok, (case, run.frames[1].error)
    assert abs(_scale_error(run, field)) < 0.035, case


def test_a_single_huge_star_does_not_spoil_the_frame(tmp_path):
    from nsg_gpu.synthetic import SyntheticField

    field = SyntheticField(n_frames=2, seed=24, fwhms=[3.0, 3.4], **SMALL)
    field.star_x = np.append(field.star_x, 350.0)
    field.star_y = np.append(field.star_y, 250.0)
    field.star_flux = np.vstack([field.star_flux, [[3000.0]]])
    paths = write_synthetic_set(tmp_path / "in", field.spec)
    for k, path in enumerate(paths):  # re-render with the huge star
        fits.PrimaryHDU(field.render(k)[0], header=field.header(k)).writeto(path, overwrite=True)
    assert fits.getdata(paths[0])[250, 350] == 1.0  # saturated core
    run = normalize(paths, reference=paths[0], output_dir=tmp_path / "o")
    assert run.ok, run.frames[1].error
    assert abs(_scale_error(run, field)) < 0.035


def test_unwritable_output_directory_is_one_clear_error(frames):
    """A directory that cannot be created (sysfs refuses it, even to root) ends the run cleanly."""
    from typer.testing import CliRunner

    from nsg_gpu.cli import app

    target = Path("/sys/nsg-gpu-test-output")
    if not Path("/sys").is_dir():
        pytest.skip("no /sys to stand in for a read-only file system")
    result = CliRunner().invoke(app, ["normalize", *map(str, frames[:2]), "-r", str(frames[0]), "-o", str(target)])
    assert result.exit_code == 1
    assert "cannot be written" in result.output and "Traceback" not in result.output
    assert not target.exists()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the resident set size")
def test_memory_stays_flat_over_many_frames(tmp_path):
    """300 small frames: the resident set grows by at most 12 MB (and 10 %) from frame 50 to 300.

    A leak of 100 kB per frame (less than one 200 x 150 frame's pixels, 120 kB) grows the
    resident set by 25 MB over the 250 frames between the two samples, twice what is allowed
    whatever the process's size (this test alone: about 210 MB, growing by under 1 MB). The frames are
    as small as keeps every stage at work (10 star pairs, about 30 samples, no borders),
    since it is their number that makes a leak show.
    """
    paths = write_synthetic_set(tmp_path / "in", n_frames=2, seed=25, width=200, height=150, n_stars=120, borders=False)
    data = fits.getdata(paths[1])
    header = fits.getheader(paths[1])
    many = [paths[0]]
    for i in range(300):
        p = tmp_path / "in" / f"copy_{i:03d}.fits"
        fits.PrimaryHDU(data, header=header).writeto(p)
        many.append(p)
    samples = {}

    def progress(result, done, total):
        if done in (51, 301):
            samples[done] = _rss_mb()

    run = normalize(many, reference=paths[0], output_dir=tmp_path / "o", progress=progress)
    assert run.ok, [f.error for f in run.failed][:3]
    assert samples[301] - samples[51] <= min(0.10 * samples[51], 12.0), samples


def test_too_few_background_samples_is_named(frames, tmp_path):
    """A frame covering only a small island: its stars measure, but no sample fits the island."""
    data = fits.getdata(frames[1])
    island = np.zeros_like(data)
    island[120:330, 180:520] = data[120:330, 180:520]
    path = tmp_path / "island.fits"
    fits.PrimaryHDU(island, header=fits.getheader(frames[1])).writeto(path)
    from nsg_gpu.params import Parameters

    run = normalize(
        [frames[0], path], reference=frames[0], output_dir=tmp_path / "o", params=Parameters(sample_size=240)
    )
    assert run.frames[1].status == "failed"
    assert "background samples are usable" in run.frames[1].error


def test_full_output_directory_leaves_no_partial_file(frames, tmp_path):
    """On a 2 MB file system the reference's output fits, the next does not: it is absent."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run = normalize(frames[:2], reference=frames[0], output_dir=mount_point)
        assert [f.status for f in run.frames] == ["reference", "failed"]
        assert "cannot be written" in run.frames[1].error and "No space left" in run.frames[1].error
        assert _valid_output(mount_point / f"{frames[0].stem}_nsg.fits")
        assert not (mount_point / f"{frames[1].stem}_nsg.fits").exists()
        assert not list(mount_point.glob(".*.tmp"))
        rows = json.loads((mount_point / "results.json").read_text())["frames"]
        assert rows[1]["status"] == "failed"
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_too_few_star_pairs_is_an_error_never_scale_one(frames, tmp_path):
    from nsg_gpu.params import Parameters

    run = normalize(frames[:2], reference=frames[0], output_dir=tmp_path / "o", params=Parameters(min_star_pairs=200))
    assert run.frames[1].status == "failed" and run.frames[1].scale == []
    assert "at least 200 are needed for a photometric scale" in run.frames[1].error


def test_a_sky_about_zero_is_data_not_a_hole(tmp_path):
    """Frames whose sky was subtracted (each less its sky's median: about half their pixels
    negative) are normalized as the same frames with their sky: every frame, each scale within
    3 stated errors of the truth and of the run on the frames with their sky, the weights
    within 2 % of that run's, the outputs that run's less the reference's sky, their negative
    sky kept (not clipped to 0, which marks no data), the reference's output its input, and
    ``--reference auto`` reading the frames' full coverage. Pixels at or below 0 were read as
    no data: 26-46 star pairs instead of 122-137, scales off by -7.4 to +3.9 %, weights 1.1-1.4
    instead of 0.3-0.8 (the noise read on the positive half of the sky), and half of each
    output's sky clipped to 0."""
    from nsg_gpu.select import score_frame
    from nsg_gpu.synthetic import SyntheticField

    field = SyntheticField(n_frames=5, seed=25, **SMALL)
    paths = write_synthetic_set(tmp_path / "sky", field.spec)
    (tmp_path / "about0").mkdir()
    subtracted, skies = [], []
    for path in paths:
        with fits.open(path) as hdul:
            data, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
        skies.append(np.float32(np.median(data[data != 0])))
        subtracted.append(tmp_path / "about0" / path.name)
        fits.writeto(subtracted[-1], np.where(data != 0, data - skies[-1], 0).astype(np.float32), header)
        written = fits.getdata(subtracted[-1])
        assert 0.4 < np.mean(written[written != 0] < 0) < 0.6
    with_sky = normalize(paths, reference=paths[0], output_dir=tmp_path / "o_sky")
    about0 = normalize(subtracted, reference=subtracted[0], output_dir=tmp_path / "o_about0")
    assert with_sky.ok and about0.ok, [f.error for f in about0.failed]
    for k in range(1, len(paths)):
        ours, theirs = about0.frames[k], with_sky.frames[k]
        truth = field.frames[k].scale(field.reference)[0]
        stated = ours.transmission_error[0] / ours.transmission[0]
        assert abs(ours.scale[0] / truth - 1) <= 3 * stated, (k, ours.scale[0], truth, stated)
        assert abs(ours.scale[0] / theirs.scale[0] - 1) <= 3 * stated, (k, ours.scale[0], theirs.scale[0])
        assert abs(ours.weight / theirs.weight - 1) < 0.02, (k, ours.weight, theirs.weight)
        out = fits.getdata(ours.output).astype(np.float64)
        expected = fits.getdata(theirs.output).astype(np.float64)
        target = fits.getdata(subtracted[k])
        held = target != 0
        assert np.array_equal(out == 0, ~held)
        assert np.mean(out[held] < 0) > 0.3
        sigma = with_sky.frames[k].noise[0]
        difference = out[held] + skies[0] - expected[held]
        assert abs(np.median(difference)) < 0.05 * sigma and np.percentile(np.abs(difference), 99) < 0.2 * sigma
    reference_out = fits.getdata(about0.frames[0].output)
    assert np.array_equal(reference_out, fits.getdata(subtracted[0]))
    # Its NSGHIGH the maximum of its data as read, not raised by the pedestal it was measured with.
    assert fits.getheader(about0.frames[0].output)["NSGHIGH"] == pytest.approx(float(reference_out.max()), rel=1e-6)
    assert score_frame(subtracted[0]).coverage > 0.95


def test_a_border_filled_with_one_value_is_no_data(frames, tmp_path):
    """A registration border filled with 0.05 instead of 0, or the frame lowered by its sky
    level after registration (its border then negative): the same weight and transmission as
    with a border of zeros, and zeros there in the output. Read as a sky without noise, such a
    border gave weights a thousand times too high."""
    header = fits.getheader(frames[1])
    data = fits.getdata(frames[1]).astype(np.float32)
    border = np.zeros(data.shape, bool)
    border[..., :25, :] = True
    border[..., :, -40:] = True
    zeroed = np.where(border, np.float32(0), data)
    variants = {
        "zeroed": zeroed,
        "filled": np.where(border, np.float32(0.05), data),
        "lowered": zeroed - np.float32(np.median(data[~border])),
    }
    for name, values in variants.items():
        fits.PrimaryHDU(values, header).writeto(tmp_path / f"{name}.fits")
    paths = [frames[0], *(tmp_path / f"{name}.fits" for name in variants)]
    params = Parameters(min_weight=0, min_transmission=0)
    run = normalize(paths, reference=frames[0], output_dir=tmp_path / "o", params=params)
    rows = {Path(f.path).stem: f for f in run.frames[1:]}
    assert all(f.status == "ok" for f in rows.values()), [f.error for f in rows.values()]
    for name in ("filled", "lowered"):
        assert rows[name].weight == pytest.approx(rows["zeroed"].weight, rel=0.03), name
        assert rows[name].transmission[0] == pytest.approx(rows["zeroed"].transmission[0], rel=0.01), name
        assert not fits.getdata(rows[name].output)[border].any(), name


def test_a_sky_that_repeats_its_value_is_not_a_filled_border():
    """A sky quantized finer than its noise (8-bit data: noise 0.3 unit, one value on most
    pixels), or clipped at a floor, runs along the edges too: it stays data. A fill of 0.05
    on the same field's left 50 columns is found, and only it."""
    from nsg_gpu.reference import _filled_borders

    rng = np.random.default_rng(1)
    h, w = 400, 600
    quantized = np.round(20 + rng.normal(0, 0.3, (h, w))).astype(np.float32)
    floor = np.maximum(0.1 + rng.normal(0, 0.01, (h, w)), 0.1).astype(np.float32)
    assert _filled_borders(quantized[None]) is None and _filled_borders(floor[None]) is None
    filled = (0.1 + rng.normal(0, 0.003, (h, w))).astype(np.float32)
    filled[:, :50] = np.float32(0.05)
    expected = np.zeros((1, h, w), bool)
    expected[0, :, :50] = True
    np.testing.assert_array_equal(_filled_borders(filled[None]), expected)
