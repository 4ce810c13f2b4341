"""Dask distributed execution: the frames of a run as tasks on many processes, GPUs or machines.

:class:`DaskExecutor` has the interface of :class:`~nsg_gpu.executors.InProcessExecutor`. The
reference, prepared once by :func:`nsg_gpu.run.normalize`, is scattered to every worker
(broadcast); each target is one task running :func:`nsg_gpu.jobs.process_frame`, which reads
the frame and writes its output on storage that the workers share with this process. Results
come back as the tasks finish and are handed on in job order, so that the results files are
those of an in-process run.

Failures:

- A frame's own problem (unreadable, unregistered, too few stars, disk full) is a failed result
  returned by the task, so Dask never retries it; an unexpected exception inside a task becomes
  that frame's failed result too.
- A worker that dies (killed, out of memory, lost machine) has its tasks run again on other
  workers by the Dask scheduler; outputs are written to a temporary file and renamed, so an
  interrupted attempt leaves no partial output (its temporary file is removed at the end of
  the run). A frame whose every attempt kills its worker ends, after Dask's
  ``distributed.scheduler.allowed-failures`` retries, as that frame's failed result.

Dask is imported by the functions of this module, never at import time, and this module is
imported only when a cluster is asked for: a run without Dask options never imports Dask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .atomic import remove_stale_temporaries
from .backend import cupy_status, get_backend
from .errors import NSGError, UnforeseenFrameError
from .interrupts import WORKER_ENVIRON
from .jobs import FrameJob, process_frame
from .reference import Reference
from .results import FrameResult, failed_result
from .version import __version__

__all__ = [
    "ClusterError",
    "DaskExecutor",
    "check_cluster_options",
    "open_cluster",
    "parse_gpus",
    "require_dask_cuda",
    "run_frame_task",
]

#: Dask's preload for the worker processes of a cluster started here: this module, whose
#: :func:`dask_setup` runs in each of them as it starts.
WORKER_PRELOAD = __name__


#: A frame's task is submitted at most this many times when the scheduler cancels it (a lost
#: reference), and the reference is scattered at most this many times in a run.
MAX_SUBMISSIONS = 4


class ClusterError(NSGError):
    """The Dask cluster cannot be started, reached or used."""


class _TaskError(NSGError):
    """An unexpected exception or a lost task, reported as the frame's error."""


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(
            "running on a Dask cluster needs Dask distributed, which is not installed: pip install 'nsg-gpu[dask]'"
        ) from exc
    return distributed


def require_dask_cuda():
    """Return ``dask_cuda.LocalCUDACluster``, or raise a :class:`ClusterError` saying how to install it."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ClusterError(
            f"--gpus needs dask-cuda, which is not importable here ({exc}); install it with "
            "pip install 'nsg-gpu[gpu-cluster]', or use --workers N"
        ) from exc
    return LocalCUDACluster


def parse_gpus(value: str | int) -> str | int:
    """``"all"`` or a positive GPU count, from the ``--gpus`` option.

    Raises
    ------
    ClusterError
        Anything else.
    """
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ClusterError(f"--gpus {value}: give 'all' or a number of GPUs (1 or more)")
    return count


def run_frame_task(reference: Reference, job: FrameJob, path: str, output: str) -> FrameResult:
    """:func:`~nsg_gpu.jobs.process_frame` as a Dask task.

    ``job`` carries absolute paths (a worker's working directory is not the client's);
    ``path`` and ``output`` are the names as given, which the result and its error keep so
    that the results files match an in-process run. Any exception becomes the frame's failed
    result: a task that returns is never retried by Dask.
    """
    try:
        result = process_frame(reference, job)
    except Exception as exc:
        result = failed_result(job.path, UnforeseenFrameError(job.path, exc))
    result.path = path
    if result.output is not None:
        result.output = output
    for absolute, given in ((job.path, path), (job.output, output)):
        if result.error and result.error.startswith(f"{absolute}:"):  # errors name the file as given
            result.error = given + result.error[len(str(absolute)) :]
    return result


def _worker_facts(check_gpu: bool) -> tuple[str, bool]:
    """Run on each worker before a run: its nsg-gpu version and whether CuPy can use a GPU."""
    return __version__, (cupy_status()[0] if check_gpu else True)


class DaskExecutor:
    """Process the frames as tasks on a Dask distributed cluster.

    Parameters
    ----------
    client : distributed.Client
        A client of the cluster; it stays open (and is not closed) after a run.

    timeout : float, optional
        Give up with a :class:`ClusterError` when a run has not finished after this many
        seconds (no limit by default).

    Notes
    -----
    Workers read the inputs and write the outputs themselves: the frames and the output
    directory must be at the same paths on every worker (shared storage). Relative paths are
    made absolute against this process's working directory. The backend is the reference's
    (chosen where :func:`~nsg_gpu.run.normalize` runs); when it is CuPy every worker must
    have a usable GPU, which is checked before the first task.
    """

    def __init__(self, client, *, timeout: float | None = None):
        self.client = client
        self.timeout = timeout

    def describe(self) -> str:
        """One line for the command line: the scheduler and its workers."""
        workers = self.client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        line = f"Dask scheduler {self.client.scheduler.address}: {len(workers)} workers, {threads} threads"
        if importlib.util.find_spec("bokeh"):  # the scheduler serves a dashboard only with bokeh
            line += f"; dashboard {self.client.dashboard_link}"
        return line

    def _check_workers(self, gpu: bool) -> None:
        try:
            facts = self.client.run(_worker_facts, gpu)
        except Exception as exc:
            raise ClusterError(
                f"the Dask workers cannot run nsg-gpu ({type(exc).__name__}: {exc}); "
                "install nsg-gpu, the same version, in the workers' environment"
            ) from exc
        other = sorted({f"{address} runs nsg-gpu {v}" for address, (v, _) in facts.items() if v != __version__})
        if other:
            raise ClusterError(f"this is nsg-gpu {__version__} but worker {other[0]}; install the same version")
        no_gpu = sorted(address for address, (_, usable) in facts.items() if not usable)
        if no_gpu:
            raise ClusterError(
                f"the run uses the cupy backend but worker {no_gpu[0]} has no usable GPU "
                f"({len(no_gpu)} of {len(facts)} workers); start GPU workers (dask-cuda) or use --backend numpy"
            )

    def run(
        self, reference: Reference, jobs: Sequence[FrameJob], *, stop_on_error: bool = False
    ) -> Iterator[FrameResult]:
        """Yield each job's result in job order, as the cluster finishes them.

        With ``stop_on_error`` the run stops after the first failed result in job order and
        the frames not started are cancelled; frames already running on a worker finish and
        their outputs are written, but they are not in the results (a rerun keeps them).

        Raises
        ------
        ClusterError
            The workers cannot run nsg-gpu or lack a GPU for the CuPy backend, the reference
            cannot be sent to them (the connection lost), or the run exceeded ``timeout``.
        """
        distributed = _distributed()

        if not jobs:
            return
        client = self.client
        self._check_workers(get_backend(reference.frame.data).is_gpu)
        started = time.monotonic()
        token = uuid.uuid4().hex
        shared = [self._scatter(reference, following=0, total=len(jobs))]
        attempts = [0] * len(jobs)
        position: dict[str, int] = {}
        live: dict[int, object] = {}

        def submit(index: int):
            job = jobs[index]
            absolute = dataclasses.replace(job, path=job.path.absolute(), output=job.output.absolute())
            attempts[index] += 1
            future = client.submit(
                run_frame_task,
                shared[-1],
                absolute,
                str(job.path),
                str(job.output),
                key=f"nsg-frame-{index}-{token}-{attempts[index]}",
                retries=0,
            )
            position[future.key] = index
            live[index] = future
            return future

        completed = distributed.as_completed([submit(i) for i in range(len(jobs))], timeout=self.timeout)
        finished: dict[int, FrameResult] = {}
        following = 0
        try:
            for future in completed:
                index = position.pop(future.key)
                del live[index]
                if future.status == "cancelled" and attempts[index] < MAX_SUBMISSIONS:
                    # Cancelled by the scheduler: the reference's copies were lost with the
                    # workers that held them (scattered data is not recomputed). Send it again.
                    if shared[-1].status != "finished" and len(shared) < MAX_SUBMISSIONS:
                        shared.append(self._scatter(reference, following=following, total=len(jobs)))
                    completed.add(submit(index))
                    continue
                finished[index] = self._result(future, jobs[index])
                future.release()
                while following in finished:
                    result = finished.pop(following)
                    following += 1
                    yield result
                    if stop_on_error and result.status == "failed":
                        return
        except distributed.TimeoutError as exc:
            raise ClusterError(
                f"the Dask run did not finish within {self.timeout:g} s "
                f"({following} of {len(jobs)} frames done in {time.monotonic() - started:.0f} s)"
            ) from exc
        finally:
            running = bool(live)
            if running:
                client.cancel(list(live.values()))
            for future in shared:
                future.release()
            # Tasks still running on a worker go on writing their temporaries; those of an
            # interrupted run are cleared by the next run instead.
            if not running:
                remove_stale_temporaries(job.output for job in jobs)

    def _scatter(self, reference: Reference, *, following: int, total: int):
        """The reference on every worker, as one future; a connection lost on the way (the
        workers or the scheduler gone) is a :class:`ClusterError` saying what is kept."""
        try:
            return self.client.scatter(reference, broadcast=True, hash=False)
        except Exception as exc:
            raise ClusterError(
                f"the reference could not be sent to the Dask workers ({type(exc).__name__}: {exc}) with "
                f"{following} of {total} frames done; the outputs written are kept, and the same command "
                "again goes on from them once the cluster has workers"
            ) from exc

    @staticmethod
    def _result(future, job: FrameJob) -> FrameResult:
        """The task's result; a task that died with its workers or erred becomes a failed result."""
        distributed = _distributed()
        try:
            return future.result()
        except distributed.KilledWorker:
            error = _TaskError(
                f"{job.path}: every Dask worker that processed this frame died (out of memory, or killed); "
                "it was not retried further: see the workers' logs"
            )
        except distributed.client.FutureCancelledError as exc:
            error = _TaskError(f"{job.path}: the Dask task was cancelled {MAX_SUBMISSIONS} times ({exc})")
        except Exception as exc:  # a task that could not be deserialized, ...
            error = _TaskError(f"{job.path}: the Dask task failed: {type(exc).__name__}: {exc}")
        return failed_result(job.path, error)


def check_cluster_options(*, scheduler=None, workers=None, gpus=None) -> None:
    """Raise :class:`ClusterError` unless exactly one of the options is given, and a worker
    count is 1 or more."""
    given = [
        name
        for name, value in (("--scheduler", scheduler), ("--workers", workers), ("--gpus", gpus))
        if value is not None
    ]
    if scheduler is not None and not str(scheduler).strip():
        raise ClusterError("--scheduler is empty: give a scheduler's address (tcp://host:8786) or scheduler file")
    if gpus is not None and not str(gpus).strip():
        raise ClusterError("--gpus is empty: give a GPU count or all")
    if workers is not None and workers < 1:
        raise ClusterError(f"--workers {workers}: give 1 or more worker processes")
    if len(given) != 1:
        raise ClusterError(
            f"{' and '.join(given)} exclude each other: give one" if given else "give --scheduler, --workers or --gpus"
        )


@contextlib.contextmanager
def open_cluster(
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    gpus: str | int | None = None,
    connect_timeout: float | None = None,
    worker_timeout: float = 300.0,
    timeout: float | None = None,
    notify: Callable[[str], None] | None = None,
) -> Iterator[DaskExecutor]:
    """Connect to a Dask cluster, or start a local one, and yield a :class:`DaskExecutor` on it.

    Exactly one of the three options is given. A cluster started here is closed on exit; a
    cluster reached by its scheduler's address is left running.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``), or the path of a scheduler file
        written by ``dask scheduler --scheduler-file``.

    workers : int, optional
        Start a local cluster of this many worker processes, one thread each.

    gpus : "all" or int, optional
        Start a ``dask_cuda.LocalCUDACluster`` with one worker per GPU (all visible GPUs, or the
        first ``gpus``); the run must use the CuPy backend.

    connect_timeout : float, optional
        Seconds to reach the scheduler; by default Dask's ``distributed.comm.timeouts.connect``.

    worker_timeout : float
        Seconds to wait for a first worker to join the scheduler.

    timeout : float, optional
        Passed to :class:`DaskExecutor`.

    notify : callable, optional
        Told, in a line, what the run waits for (a scheduler without workers).

    Raises
    ------
    ClusterError
        Not exactly one option, a bad count, Dask (or dask-cuda for ``gpus``) missing, the
        scheduler unreachable, not a Dask scheduler (no answer within ``connect_timeout`` and
        :data:`ANSWER_GRACE` seconds), or no worker joined in time.
    """
    check_cluster_options(scheduler=scheduler, workers=workers, gpus=gpus)
    distributed = _distributed()
    with contextlib.ExitStack() as stack:
        if scheduler is None:
            stack.enter_context(_patient_with_lost_workers())
        yield from _open(distributed, scheduler, workers, gpus, connect_timeout, worker_timeout, timeout, notify)


#: Seconds a cluster started here waits for a killed worker's new process to join before it
#: closes that worker's nanny for good (Dask's ``distributed.deploy.lost-worker-timeout``,
#: 15 s by default). A new process imports NumPy, SciPy and astropy, which on a busy machine
#: takes longer than 15 s; the run would then go on with one worker fewer, and hang with none.
LOST_WORKER_TIMEOUT = 300.0


def _patient_with_lost_workers():
    """Dask's configuration with ``lost-worker-timeout`` raised to :data:`LOST_WORKER_TIMEOUT`
    (kept where it is longer), for a cluster started here and its whole life."""
    import dask
    from dask.utils import parse_timedelta

    key = "distributed.deploy.lost-worker-timeout"
    current = parse_timedelta(dask.config.get(key, "0s"), default="s") or 0.0
    return dask.config.set({key: f"{max(current, LOST_WORKER_TIMEOUT):g}s"})


#: Seconds beyond the connect timeout that a scheduler has to answer before the address is
#: taken for something else (a dashboard's or a web server's port answers a connection, never
#: Dask's handshake).
ANSWER_GRACE = 10.0


def _connect(distributed, scheduler: str, connect_timeout: float | None):
    """A ``distributed.Client`` of the scheduler at ``scheduler`` (an address or a scheduler
    file), or a :class:`ClusterError` saying why not, within a bounded time."""
    path = Path(scheduler)
    if "://" not in scheduler and not path.is_file() and (scheduler.endswith(".json") or "/" in scheduler):
        raise ClusterError(f"{scheduler}: no such scheduler file (a scheduler removes its file when it stops)")
    limit = {} if connect_timeout is None else {"timeout": connect_timeout}
    outcome: dict = {}
    abandoned = threading.Event()

    def attempt() -> None:
        try:
            if path.is_file():
                client = distributed.Client(scheduler_file=scheduler, **limit)
            else:
                client = distributed.Client(scheduler, **limit)
        except BaseException as exc:  # handed to the caller, which names the scheduler
            outcome["error"] = exc
            return
        outcome["client"] = client
        if abandoned.is_set():  # answered after the caller gave up: nobody will close it
            client.close()

    started = threading.Thread(target=attempt, name="nsg-dask-connect", daemon=True)
    started.start()
    import dask

    default = dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
    wait = (default if connect_timeout is None else connect_timeout) + ANSWER_GRACE
    started.join(wait)
    if started.is_alive():
        abandoned.set()
        raise ClusterError(f"{scheduler}: no answer as a Dask scheduler within {wait:g} s (a dashboard's port?)")
    exc = outcome.get("error")
    if exc is None:
        return outcome["client"]
    if isinstance(exc, (OSError, TimeoutError)):
        raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    if path.is_file():
        raise ClusterError(
            f"{scheduler}: not a scheduler file that dask scheduler --scheduler-file wrote ({type(exc).__name__})"
        ) from exc
    if isinstance(exc, ValueError):
        raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    raise ClusterError(
        f"{scheduler}: does not answer as a Dask scheduler (its answer read as Dask's gave {type(exc).__name__})"
    ) from exc


def dask_setup(worker) -> None:
    """Dask's preload hook, run in each worker process of a cluster started here (``--workers``,
    ``--gpus``) as it starts: Ctrl-C in a terminal reaches every process of its group, and the
    run's own process closes the cluster, so a worker ignores it instead of dying with a
    traceback and being restarted by its nanny while the run stops. The cluster's closing
    then cancels the frames still running, and Dask's worker warns of each ("Async
    instruction ... ended with CancelledError", which its code says happens only as a worker
    closes): those lines are left out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker.state_machine").addFilter(_not_a_cancellation_on_closing)


def _not_a_cancellation_on_closing(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Async instruction for") and message.endswith("ended with CancelledError"))


def _local_worker_options() -> dict:
    """Options of ``--workers``' local cluster: Dask's configured worker preloads, then ours."""
    import dask

    preload = dask.config.get("distributed.worker.preload") or []
    options = {"preload": [*([preload] if isinstance(preload, str) else preload), WORKER_PRELOAD]}
    argv = dask.config.get("distributed.worker.preload-argv") or []
    if argv and not isinstance(argv[0], str):  # one list per preload: ours takes none
        options["preload_argv"] = [*argv, []]
    return options


def _drop_unknown_removals(cluster) -> None:
    """Dask's cluster object follows its workers' comings and goings from the scheduler. A
    worker killed and restarted by its nanny can be reported gone when the cluster does not
    list it (dask/distributed#5407): the report raised KeyError in the cluster's watcher,
    which stopped, and closing the cluster raised it again after the run's results were in.
    Such a report is dropped: there is nothing to remove."""
    update = getattr(type(cluster), "_update_worker_status", None)
    if update is None:
        return
    listed = weakref.ref(cluster)  # the cluster holds this function: no cycle through it

    def update_known(op, msg):
        known = listed()
        if known is None or (op == "remove" and msg not in known.scheduler_info.get("workers", {})):
            return
        update(known, op, msg)

    cluster._update_worker_status = update_known


def _open(
    distributed, scheduler, workers, gpus, connect_timeout, worker_timeout, timeout, notify
) -> Iterator[DaskExecutor]:
    """:func:`open_cluster` once its options are checked."""
    cluster = None
    local = gpus is not None or workers is not None
    if gpus is not None:
        count = parse_gpus(gpus)
        local_cuda_cluster = require_dask_cuda()
    environ = os.environ.get(WORKER_ENVIRON)
    try:
        if local:
            os.environ[WORKER_ENVIRON] = "1"  # inherited by the worker processes as they start
            with _ctrl_c_held():
                if gpus is not None:
                    # Port 0: a free port for the scheduler's HTTP server (dashboard), never a clash.
                    cluster = local_cuda_cluster(
                        n_workers=None if count == "all" else count,
                        threads_per_worker=1,
                        dashboard_address=":0",
                        # dask-cuda appends its own preload and gives its flat argument list to every
                        # preload: only ours (which takes none) goes with it, as before no configured one.
                        preload=[WORKER_PRELOAD],
                    )
                else:
                    cluster = distributed.LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=":0",
                        **_local_worker_options(),
                    )
            _drop_unknown_removals(cluster)
        if cluster is not None:
            client = distributed.Client(cluster)
        else:
            client = _connect(distributed, str(scheduler), connect_timeout)
        with client:
            if notify is not None and not client.scheduler_info().get("workers"):
                notify(f"waiting up to {worker_timeout:g} s for a Dask worker to join {client.scheduler.address}")
            try:
                client.wait_for_workers(1, timeout=worker_timeout)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(
                    f"no Dask worker joined the scheduler at {client.scheduler.address} within {worker_timeout:g} s"
                ) from exc
            yield DaskExecutor(client, timeout=timeout)
    finally:
        if cluster is not None:
            cluster.close()
        if local and environ is None:
            os.environ.pop(WORKER_ENVIRON, None)
        elif local:
            os.environ[WORKER_ENVIRON] = environ


@contextlib.contextmanager
def _ctrl_c_held():
    """A Ctrl-C while the block runs is raised once it ends; a second one at once.

    Starting a local cluster takes seconds (its worker processes import the libraries), and a
    KeyboardInterrupt in the middle of it left a cluster that Dask could not close (an
    ``AssertionError`` traceback from its exit hook) and workers with their own tracebacks.
    Held, the cluster comes up and is closed like any other. Only the main thread can set a
    signal handler: elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum, frame):
        caught.append(signum)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, hold)
    if previous is None:  # a handler set outside Python: Python's own is what a Ctrl-C meets after
        previous = signal.default_int_handler
    try:
        yield
    except Exception:
        if not caught:
            raise
        # A worker process that the Ctrl-C reached before it could ignore it (as its
        # interpreter starts) fails the cluster's start: the user's Ctrl-C is what happened.
        raise KeyboardInterrupt from None
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
