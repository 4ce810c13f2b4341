"""Host emulation of the CUDA kernels: kernels/*.cu compiled as C++ by g++ and run on NumPy buffers.

CI has no GPU, so a kernel that only compiles is unverified. Here each kernel family is
compiled once per test session into a shared library, together with one wrapper per entry
point generated from :data:`nsg_gpu.kernels.REGISTRY`; ``tests/cuda_host.h`` supplies the CUDA
built-ins. :class:`EmulatedLauncher` has the interface of :class:`nsg_gpu.kernels.DeviceLauncher`
and takes grid and block from the same :func:`nsg_gpu.kernels.launch_config`, so the stage
modules' own kernel paths run unchanged on the CPU, every thread of the grid in turn.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from nsg_gpu import kernels

__all__ = ["EmulatedLauncher", "build_family", "gxx_available"]

HEADER = Path(__file__).resolve().parent / "cuda_host.h"
_SCALARS = {"index_t": ctypes.c_longlong, "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double}
#: Element dtype (and trailing size, for vector types) a pointer parameter must point to.
_POINTEES = {
    "float": (np.float32, 1),
    "double": (np.float64, 1),
    "int": (np.int32, 1),
    "unsigned char": (np.uint8, 1),
    "float4": (np.float32, 4),
}


def gxx_available() -> bool:
    return shutil.which("g++") is not None


@functools.cache
def _build_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="nsg-emulation-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _wrapper_source(family: str) -> str:
    lines = [f'#include "{kernels.kernels_dir() / (family + ".cu")}"', ""]
    for entry in kernels.REGISTRY.values():
        if entry.family != family:
            continue
        names = ", ".join(name for _, name in entry.params)
        lines += [
            f'extern "C" void emulate_{entry.name}(unsigned grid, unsigned block, {entry.signature}) {{',
            f"    emulate_launch(dim3{{grid, 1, 1}}, dim3{{block, 1, 1}}, [&] {{ {entry.name}({names}); }});",
            "}",
            "",
        ]
    return "\n".join(lines)


@functools.cache
def build_family(family: str) -> ctypes.CDLL:
    """Compile ``kernels/<family>.cu`` with generated wrappers into a shared library (once)."""
    build = _build_dir()
    source = build / f"{family}_emulated.cpp"
    source.write_text(_wrapper_source(family))
    library = build / f"{family}_emulated.so"
    command = [
        "g++",
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-shared",
        "-ffp-contract=off",
        "-Wall",
        "-Werror",
        "-Wno-unused-function",
        "-include",
        str(HEADER),
        f"-I{kernels.kernels_dir()}",
        "-o",
        str(library),
        str(source),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"g++ could not compile kernels/{family}.cu for host emulation:\n{done.stderr}")
    lib = ctypes.CDLL(str(library))
    for entry in kernels.REGISTRY.values():
        if entry.family == family:
            function = getattr(lib, f"emulate_{entry.name}")
            function.restype = None
            function.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
                _SCALARS.get(kind, ctypes.c_void_p) for kind, _ in entry.params
            ]
    return lib


class EmulatedLauncher:
    """Runs registered kernels on NumPy buffers through the host emulation.

    Every output buffer (a non-``const`` pointer) is filled with NaN or 0xA5 bytes before the
    launch, so that an item the kernel fails to write cannot pass for a right answer.

    Parameters
    ----------
    multiprocessors : int
        The device size :func:`nsg_gpu.kernels.launch_config` sizes the grid for; a small
        value makes every thread loop over several items, as on a real device with a big frame.
    """

    def __init__(self, multiprocessors: int = 2):
        self.multiprocessors = multiprocessors
        self.launches: list[tuple[str, tuple[int, int]]] = []

    def config(self, name: str, n_items: int) -> tuple[int, int]:
        return kernels.launch_config(name, n_items, multiprocessors=self.multiprocessors)

    def __call__(self, name: str, config: tuple[int, int], args: tuple) -> None:
        entry = kernels.REGISTRY[name]
        args = kernels.kernel_arguments(name, args)
        converted = []
        for (kind, pname), value in zip(entry.params, args):
            if kind in _SCALARS:
                converted.append(value)
                continue
            if value is None:
                converted.append(None)
                continue
            dtype, width = _POINTEES[kind.replace("const ", "").rstrip("*").strip()]
            if not isinstance(value, np.ndarray) or value.dtype != dtype or not value.flags.c_contiguous:
                raise TypeError(f"{name}: {pname} must be a C-contiguous {np.dtype(dtype)} NumPy array")
            if width > 1 and value.shape[-1] != width:
                raise TypeError(f"{name}: {pname} must have a last axis of {width}")
            if not kind.startswith("const"):
                # Outputs are poisoned before the launch, so an item the kernel skips shows.
                if value.dtype.kind == "f":
                    value.fill(np.nan)
                else:
                    value.view(np.uint8).fill(0xA5)
            converted.append(value.ctypes.data)
        grid, block = config
        self.launches.append((name, config))
        getattr(build_family(entry.family), f"emulate_{name}")(grid, block, *converted)
