"""A whole run: the same inputs give the same bytes however the run was executed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsg_gpu.executors import InProcessExecutor, ProcessExecutor
from nsg_gpu.params import Parameters
from nsg_gpu.run import normalize
from nsg_gpu.synthetic import write_synthetic_set

#: Small frames, but with every stage at work: PSF fits, a spline of a few hundred samples.
SPEC = dict(width=900, height=640, n_frames=4, seed=21, n_stars=900)
#: A relative parameter set that keeps every frame (rejection moves files, not bytes).
KEEP_ALL = Parameters(min_weight=0, min_transmission=0)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Path]:
    """Four synthetic mono frames, the first the reference."""
    return write_synthetic_set(tmp_path_factory.mktemp("frames"), **SPEC)


def _outputs(directory: Path) -> dict[str, bytes]:
    """Every output frame's bytes, by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.rglob("*_nsg.fits"))}


def _results(directory: Path) -> list[dict]:
    """results.csv without the column that measures time, outputs named without their directory."""
    with open(directory / "results.csv", newline="") as handle:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]
    for row in rows:
        row["output"] = Path(row["output"]).name
    return rows


def test_executors_write_the_same_bytes(frames, tmp_path):
    runs = {
        "serial": InProcessExecutor(threads=False),
        "one-thread": InProcessExecutor(compute_threads=1),
        "two-threads": InProcessExecutor(compute_threads=2),
        "two-processes": ProcessExecutor(processes=2, pending=1),
    }
    for name, executor in runs.items():
        normalize(frames, reference=frames[0], output_dir=tmp_path / name, params=KEEP_ALL, executor=executor)
    expected = _outputs(tmp_path / "serial")
    assert len(expected) == SPEC["n_frames"]
    for name in runs:
        assert _outputs(tmp_path / name) == expected, name
        assert _results(tmp_path / name) == _results(tmp_path / "serial"), name


def test_weights_csv_holds_each_outputs_nweight_to_the_last_bit(frames, tmp_path):
    """weights.csv said NWEIGHT to 6 digits; a stacker reading it now weighs as the header."""
    from astropy.io import fits

    normalize(frames, reference=frames[0], output_dir=tmp_path / "o", params=KEEP_ALL)
    with open(tmp_path / "o" / "weights.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == SPEC["n_frames"]
    for row in rows:
        assert float(row["weight"]) == fits.getheader(tmp_path / "o" / row["file"])["NWEIGHT"], row


@pytest.mark.slow
def test_blas_and_openmp_threads_do_not_change_the_bytes(frames, tmp_path):
    """The spline's LU factorization rounds differently with more BLAS threads; the run pins
    its dense linear algebra to one thread, so the environment cannot change the result. The
    two runs go side by side: one's start-up overlaps the other's work."""
    runs = []
    for threads in ("1", "2"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        command = [sys.executable, "-m", "nsg_gpu", "normalize", *map(str, frames), "-r", str(frames[0])]
        command += ["-o", str(tmp_path / threads), "--min-weight", "0", "--min-transmission", "0", "--no-report", "-q"]
        runs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for run in runs:
            _, stderr = run.communicate(timeout=600)
            assert run.returncode == 0, stderr
    finally:
        for run in runs:
            run.kill()  # only one still running, after a failure
            run.communicate()
    assert _outputs(tmp_path / "1") == _outputs(tmp_path / "2") and len(_outputs(tmp_path / "1")) == SPEC["n_frames"]
    assert _results(tmp_path / "1") == _results(tmp_path / "2")


def test_plots_are_drawn_for_every_frame_without_the_report(frames, tmp_path):
    from nsg_gpu.diagnostics import FRAME_PLOTS

    run = normalize(frames, reference=frames[0], output_dir=tmp_path, params=KEEP_ALL, plots=True, report=False)
    assert not run.failed and not (tmp_path / "report.html").exists()
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    for frame in frames[1:]:
        for plot, _ in FRAME_PLOTS:
            assert f"{frame.stem}_{plot}.png" in names, (frame.stem, plot)


def test_the_library_takes_a_backend_by_name(frames, tmp_path):
    """``normalize(..., backend="numpy")`` failed with AttributeError ('str' object has no
    attribute 'is_gpu'); a name is chosen as the command line chooses it, an unknown one said."""
    from nsg_gpu.errors import BackendUnavailableError

    named = normalize(frames[:2], reference=frames[0], output_dir=tmp_path / "named", params=KEEP_ALL, backend="numpy")
    default = normalize(frames[:2], reference=frames[0], output_dir=tmp_path / "default", params=KEEP_ALL)
    assert _outputs(tmp_path / "named") == _outputs(tmp_path / "default") and named.ok and default.ok
    with pytest.raises(BackendUnavailableError, match="tpu"):
        normalize(frames[:2], reference=frames[0], output_dir=tmp_path / "x", backend="tpu")
