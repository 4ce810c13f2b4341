"""Executors: who runs the jobs (:mod:`nsg_gpu.jobs`) of a run, and where.

Above the jobs, below the run (:mod:`nsg_gpu.run`), which prepares the reference once and
hands every executor the same two things: the prepared :class:`~nsg_gpu.reference.Reference`
and a list of :class:`~nsg_gpu.jobs.FrameJob`. An executor yields one
:class:`~nsg_gpu.results.FrameResult` per job, in job order, whatever order the work finished
in, so that results files are the same however the run was executed. The Dask executor, with
the same interface, is :class:`nsg_gpu.cluster.DaskExecutor`.

:class:`InProcessExecutor` streams: a reader thread reads a few frames ahead, the calling
thread hands frames to compute threads, and a writer thread writes behind, with bounded
queues between them. A run of N frames then costs about N times its
slowest stage rather than N times the sum of the stages, and holds a bounded number of
frames (``read_ahead + write_behind + compute threads + 2``) whatever N is. Reading, writing
and most NumPy work release the GIL, so the threads overlap on separate cores. There are as
many compute threads as idle cores, up to two: on two quiet cores the second compute thread
fills what the first leaves idle while it holds the GIL or waits, and the reader and writer,
a tenth of the work, slip in between (1.53 s of wall time per 26 MP frame against 1.99 s with
one compute thread, bench/NOTES.md), while on a core that other work holds it only contends;
the GIL leaves a third thread nothing to gain, so beyond two cores frames are spread over
processes
(:class:`ProcessExecutor` on one machine, :class:`nsg_gpu.cluster.DaskExecutor` on many).
Each computation runs with one BLAS and OpenMP
thread (:func:`nsg_gpu.backend.single_threaded_blas`), so threads never multiply.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from .backend import get_backend
from .errors import FrameError, OutputError
from .jobs import FrameJob, compute_job, process_frame, read_job, write_job
from .reference import Reference
from .results import FrameResult, failed_result

__all__ = ["InProcessExecutor", "ProcessExecutor", "default_compute_threads", "idle_cores", "usable_cores"]

#: How often (s) a thread blocked on a queue looks whether the run was stopped.
_POLL = 0.1


class _Stopped(Exception):
    """The run was stopped while a thread waited on a queue."""


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=_POLL)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=_POLL)
        except queue.Empty:
            continue


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_ticks() -> tuple[int, int]:
    """All CPUs' idle (with I/O wait) and total ticks since boot, from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def idle_cores(interval: float = 0.1) -> float:
    """Cores the machine leaves idle now: its CPUs times their idle share over ``interval``
    seconds (``/proc/stat``), measured while this process waits; elsewhere its CPUs less the
    last minute's load average, or all its CPUs where the system tells neither."""
    cpus = os.cpu_count() or 1
    try:
        idle0, total0 = _cpu_ticks()
        time.sleep(interval)
        idle1, total1 = _cpu_ticks()
        if total1 > total0:
            return cpus * (idle1 - idle0) / (total1 - total0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return cpus - os.getloadavg()[0]
    except (AttributeError, OSError):
        return float(cpus)


def default_compute_threads(
    *, gpu: bool = False, cores: int | None = None, idle: float | None = None, frames: int | None = None
) -> int:
    """Compute threads for a streaming run: one per core this process may use and the machine
    leaves idle (rounded), at least one and no more than two, which the GIL leaves a third
    nothing to gain over, nor more than the run's ``frames`` where given; 1 on a GPU. A
    second thread on a core that other work holds only contends with the first (2.04 s per
    26 MP frame against 1.75 s with one thread, with another job on one of two cores; 1.53
    against 1.99 on a quiet machine: bench/NOTES.md). The idle cores are measured
    (:func:`idle_cores`, 0.1 s) only where more than one thread could be chosen. The count
    never changes the outputs."""
    if gpu:
        return 1
    cores = usable_cores() if cores is None else cores
    most = min(2, cores) if frames is None else min(2, cores, frames)
    if most <= 1:
        return 1
    idle = idle_cores() if idle is None else idle
    return max(1, min(most, math.floor(idle + 0.5)))


class InProcessExecutor:
    """Process the frames in this process: read ahead, compute, write behind.

    Parameters
    ----------
    read_ahead : int
        Frames read and waiting for the compute stage, at most.

    write_behind : int
        Frames computed (or being computed) and waiting to be written, at most, beyond
        one per compute thread.

    compute_threads : int, optional
        Frames normalized at the same time. By default :func:`default_compute_threads`:
        on the CPU as many as the cores this process may use and the machine leaves idle, at
        least 1 and at most 2; 1 on a GPU.

    threads : bool
        Overlap the stages on threads (the default). False runs
        :func:`~nsg_gpu.jobs.process_frame` frame after frame on the calling thread.
    """

    def __init__(
        self, *, read_ahead: int = 2, write_behind: int = 2, compute_threads: int | None = None, threads: bool = True
    ):
        if read_ahead < 1 or write_behind < 1:
            raise ValueError("read_ahead and write_behind must be at least 1")
        if compute_threads is not None and compute_threads < 1:
            raise ValueError("compute_threads must be at least 1")
        self.read_ahead = int(read_ahead)
        self.write_behind = int(write_behind)
        self.compute_threads = compute_threads
        self.threads = bool(threads)

    def _compute_threads(self, reference: Reference, frames: int) -> int:
        if self.compute_threads is not None:
            return self.compute_threads
        return default_compute_threads(gpu=get_backend(reference.frame.data).is_gpu, frames=frames)

    def run(
        self, reference: Reference, jobs: Sequence[FrameJob], *, stop_on_error: bool = False
    ) -> Iterator[FrameResult]:
        """Yield each job's result in order, once its output is written; stop after the
        first failure if asked (frames after it are then neither reported nor written).

        An exception nobody foresaw in one frame's read, compute or write (a defect,
        ``MemoryError``) is that frame's failure (:class:`~nsg_gpu.errors.UnforeseenFrameError`);
        one outside them (a reader or writer thread's own) stops the run and is raised here.
        """
        if not self.threads:
            for job in jobs:
                result = process_frame(reference, job)
                yield result
                if stop_on_error and result.status == "failed":
                    return
            return
        yield from self._stream(reference, list(jobs), stop_on_error)

    def _stream(self, reference: Reference, jobs: list[FrameJob], stop_on_error: bool) -> Iterator[FrameResult]:
        stop = threading.Event()  # the consumer went away, or a thread raised
        failed = threading.Event()  # a frame failed and stop_on_error holds: read no further
        errors: list[BaseException] = []  # what a thread raised, for the consumer to raise
        workers = self._compute_threads(reference, len(jobs))
        read_q: queue.Queue = queue.Queue(maxsize=self.read_ahead)
        # Futures in job order; their number bounds the frames held between read and write.
        write_q: queue.Queue = queue.Queue(maxsize=self.write_behind + workers - 1)
        done_q: queue.Queue = queue.Queue()  # filled no faster than write_q drains

        def reader() -> None:
            try:
                for job in jobs:
                    if failed.is_set():
                        break
                    started = time.perf_counter()
                    try:
                        item = (job, read_job(job), None)
                    except FrameError as exc:
                        item = (job, None, exc)
                    _put(read_q, (item, time.perf_counter() - started), stop)
                _put(read_q, None, stop)
            except _Stopped:
                pass
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        def compute(job: FrameJob, frame, error, read_seconds: float):
            timings = {"read": read_seconds}
            if error is not None or failed.is_set():
                return None, failed_result(job.path, error or FrameError(job.path, "not processed"), timings)
            try:
                result = compute_job(reference, job, frame)
            except FrameError as exc:
                return None, failed_result(job.path, exc, timings)
            result.timings = {**timings, **result.timings}
            # The writer needs the header, not the input pixels: drop them now rather than
            # keep a frame-sized array alive in the write queue.
            return dataclasses.replace(frame, data=None), result

        def writer() -> None:
            halted = False  # a failure was reported with stop_on_error: later frames are dropped
            try:
                while True:
                    future = _get(write_q, stop)
                    if future is None:
                        break
                    job, (frame, result) = future[0], future[1].result()
                    if halted:
                        continue
                    if result.status != "failed":
                        started = time.perf_counter()
                        try:
                            write_job(reference, job, frame, result)
                        except (FrameError, OutputError) as exc:
                            result = failed_result(job.path, exc, result.timings)
                        result.timings["write"] = time.perf_counter() - started
                    del frame, future
                    result.seconds = sum(result.timings.values())
                    if result.status == "failed" and stop_on_error:
                        halted = True
                        failed.set()
                    done_q.put(result)
                done_q.put(None)
            except _Stopped:
                pass
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=reader, name="nsg-reader", daemon=True),
            threading.Thread(target=writer, name="nsg-writer", daemon=True),
        ]
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsg-compute")
        for thread in threads:
            thread.start()
        try:
            while not failed.is_set():
                item = _get(read_q, stop)
                if item is None:
                    break
                (job, frame, error), read_seconds = item
                _put(write_q, (job, pool.submit(compute, job, frame, error, read_seconds)), stop)
                del item, frame
                while True:  # report what is written so far, without waiting
                    try:
                        written = done_q.get_nowait()
                    except queue.Empty:
                        break
                    if written is None:
                        break
                    yield written
            _put(write_q, None, stop)
            while (written := _get(done_q, stop)) is not None:
                yield written
        except _Stopped:
            if errors:
                raise errors[0] from None
            raise RuntimeError("the run's reader or writer thread stopped unexpectedly") from None
        finally:
            stop.set()
            failed.set()  # computations still queued return at once
            for thread in threads:
                thread.join()
            pool.shutdown(wait=True, cancel_futures=True)


#: The prepared reference inside a :class:`ProcessExecutor` worker.
_worker_reference: Reference | None = None


def _start_worker(reference: Reference) -> None:
    global _worker_reference
    _worker_reference = reference


def _process_in_worker(job: FrameJob) -> FrameResult:
    result = process_frame(_worker_reference, job)
    result.data = None  # written; only the numbers travel back
    return result


class ProcessExecutor:
    """Process the frames on worker processes of this machine, each frame read, normalized
    and written by one process (:func:`~nsg_gpu.jobs.process_frame`).

    For many cores, where the GIL keeps compute threads from scaling: each process runs one
    frame at a time on one core (one BLAS and OpenMP thread), so ``processes`` frames are in
    flight and as many cores busy. Every worker receives the prepared reference once, when
    it starts (forked where the system allows, so that its pixels are shared rather than
    copied), and prepares what it caches (the reference's photometry at each aperture, its
    PSF fits) itself. Results come back in job order, as from :class:`InProcessExecutor`,
    and the outputs are the same bytes.

    Parameters
    ----------
    processes : int, optional
        Worker processes; by default the cores this process may use.

    pending : int, optional
        Jobs handed to the workers ahead of the one reported next; by default twice the
        processes. It bounds the results held back for the order, not memory, which each
        worker holds for its own frame only.
    """

    def __init__(self, *, processes: int | None = None, pending: int | None = None):
        if processes is not None and processes < 1:
            raise ValueError("processes must be at least 1")
        self.processes = processes
        self.pending = pending

    def run(
        self, reference: Reference, jobs: Sequence[FrameJob], *, stop_on_error: bool = False
    ) -> Iterator[FrameResult]:
        """Yield each job's result in order, once its output is written; stop after the
        first failure if asked (frames not yet started are then neither reported nor written)."""
        jobs = list(jobs)
        processes = self.processes or usable_cores()
        pending = self.pending or 2 * processes
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ProcessPoolExecutor(
            max_workers=processes, mp_context=context, initializer=_start_worker, initargs=(reference,)
        )
        try:
            futures: list = []
            submitted = 0
            for index in range(len(jobs)):
                while submitted < len(jobs) and submitted < index + pending:
                    futures.append(pool.submit(_process_in_worker, jobs[submitted]))
                    submitted += 1
                result = futures[index].result()
                futures[index] = None
                yield result
                if stop_on_error and result.status == "failed":
                    return
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
