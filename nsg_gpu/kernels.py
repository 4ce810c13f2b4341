"""The hand-written CUDA kernels: their registry, loader, launch geometry and compile check.

Every kernel lives in ``kernels/<family>.cu`` (shared helpers in ``kernels/common.cuh``) and
has a NumPy twin that is its specification. :data:`REGISTRY` lists every entry point with its
family and parameter types; the loader, the compile check and the tests' host emulation all
read it, so a kernel is declared once. :func:`function` compiles a family with CuPy's
``RawModule`` once per device, the source prefixed with ``#line 1 "<path>"`` so that compiler
errors name the real file and line. :func:`launch_config` is the single place where grid and
block sizes are chosen; the host emulation in the tests launches with the same geometry.
:func:`compile_check` compiles every family to PTX with ``nvcc`` or, where there is none,
with NVRTC from the ``nvidia-cuda-nvrtc-cu12`` wheel, and needs no GPU.

Importing this module never imports CuPy.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NSGError

__all__ = [
    "describe_device",
    "KernelEntry",
    "REGISTRY",
    "FAMILIES",
    "KernelCompileError",
    "kernels_dir",
    "kernel_source",
    "launch_config",
    "function",
    "launch",
    "kernel_arguments",
    "compile_check",
    "CompileResult",
    "SCALAR_TYPES",
    "DeviceLauncher",
    "DEVICE",
    "launcher_for",
    "available_compilers",
]

#: Threads per block of every launch; a multiple of the warp size that suits all our kernels.
BLOCK = 256
#: Resident blocks per multiprocessor a grid-stride launch aims at (2048 threads on recent GPUs).
BLOCKS_PER_MULTIPROCESSOR = 8
#: Oldest architecture the compile check targets (CuPy compiles for the device it runs on).
CHECK_ARCHITECTURE = "compute_75"
#: Options of every compilation (NVRTC and nvcc accept both).
COMPILE_OPTIONS = ("-std=c++17",)

#: Scalar parameter types and the NumPy type a launch passes for them.
SCALAR_TYPES = {"index_t": np.int64, "int": np.int32, "float": np.float32, "double": np.float64}


class KernelCompileError(NSGError):
    """A kernel failed to compile; the message carries the compiler's log."""


@dataclass(frozen=True)
class KernelEntry:
    """One ``extern "C"`` entry point.

    Parameters
    ----------
    name : str
        The symbol, named by dtype (``tps_eval_f32``).

    family : str
        The file it lives in, ``kernels/<family>.cu``.

    params : tuple of (type, name)
        C types in order: pointers (``"const float*"``) or scalars (keys of :data:`SCALAR_TYPES`).

    items : str
        What one grid-stride item is, to size the launch.
    """

    name: str
    family: str
    params: tuple[tuple[str, str], ...]
    items: str

    @property
    def signature(self) -> str:
        return ", ".join(f"{kind} {name}" for kind, name in self.params)


def _entry(name: str, family: str, signature: str, items: str) -> KernelEntry:
    params = []
    for part in signature.split(","):
        kind, _, pname = part.strip().rpartition(" ")
        params.append((kind.replace(" *", "*").strip(), pname))
    return KernelEntry(name, family, tuple(params), items)


#: Every kernel entry point, by name.
REGISTRY: dict[str, KernelEntry] = {
    e.name: e
    for e in (
        _entry(
            "convolve_axis_f32",
            "detect",
            "const float* in, float* out, index_t height, index_t width, const double* weights, int radius, int axis",
            "height * width",
        ),
        _entry(
            "find_peaks_f32",
            "detect",
            "const float* matched, const float* image, unsigned char* peaks, index_t height, index_t width, "
            "float threshold, int half, int margin",
            "height * width",
        ),
        _entry(
            "bin_medians_f32",
            "samples",
            "const float* data, index_t channels, index_t height, index_t width, index_t size, index_t stride, index_t x0, "
            "index_t y0, index_t n_cols, index_t n_rows, float white_level, double* medians, int* nodata",
            "channels * n_rows * n_cols",
        ),
        _entry(
            "tps_eval_f32",
            "tps",
            "const float4* nodes, index_t n_nodes, double centre_x, double centre_y, double scale, double a0, "
            "double a1, double a2, index_t height, index_t width, float* out",
            "height * ceil(width / TPS_PIXELS)",
        ),
        _entry(
            "apply_gradient_f32",
            "apply",
            "const float* data, const float* gradient, const float* scale, index_t channels, index_t height, "
            "index_t width, float white_level, int truncate, float* out, float* high, index_t row_stride, "
            "float* layer, unsigned char* valid",
            "channels * height * width",
        ),
        _entry(
            "noise_layer_f32",
            "apply",
            "const float* image, index_t height, index_t width, index_t row_stride, float* layer, unsigned char* valid",
            "ceil(height / row_stride) * width",
        ),
        _entry(
            "reject_combine_f32",
            "stack",
            "const float* values, const double* weights, index_t n_frames, index_t n_pixels, int method, "
            "const double* thresholds, int clip_low, int clip_high, double cutoff, const double* esd_lambda, "
            "index_t esd_stride, double esd_outliers, double esd_low_relaxation, const float* peak, "
            "const float* noise, const double* noise_scale, double signal_share, float* sorted, int* order, "
            "double* work, float* master, int* coverage, int* low_count, int* high_count, unsigned char* flags",
            "n_pixels",
        ),
    )
}

#: The kernel files, ``kernels/<family>.cu``.
FAMILIES = tuple(sorted({e.family for e in REGISTRY.values()}))

#: Pixels per item of ``tps_eval_f32`` (``TPS_PIXELS`` in tps.cu).
TPS_PIXELS = 4


def kernels_dir() -> Path:
    """The folder of the ``.cu`` files: inside the installed package, else the source tree's."""
    packaged = Path(__file__).resolve().parent / "kernels"
    if (packaged / "common.cuh").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "kernels"


def kernel_source(family: str) -> str:
    """The source of ``kernels/<family>.cu`` with a ``#line`` directive naming the file."""
    path = kernels_dir() / f"{family}.cu"
    if not path.is_file():
        raise KernelCompileError(f"{path}: kernel source not found (is the project's kernels/ folder installed?)")
    return f'#line 1 "{path}"\n' + path.read_text()


def launch_config(name: str, n_items: int, *, multiprocessors: int | None = None) -> tuple[int, int]:
    """Grid and block size of a 1-D grid-stride launch of ``name`` over ``n_items`` items.

    Parameters
    ----------
    name : str
        A key of :data:`REGISTRY`.

    n_items : int
        Items of the launch (see the entry's ``items``).

    multiprocessors : int, optional
        Multiprocessors of the device; the current CuPy device's when not given. The grid is
        at most ``BLOCKS_PER_MULTIPROCESSOR`` blocks per multiprocessor, enough to fill the
        device, and the kernels' grid-stride loops cover the rest.

    Returns
    -------
    grid, block : int
    """
    if name not in REGISTRY:
        raise KeyError(f"{name} is not a registered kernel")
    if multiprocessors is None:
        multiprocessors = _device_multiprocessors()
    blocks = max(1, -(-int(n_items) // BLOCK))
    return min(blocks, BLOCKS_PER_MULTIPROCESSOR * int(multiprocessors)), BLOCK


def _device_multiprocessors() -> int:
    import cupy

    device = cupy.cuda.Device()
    return int(device.attributes["MultiProcessorCount"])


@functools.cache
def _module(family: str, device_id: int):
    import cupy

    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(family), options=(*COMPILE_OPTIONS, f"-I{kernels_dir()}"))
        for entry in REGISTRY.values():  # compiles now, so that errors surface at load
            if entry.family == family:
                module.get_function(entry.name)
    return module


def function(name: str):
    """The compiled kernel ``name`` on the current CuPy device (compiled once per device)."""
    import cupy

    entry = REGISTRY[name]
    try:
        module = _module(entry.family, cupy.cuda.Device().id)
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(f"kernels/{entry.family}.cu does not compile:\n{exc}") from exc
    return module.get_function(name)


def kernel_arguments(name: str, args: tuple) -> tuple:
    """``args`` with scalars cast to the NumPy types of the entry's C parameters.

    Raises
    ------
    TypeError
        The number of arguments differs from the registry's signature.
    """
    entry = REGISTRY[name]
    if len(args) != len(entry.params):
        raise TypeError(f"{name} takes {len(entry.params)} arguments ({entry.signature}), got {len(args)}")
    out = []
    for (kind, _), value in zip(entry.params, args):
        out.append(SCALAR_TYPES[kind](value) if kind in SCALAR_TYPES else value)
    return tuple(out)


def launch(name: str, config: tuple[int, int], args: tuple) -> None:
    """Launch kernel ``name`` with ``(grid, block)`` from :func:`launch_config` on CuPy arrays.

    Pointer arguments are CuPy arrays (C-contiguous, of the kernel's dtype) or ``None`` for a
    null pointer; scalars are cast to the parameter types.
    """
    grid, block = config
    # A null pointer travels as 8 zero bytes, whatever the CuPy version does with None.
    prepared = tuple(np.uint64(0) if a is None else a for a in kernel_arguments(name, args))
    function(name)((grid,), (block,), prepared)


# -- compile check, without a GPU -----------------------------------------------------------------
@dataclass(frozen=True)
class CompileResult:
    """The outcome of compiling one family to PTX."""

    family: str
    compiler: str
    entries: tuple[str, ...]  # ".entry" symbols found in the PTX
    log: str


def _nvcc() -> str | None:
    return shutil.which("nvcc")


def _nvrtc_library() -> str | None:
    """``libnvrtc`` from the ``nvidia-cuda-nvrtc-cu12`` (or -cu13) wheel, else the system's."""
    for base in sys.path:
        for pattern in ("nvidia/cuda_nvrtc/lib/libnvrtc.so*", "nvidia/cu13/lib/libnvrtc.so*"):
            found = sorted(p for p in glob.glob(os.path.join(base, pattern)) if "builtins" not in p)
            if found:
                return found[0]
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


def available_compilers() -> list[str]:
    """The PTX compilers usable here: ``"nvcc"`` and/or ``"nvrtc"``."""
    return [name for name, found in (("nvcc", _nvcc()), ("nvrtc", _nvrtc_library())) if found]


def _compile_nvcc(path: Path, include: Path) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "out.ptx"
        source = Path(tmp) / path.name
        # Compile the same text the loader gives NVRTC, #line directive included.
        source.write_text(f'#line 1 "{path}"\n' + path.read_text())
        command = [
            _nvcc() or "nvcc",
            "-ptx",
            f"-arch={CHECK_ARCHITECTURE}",
            *COMPILE_OPTIONS,
            f"-I{include}",
            "-Werror",
            "all-warnings",
            "-o",
            str(ptx),
            str(source),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        log = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            raise KernelCompileError(f"nvcc failed on {path}:\n{log}")
        return ptx.read_text(), log


def _compile_nvrtc(path: Path, include: Path) -> tuple[str, str]:
    library = _nvrtc_library()
    if library is None:
        raise KernelCompileError("no NVRTC library found; pip install nvidia-cuda-nvrtc-cu12")
    nvrtc = ctypes.CDLL(library)

    def check(status: int, what: str) -> None:
        if status != 0:
            nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise KernelCompileError(f"NVRTC {what} failed on {path}: {nvrtc.nvrtcGetErrorString(status).decode()}")

    program = ctypes.c_void_p()
    source = f'#line 1 "{path}"\n' + path.read_text()
    check(
        nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), str(path).encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        options = [f"--gpu-architecture={CHECK_ARCHITECTURE}", *COMPILE_OPTIONS, f"-I{include}"]
        array = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = nvrtc.nvrtcCompileProgram(program, len(options), array)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, buffer)
        log = buffer.value.decode(errors="replace").strip()
        if status != 0 or "warning" in log:
            raise KernelCompileError(f"NVRTC failed on {path}:\n{log}")
        nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
        return ptx.value.decode(), log
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def compile_check(
    *, compiler: str = "auto", families: tuple[str, ...] = FAMILIES, directory: Path | None = None
) -> list[CompileResult]:
    """Compile every kernel family to PTX, without a GPU, and check its entry points.

    Parameters
    ----------
    compiler : {"auto", "nvcc", "nvrtc"}
        ``"auto"`` uses ``nvcc`` where it is on ``PATH`` and NVRTC otherwise.

    families : tuple of str
        Which ``kernels/<family>.cu`` files.

    directory : Path, optional
        Where the files are; :func:`kernels_dir` by default.

    Returns
    -------
    list of CompileResult

    Raises
    ------
    KernelCompileError
        No compiler is available, a file does not compile (warnings count as errors), or
        its PTX entry points differ from :data:`REGISTRY`.
    """
    directory = directory or kernels_dir()
    if compiler == "auto":
        found = available_compilers()
        if not found:
            raise KernelCompileError("neither nvcc nor NVRTC is available; pip install nvidia-cuda-nvrtc-cu12")
        compiler = found[0]
    run = {"nvcc": _compile_nvcc, "nvrtc": _compile_nvrtc}[compiler]
    results = []
    for family in families:
        path = directory / f"{family}.cu"
        ptx, log = run(path, directory)
        entries = tuple(sorted(re.findall(r"\.entry\s+(\w+)", ptx)))
        expected = tuple(sorted(e.name for e in REGISTRY.values() if e.family == family))
        if family in FAMILIES and entries != expected:
            raise KernelCompileError(
                f"{path}: PTX entry points {list(entries)} differ from the registry's {list(expected)}"
            )
        results.append(CompileResult(family, compiler, entries, log))
    return results


def describe_device() -> dict[str, Any]:
    """Name, memory and versions of the current CUDA device, for ``nsg info`` and benchmarks."""
    import cupy

    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    free, total = cupy.cuda.runtime.memGetInfo()
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    driver = cupy.cuda.runtime.driverGetVersion()
    return {
        "name": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "multiprocessors": int(props["multiProcessorCount"]),
        "clock_khz": int(props.get("clockRate", 0)),
        "memory_total_bytes": int(total),
        "memory_free_bytes": int(free),
        "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
        "cuda_driver": f"{driver // 1000}.{driver % 1000 // 10}",
        "cupy": cupy.__version__,
    }


class DeviceLauncher:
    """Launches registered kernels on the current CuPy device; stage modules take one of these.

    The tests' host emulation offers the same two methods on NumPy buffers, so the code that
    prepares a kernel's arguments is the same on the GPU and in the emulated tests.
    """

    def config(self, name: str, n_items: int) -> tuple[int, int]:
        """Grid and block for ``n_items`` items of kernel ``name`` (:func:`launch_config`)."""
        return launch_config(name, n_items)

    def __call__(self, name: str, config: tuple[int, int], args: tuple) -> None:
        launch(name, config, args)


#: The launcher of the CuPy backend.
DEVICE = DeviceLauncher()


def launcher_for(on_gpu: bool) -> DeviceLauncher | None:
    """The launcher a stage uses by default: :data:`DEVICE` for CuPy arrays, None (the NumPy
    twin) otherwise. The tests replace it to run whole pipelines through emulated kernels."""
    return DEVICE if on_gpu else None
