"""Ctrl-C in the worker processes of a cluster that nsg starts (``--workers``, ``--gpus``).

A Ctrl-C in a terminal reaches every process of its group; the run's own process handles it
and closes the cluster. Its worker processes ignore it: :func:`nsg_gpu.cluster.dask_setup`
once Dask runs its preload, and this module from the first import of :mod:`nsg_gpu` (which
imports it before anything else) in a process started with :data:`WORKER_ENVIRON` set, as
the cluster's processes are, so that one arriving while they import the libraries gives no
KeyboardInterrupt traceback either. Nothing here imports Dask.
"""

from __future__ import annotations

import os
import signal

__all__ = ["WORKER_ENVIRON", "ignore_in_worker"]

#: Set in the run's environment while a cluster it started runs; its worker processes inherit it.
WORKER_ENVIRON = "NSG_GPU_LOCAL_WORKER"


def ignore_in_worker() -> bool:
    """Ignore Ctrl-C in this process if it is a worker of a cluster nsg started and Python's
    own handler is in place (a handler set by the program is left alone); whether it did."""
    if not os.environ.get(WORKER_ENVIRON) or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: the preload does it
        return False
    return True


ignore_in_worker()
