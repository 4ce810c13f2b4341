"""Executors: who runs :func:`nsg_gpu.pipeline.process_frame` over the targets of a run.

The pipeline prepares the reference once and hands every executor the same two things: the
prepared :class:`~nsg_gpu.pipeline.Reference` and a list of :class:`~nsg_gpu.pipeline.FrameJob`.
An executor yields one :class:`~nsg_gpu.pipeline.FrameResult` per job, in job order, whatever
order the work finished in, so that results files are the same however the run was executed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .pipeline import FrameJob, FrameResult, Reference, process_frame

__all__ = ["InProcessExecutor"]


class InProcessExecutor:
    """Process the frames one after another in this process."""

    def run(
        self, reference: Reference, jobs: Sequence[FrameJob], *, stop_on_error: bool = False
    ) -> Iterator[FrameResult]:
        """Yield each job's result in order; stop after the first failure if asked."""
        for job in jobs:
            result = process_frame(reference, job)
            yield result
            if stop_on_error and result.status == "failed":
                return


# -- Dask distributed --------------------------------------------------------------------------
def __getattr__(name: str):
    # DaskExecutor lives in nsg_gpu.cluster, imported on first use: Dask is an optional extra
    # and a run without it never imports it.
    if name == "DaskExecutor":
        from .cluster import DaskExecutor

        return DaskExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
