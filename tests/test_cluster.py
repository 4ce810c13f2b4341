"""Runs on a real Dask distributed cluster of worker processes, against the in-process run.

The cluster is a ``distributed.LocalCluster`` of two single-threaded worker processes. Worker
deaths are real: a worker plugin (Dask's own hook into a worker's task transitions) sends
SIGKILL to its own process while a frame's task runs, and the nanny starts a fresh worker.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from nsg_gpu.cli import app
from nsg_gpu.jobs import FrameJob
from nsg_gpu.run import normalize, plan_run
from nsg_gpu.synthetic import write_synthetic_set

#: Every test here starts a local Dask cluster: end-to-end and slow.
pytestmark = pytest.mark.slow

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

from nsg_gpu.cluster import DaskExecutor, run_frame_task  # noqa: E402

# The worker plugins below are defined here; workers get them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

runner = CliRunner()
#: Any single wait on the cluster longer than this fails the test rather than hanging it.
TIMEOUT = 120


class KillWorker(distributed.WorkerPlugin):
    """SIGKILL this worker's process ``delay`` s after a frame's task starts executing.

    ``frame`` limits it to the task of one job index (killed on every attempt); otherwise the
    first frame task on any worker is killed, once, as ``flag`` (created exclusively) records.
    """

    def __init__(self, flag: str, *, frame: int | None = None, delay: float = 0.05):
        self.flag, self.frame, self.delay = flag, frame, delay

    def transition(self, key, start, finish, **kwargs):
        key = str(key)
        if finish != "executing" or not key.startswith("nsg-frame-"):
            return
        if self.frame is not None:
            if key.split("-")[2] != str(self.frame):
                return
            with open(self.flag, "a") as log:
                log.write(key + "\n")
        else:
            try:
                os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGKILL)).start()


class RecordExecutions(distributed.WorkerPlugin):
    """Append the key of every frame task that starts executing to ``log``."""

    def __init__(self, log: str):
        self.log = log

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("nsg-frame-"):
            with open(self.log, "a") as log:
                log.write(str(key) + "\n")


@pytest.fixture(autouse=True)
def no_hang():
    """A test still running after 5 minutes ends the test process, printing every thread's stack."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Five 700x500 mono frames and their in-process normalization (the oracle)."""
    root = tmp_path_factory.mktemp("cluster")
    paths = write_synthetic_set(root / "in", width=700, height=500, n_frames=5, n_stars=900, seed=3)
    run = normalize(paths, reference=paths[0], output_dir=root / "in-process")
    assert [f.status for f in run.frames] == ["reference"] + ["ok"] * 4
    return paths, run


@pytest.fixture(scope="module")
def client():
    """A client of a LocalCluster of two worker processes with one thread each.

    One death allowed per task, so that a frame that kills every worker fails fast; one task
    per worker at a time, so that a death only touches the task that caused it. A killed
    worker's nanny starts a new process; the cluster waits TIMEOUT for it to join before it
    closes that nanny for good (Dask's 15 s: a new process that imports NumPy, SciPy and
    astropy on one busy core took longer, and the cluster went on with one worker).
    """
    config = {
        "distributed.scheduler.allowed-failures": 1,
        "distributed.scheduler.worker-saturation": 1.0,
        "distributed.deploy.lost-worker-timeout": f"{TIMEOUT}s",
    }
    with dask.config.set(config):
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            client.wait_for_workers(2, timeout=TIMEOUT)
            yield client


@pytest.fixture
def plugin(client):
    """Register a worker plugin for one test, and remove it after."""
    names = []

    def register(instance):
        name = f"test-plugin-{len(names)}-{os.getpid()}-{time.monotonic_ns()}"
        client.register_plugin(instance, name=name)
        names.append(name)

    yield register
    for name in names:
        client.unregister_worker_plugin(name)
    client.wait_for_workers(2, timeout=TIMEOUT)


def _rows(run) -> list[dict]:
    """Results rows without the timing column, which differs between any two runs."""
    return [{k: v for k, v in frame.row().items() if k != "seconds"} for frame in run.frames]


def _same_outputs(run, oracle) -> None:
    """Every output is pixel-identical to the oracle's, with the same header cards in order."""
    for frame, expected in zip(run.frames, oracle.frames):
        with fits.open(frame.output) as got, fits.open(expected.output) as want:
            np.testing.assert_array_equal(got[0].data, want[0].data, err_msg=frame.output)
            assert got[0].header.tostring() == want[0].header.tostring(), frame.output


def test_workers_option_matches_in_process_run(frames, tmp_path):
    paths, oracle = frames
    out = tmp_path / "out"
    args = ["normalize", *map(str, paths), "-r", str(paths[0]), "-o", str(out), "--workers", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Dask scheduler tcp://" in result.output and "2 workers" in result.output
    assert f"[{len(paths)}/{len(paths)}]" in result.output
    got = json.loads((out / "results.json").read_text())["frames"]
    want = json.loads((Path(oracle.frames[0].output).parent / "results.json").read_text())["frames"]
    oracle_out = Path(oracle.frames[0].output).parent
    assert [Path(row["output"]).relative_to(out) for row in got] == [
        Path(row["output"]).relative_to(oracle_out) for row in want
    ]
    ignored = ("seconds", "output")  # timing, and the other output directory
    assert [{k: v for k, v in row.items() if k not in ignored} for row in got] == [
        {k: v for k, v in row.items() if k not in ignored} for row in want
    ]
    for row, expected in zip(got, oracle.frames):
        with fits.open(row["output"]) as hdul, fits.open(expected.output) as want_hdul:
            np.testing.assert_array_equal(hdul[0].data, want_hdul[0].data, err_msg=row["output"])
            assert hdul[0].header.tostring() == want_hdul[0].header.tostring(), row["output"]


def test_worker_killed_during_run_has_its_frame_redone(frames, client, plugin, tmp_path):
    paths, oracle = frames
    flag = tmp_path / "killed"
    plugin(KillWorker(str(flag)))
    before = set(client.scheduler_info()["workers"])
    run = normalize(
        paths, reference=paths[0], output_dir=tmp_path / "out", executor=DaskExecutor(client, timeout=TIMEOUT)
    )
    assert flag.exists(), "no worker was killed"
    assert set(client.scheduler_info()["workers"]) != before, "the killed worker was not replaced"
    oracle_out = Path(oracle.frames[0].output).parent
    assert _rows(run) == [
        {**row, "output": str(tmp_path / "out" / Path(row["output"]).relative_to(oracle_out))} for row in _rows(oracle)
    ]
    _same_outputs(run, oracle)

    def listing(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    assert listing(tmp_path / "out") == listing(oracle_out)


def test_frame_that_kills_every_worker_fails_alone(frames, client, plugin, tmp_path):
    paths, oracle = frames
    log = tmp_path / "attempts"
    plugin(KillWorker(str(log), frame=2))
    run = normalize(
        paths, reference=paths[0], output_dir=tmp_path / "out", executor=DaskExecutor(client, timeout=TIMEOUT)
    )
    attempts = log.read_text().split()
    assert len(attempts) == 2 and len(set(attempts)) == 1  # the first try and one retry
    statuses = [f.status for f in run.frames]
    assert statuses == ["reference", "ok", "ok", "failed", "ok"]
    failed = run.frames[3]
    assert failed.path == str(paths[3]) and "every Dask worker that processed this frame died" in failed.error
    assert failed.exposure == oracle.frames[3].exposure  # header facts kept, as for any failed frame
    assert not (tmp_path / "out" / f"{paths[3].stem}_nsg.fits").exists()


def test_bad_frame_among_good_ones_is_reported_once(frames, client, plugin, tmp_path):
    paths, oracle = frames
    log = tmp_path / "executions"
    plugin(RecordExecutions(str(log)))
    bad = tmp_path / "truncated.fits"
    bad.write_bytes(paths[2].read_bytes()[:20000])
    inputs = [*map(str, paths[:4]), str(bad), *map(str, paths[4:])]
    out = tmp_path / "out"
    scheduler = client.scheduler.address
    result = runner.invoke(app, ["normalize", *inputs, "-r", str(paths[0]), "-o", str(out), "--scheduler", scheduler])
    assert result.exit_code == 3, result.output
    rows = json.loads((out / "results.json").read_text())["frames"]
    assert [r["file"] for r in rows] == [str(paths[0]), *inputs[1:]]
    assert [r["status"] for r in rows] == ["reference"] + ["ok"] * 3 + ["failed"] + ["ok"]
    assert str(bad) in rows[4]["error"]
    assert result.output.count(f"{bad}:") == 2  # its progress line and its line in the summary
    executions = log.read_text().split()
    assert len(executions) == len(inputs) - 1 == len(set(executions))  # every task ran once
    assert not (out / "truncated_nsg.fits").exists()
    for row in rows[1:4] + rows[5:]:
        want = next(f for f in oracle.frames if f.path == row["file"])
        assert row["transmission_0"] == want.transmission[0] and row["weight"] == want.weight


def test_unexpected_exception_in_a_task_is_the_frames_failed_result(frames, tmp_path):
    paths, _ = frames
    job = FrameJob(paths[1].absolute(), tmp_path / "x_nsg.fits", paths[0].name)
    result = run_frame_task(None, job, "given/name.fits", "given/x_nsg.fits")
    assert result.status == "failed" and result.path == "given/name.fits"
    assert result.error.startswith("given/name.fits: unexpected AttributeError")
    assert result.exposure is not None and not (tmp_path / "x_nsg.fits").exists()


def test_a_reference_that_cannot_be_sent_is_a_cluster_error(frames):
    """The reference is sent again when the workers holding it are lost; where the cluster
    is gone by then the connection's own exception came out as a traceback."""
    from nsg_gpu.cluster import ClusterError

    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        client = distributed.Client(cluster)
        executor = DaskExecutor(client)
        assert executor._scatter(np.arange(3), following=0, total=1).result().tolist() == [0, 1, 2]
    with pytest.raises(ClusterError, match="the reference could not be sent to the Dask workers") as caught:
        executor._scatter(np.arange(3), following=2, total=4)
    assert "2 of 4 frames done; the outputs written are kept" in str(caught.value)
    client.close()


def test_relative_paths_resolve_against_the_clients_directory(frames, client, tmp_path, monkeypatch):
    paths, oracle = frames
    for p in paths[:3]:
        shutil.copy(p, tmp_path / p.name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.fits").write_bytes(paths[1].read_bytes()[:5000])
    names = [p.name for p in paths[:3]] + ["bad.fits"]
    plan = plan_run(names, reference=names[0], output_dir="out")
    run = normalize(names, reference=names[0], output_dir="out", executor=DaskExecutor(client, timeout=TIMEOUT))
    assert [f.path for f in run.frames] == names
    assert [f.output for f in run.frames] == [str(plan.outputs[Path(n)]) for n in names[:3]] + [None]
    assert [f.status for f in run.frames] == ["reference", "ok", "ok", "failed"]
    assert run.frames[3].error.startswith("bad.fits: ")  # named as given, as in an in-process run
    assert (tmp_path / "out" / f"{paths[2].stem}_nsg.fits").is_file()


def test_without_dask_options_dask_is_not_imported(frames, tmp_path):
    paths, _ = frames
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from nsg_gpu.cli import app\n"
        "result = CliRunner().invoke(app, sys.argv[1:])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'dask_cuda')))\n"
    )
    args = ["normalize", *map(str, paths[:2]), "-r", str(paths[0]), "-o", str(tmp_path / "out"), "-q"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "exclude each other", id="two-options"),
        pytest.param(["--workers", "0"], "1 or more", id="no-workers"),
        pytest.param(["--scheduler", "tcp://127.0.0.1:1"], "cannot reach the Dask scheduler", id="unreachable"),
        pytest.param(["--gpus", "foo"], "--gpus foo: give 'all' or a number", id="gpus-not-a-count"),
        pytest.param(["--gpus", "2", "--backend", "numpy"], "--gpus runs the cupy backend", id="gpus-on-numpy"),
        pytest.param(["--scheduler", ""], "--scheduler is empty", id="empty-scheduler"),
        pytest.param(["--scheduler", " ", "--workers", "2"], "--scheduler is empty", id="empty-scheduler-and-workers"),
    ],
)
def test_cluster_option_errors_are_one_line(frames, tmp_path, options, message):
    paths, _ = frames
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = runner.invoke(app, ["normalize", *map(str, paths[:2]), "-o", str(tmp_path / "out"), *options])
    assert result.exit_code == 1
    assert result.output.startswith("nsg: error:") and message in result.output
    assert result.output.count("\n") == 1


def _serve(answer: bytes | None):
    """A TCP server on a free local port that answers every connection with ``answer`` (None:
    never a byte); its address, and a function that stops it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()
    held = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)
            if answer is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()

    return f"tcp://127.0.0.1:{server.getsockname()[1]}", close


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nBad Request", "does not answer as a Dask scheduler"),
        (None, "no answer as a Dask scheduler within 2 s"),
    ],
    ids=["web-server", "silent"],
)
def test_an_address_that_is_no_scheduler_is_a_one_line_error(frames, tmp_path, answer, message):
    """A dashboard's or another server's port for --scheduler: one line within a bounded time
    (Dask's connect timeout and ANSWER_GRACE), not a traceback nor a wait without end. In a
    process of its own: a client that waits on a silent server holds Dask's event loop. The
    grace is cut to 1 s there, so that the bound is 2 s."""
    paths, _ = frames
    address, close = _serve(answer)
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    script = "import nsg_gpu.cluster, nsg_gpu.cli; nsg_gpu.cluster.ANSWER_GRACE = 1; nsg_gpu.cli.main()"
    command = [sys.executable, "-c", script, "normalize", *map(str, paths[:2]), "-o", str(tmp_path / "out")]
    try:
        done = subprocess.run([*command, "--scheduler", address], capture_output=True, text=True, timeout=120, env=env)
    finally:
        close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("nsg: error:") and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and not done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such scheduler file"), ("{}", "not a scheduler file"), ("garbage", "not a scheduler file")],
    ids=["missing", "empty-json", "garbage"],
)
def test_a_scheduler_file_that_is_none_is_a_one_line_error(frames, tmp_path, content, message):
    """In a process of its own, as the servers above: a client that fails on a foreign file
    may leave Dask's event loop to the next test."""
    paths, _ = frames
    file = tmp_path / "scheduler.json"
    if content is not None:
        file.write_text(content)
    command = [sys.executable, "-m", "nsg_gpu", "normalize", *map(str, paths[:2]), "-o", str(tmp_path / "out")]
    done = subprocess.run([*command, "--scheduler", str(file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"nsg: error: {file}: ") and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and not done.stdout


def test_a_scheduler_without_workers_says_what_the_run_waits_for(frames, tmp_path):
    """A live scheduler with no worker: the wait is announced, then fails after its limit."""
    from nsg_gpu.cluster import ClusterError, open_cluster

    heard = []
    with distributed.LocalCluster(n_workers=0, dashboard_address=":0") as empty:
        with pytest.raises(ClusterError, match="no Dask worker joined"):
            with open_cluster(scheduler=empty.scheduler_address, worker_timeout=1, notify=heard.append):
                pass
    assert heard == [f"waiting up to 1 s for a Dask worker to join {empty.scheduler_address}"]


def test_gpus_without_dask_cuda_is_a_one_line_error(frames, tmp_path):
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("dask-cuda is installed here")
    paths, _ = frames
    result = runner.invoke(app, ["normalize", *map(str, paths[:2]), "-o", str(tmp_path / "out"), "--gpus", "all"])
    assert result.exit_code == 1
    assert result.output.startswith("nsg: error: --gpus needs dask-cuda") and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


#: Dask's time for a lost worker to come back in the test below (``lost-worker-timeout``,
#: 15 s by default), and how long the restarted worker takes to start: beyond it, as a new
#: process that imports NumPy, SciPy and astropy on a busy machine can beyond the 15 s.
LOST_WORKER_TIMEOUT = 2
SLOW_START = 6

# Dask imports a worker's preload twice as it starts: the process sleeps at the first.
_SLOW_START_PRELOAD = """
import os, time
marker = {marker!r}
if os.path.exists(marker) and not os.environ.get("NSG_TEST_SLOW_STARTED"):
    os.environ["NSG_TEST_SLOW_STARTED"] = "1"
    time.sleep({seconds})
"""


def test_workers_option_waits_for_a_killed_worker_that_starts_slowly(tmp_path):
    """A worker of ``--workers N`` killed mid-run is restarted by its nanny; a new process
    that takes longer than Dask's time for a lost worker (15 s by default, here set to
    LOST_WORKER_TIMEOUT) to join must still be waited for, not have its nanny closed, or the
    run goes on with one worker fewer (and with none, hangs). A report that a worker the
    cluster does not list is gone is dropped, not raised when the cluster closes."""
    from nsg_gpu.cluster import open_cluster

    marker = tmp_path / "slow"
    preload = tmp_path / "slow_start.py"
    preload.write_text(_SLOW_START_PRELOAD.format(marker=str(marker), seconds=SLOW_START))
    config = {
        "distributed.worker.preload": [str(preload)],
        "distributed.deploy.lost-worker-timeout": f"{LOST_WORKER_TIMEOUT}s",
    }
    with dask.config.set(config):
        with open_cluster(workers=1, worker_timeout=TIMEOUT) as executor:
            client = executor.client
            pid = client.run(os.getpid)
            assert len(pid) == 1
            marker.touch()  # the next process of this worker starts slowly
            with contextlib.suppress(Exception):
                client.run(os._exit, 1)
            # Past Dask's default timeout and the slow start, the worker is back and works.
            client.wait_for_workers(1, timeout=TIMEOUT)
            assert client.submit(os.getpid, pure=False).result(timeout=TIMEOUT) not in pid.values()
            assert len(client.scheduler_info()["workers"]) == 1
            # A worker reported gone that the cluster does not list (dask/distributed#5407,
            # seen after such a restart) is dropped, not raised, and the cluster closes.
            client.cluster._update_worker_status("remove", "tcp://127.0.0.1:9")
            assert client.cluster.scheduler_info["workers"]
        assert client.cluster.status.name == "closed"


def test_workers_option_workers_ignore_ctrl_c(tmp_path):
    """Ctrl-C in a terminal reaches every process of its group: the workers of ``--workers N``
    leave it to the run's process (which closes the cluster) rather than dying with a
    KeyboardInterrupt traceback and being restarted by their nannies; a preload configured for
    Dask's workers still runs."""
    from nsg_gpu.cluster import open_cluster

    preload = tmp_path / "own_preload.py"
    preload.write_text("import os\nos.environ['NSG_TEST_OWN_PRELOAD'] = 'ran'\n")
    with dask.config.set({"distributed.worker.preload": [str(preload)]}):
        with open_cluster(workers=1, worker_timeout=TIMEOUT) as executor:
            client = executor.client
            (pid,) = client.run(os.getpid).values()
            os.kill(pid, signal.SIGINT)
            time.sleep(1.0)
            assert list(client.run(os.getpid).values()) == [pid]
            assert list(client.run(os.getenv, "NSG_TEST_OWN_PRELOAD").values()) == ["ran"]
            closing = "Async instruction for <Task cancelled name=\"execute('x')\"> ended with CancelledError"
            assert list(client.run(_logged, closing).values()) == [False]  # the interrupted run's closing
            assert list(client.run(_logged, "Unhandled exception in async instruction").values()) == [True]


def _spawned_children(pid: int) -> dict[int, bool]:
    """The processes whose parent is ``pid`` and that multiprocessing spawned: whether each
    ignores SIGINT (the mask of ignored signals in its /proc status)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        ignored = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:")), 0)
        if parent == pid and b"spawn_main" in command:
            found[int(entry.name)] = bool(ignored & (1 << (signal.SIGINT - 1)))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the processes from /proc")
@pytest.mark.skipif(not (Path(sys.executable).parent / "nsg").exists(), reason="nsg is not installed beside Python")
def test_ctrl_c_while_the_workers_start_is_one_line(frames, tmp_path):
    """Ctrl-C (to the whole process group, as a terminal sends it) while ``--workers``' processes
    still import the libraries printed their KeyboardInterrupt tracebacks (60-120 lines) and
    Dask's own from closing a cluster half started; now the cluster comes up, is closed, and
    the run says it was interrupted in one line, exit 130, no process left. (A worker that the
    Ctrl-C reaches in the tenths of a second its interpreter takes to start, before it reads
    nsg_gpu, still dies with a traceback: the run then reports the interruption, not the
    cluster's failure to start.)"""
    paths, _ = frames
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NSG_DEBUG", None)
    # The console script, as users run it: its worker processes import nsg_gpu first thing (with
    # ``python -m nsg_gpu`` they import Dask first, and ignore Ctrl-C from Dask's preload on).
    script = Path(sys.executable).parent / "nsg"
    command = [sys.executable, str(script), "normalize", *map(str, paths), "-o", str(tmp_path / "out")]
    process = subprocess.Popen(
        [*command, "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        children = _spawned_children(process.pid)
        if len(children) == 2 and all(children.values()):  # the moment both workers ignore Ctrl-C
            break
        time.sleep(0.01)
    # A worker ignores Ctrl-C as it imports nsg_gpu, before NumPy, SciPy, astropy and Dask.
    assert not (tmp_path / "out").exists(), "the workers started before they ignored Ctrl-C"
    assert process.poll() is None, "the run ended before its workers started"
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == [
        "nsg: interrupted: the same command again finishes the job (nsg normalize and nsg stack write each "
        "output complete or not at all; nsg normalize keeps the frames it completed)"
    ]
    left = time.monotonic() + 20
    with pytest.raises(ProcessLookupError):  # every process of the run's group ends
        while time.monotonic() < left:
            os.killpg(process.pid, 0)
            time.sleep(0.1)


def _logged(message: str) -> bool:
    """Whether a warning of Dask's worker state machine with ``message`` is logged (in a worker)."""
    import logging

    logger = logging.getLogger("distributed.worker.state_machine")
    return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None)))
