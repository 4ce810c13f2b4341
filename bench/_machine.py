"""What every benchmark prints first: the machine, its load and the library versions."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "machine", "print_machine", "peak_rss_mb"]


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def machine(*extra: str) -> dict:
    """CPU model and cores, GPU (if CuPy can use one), load, Python and library versions
    (those of the ``extra`` modules too)."""
    from nsg_gpu.backend import cupy_status

    usable, reason = cupy_status()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "gpu": reason if usable else None,
        "gpu_status": reason,
        "load_average_1_5_15": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name) for name in ("nsg_gpu", "numpy", "scipy", "astropy", "photutils", "cupy", *extra)
        },
    }


def print_machine(info: dict) -> None:
    print(f"CPU: {info['cpu']}, {info['cores']} cores; load average {info['load_average_1_5_15']}")
    print(f"GPU: {info['gpu'] or 'none (' + info['gpu_status'] + ')'}")
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    print(f"Python {info['python']} on {info['platform']}; {versions}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MB; NaN where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
