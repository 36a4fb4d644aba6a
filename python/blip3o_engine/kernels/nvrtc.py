"""Build and launch layer for the CUDA C++ kernels in `kernels/cuda/*.cu` (installed as
`blip3o_engine/kernels/cuda/`): NVRTC + the driver API.

Why this path: the CPU torch of CI cannot build CUDA extensions, and the GPU machine runs another Python
and torch, so the `.cu` sources ship as package data and are compiled at first use by NVRTC through
cuda-python (`cuda.bindings.nvrtc`), then loaded and launched with the driver API (`cuda.bindings.driver`)
on the caller's stream. No nvcc, no torch ABI. This module is torch-free: streams and device pointers are
plain ints (the launchers in `kernels/cuda/*.py` take them from torch).

- `compile_source(source, name, arch)` -> cubin (arch `sm_XY`/`sm_XYa`) or PTX (`compute_XY`) bytes; a
  failed compile raises `NvrtcError` with NVRTC's log. Needs no GPU: this is the CI compile gate's path.
- `build(filename, arch)` -> the same, from `kernels/cuda/<filename>`, through an on-disk cache keyed by
  the sha256 of the source (and every `.cuh` beside it), the arch, the NVRTC version and the options.
  Cache folder: $BLIP3O_NVRTC_CACHE, else ~/.cache/blip3o_engine/nvrtc; an unwritable folder only turns
  caching off.
- `get_kernel(filename, function, device)` -> a `CudaKernel` loaded (cuModuleLoadData +
  cuModuleGetFunction) into the device's primary context — the context torch uses — once per process
  (a cubin for the device's exact `sm_XY`, see `device_arch`);
  `CudaKernel.launch(grid, block, args, stream)` calls cuLaunchKernel, so it is captured by CUDA graphs.
- `compile_all(archs)`: every `.cu` of `kernels/cuda` for every arch, uncached (the CI gate); by default
  `gate_archs()`, the very archs `device_arch` picks on an A100 and an H100/H200 (`arch_for_capability`).

Finding NVRTC: `cuda.bindings` loads libnvrtc through `cuda.pathfinder`, which looks in site-packages
first, i.e. the `nvidia-cuda-nvrtc` wheel (`nvidia/cu13/lib/libnvrtc.so.13`), then the system (CUDA_HOME,
the loader path). The wheel is pinned to 13.0.* because the GPU driver is CUDA 13.0 (a newer NVRTC may
emit PTX that driver rejects; cubins, which `get_kernel` loads, do not have that problem, but the pin
keeps both paths safe). `cuda.bindings` is imported lazily, so importing this module never needs it.

Every CUDA result is checked; a failure raises `CudaError` (a RuntimeError) naming the call and the error,
so "no driver" (this machine, CI) is a clean, catchable error rather than a crash.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# The .cu sources: the folder of the `blip3o_engine.kernels.cuda` package (kernels/cuda in the repository,
# which setup.py maps there; beside this file once installed from a wheel).
CUDA_DIR = Path(importlib.util.find_spec(f"{__package__}.cuda").origin).resolve().parent

# The GPUs the project targets, by compute capability: A100 (8.0) and H100/H200 (9.0).
GATE_CAPABILITIES = (80, 90)

# Same for every build. No fast-math: the kernels promise bitwise equality with their torch twins, so
# division and sqrt stay IEEE round-to-nearest and denormals are kept (NVRTC's defaults, stated here).
BASE_OPTIONS = ("--std=c++17", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")

# Bump when the meaning of a cached file changes (options, naming), to orphan old entries.
_CACHE_FORMAT = "1"


class CudaError(RuntimeError):
    """A CUDA driver/NVRTC call failed, or cuda-python / a driver is not available."""


class NvrtcError(CudaError):
    """NVRTC could not compile a source; the message carries NVRTC's log."""


# ------------------------------------------------------------------------------------------------
# Lazy imports and result checking.


def _bindings() -> tuple[ModuleType, ModuleType]:
    """(cuda.bindings.nvrtc, cuda.bindings.driver), imported on first use."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as exc:
        raise CudaError("the CUDA C++ kernels need cuda-python and NVRTC: "
                        "pip install cuda-python 'nvidia-cuda-nvrtc==13.0.*'") from exc
    return nvrtc, driver


def _check(result: Any, what: str) -> Any:
    """Unpacks a cuda.bindings result `(status, *values)`; raises CudaError on a non-success status.

    Returns None, the single value, or the tuple of values."""
    status, *values = result if isinstance(result, tuple) else (result,)
    nvrtc, driver = _bindings()
    if isinstance(status, nvrtc.nvrtcResult):
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, text = nvrtc.nvrtcGetErrorString(status)
            raise CudaError(f"{what} failed: {status.name} ({text.decode(errors='replace')})")
    elif status != driver.CUresult.CUDA_SUCCESS:
        err, name = driver.cuGetErrorName(status)
        label = name.decode() if err == driver.CUresult.CUDA_SUCCESS else str(status)
        raise CudaError(f"{what} failed: {label}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _call(library: str, fn_name: str, *args: Any) -> Any:
    """Calls `cuda.bindings.<library>.<fn_name>(*args)` and checks its status (see `_check`). A library
    that cannot be loaded (no libnvrtc: the nvidia-cuda-nvrtc wheel is missing; no libcuda: no GPU driver
    on this machine) becomes a CudaError too."""
    module = dict(zip(("nvrtc", "driver"), _bindings()))[library]
    try:
        result = getattr(module, fn_name)(*args)
    except RuntimeError as exc:  # cuda.pathfinder's DynamicLibNotFoundError is a RuntimeError
        hint = ("pip install 'nvidia-cuda-nvrtc==13.0.*'" if library == "nvrtc"
                else "the CUDA driver (libcuda) is not available on this machine")
        raise CudaError(f"{fn_name}: {exc} ({hint})") from exc
    return _check(result, fn_name)


def _nvrtc_call(fn_name: str, *args: Any) -> Any:
    return _call("nvrtc", fn_name, *args)


def _driver_call(fn_name: str, *args: Any) -> Any:
    return _call("driver", fn_name, *args)


# ------------------------------------------------------------------------------------------------
# Compiling (no GPU needed).


def nvrtc_version() -> tuple[int, int]:
    """The loaded NVRTC's (major, minor)."""
    return _nvrtc_call("nvrtcVersion")


def supported_archs() -> list[int]:
    """The compute capabilities (75, 80, 90, ...) this NVRTC can compile for."""
    return list(_nvrtc_call("nvrtcGetSupportedArchs"))


def compile_source(source: str, name: str, arch: str, options: Sequence[str] = (),
                   include_dirs: Sequence[Path] = (), log: list[str] | None = None) -> bytes:
    """Compiles CUDA C++ `source` (file name `name`, for messages) for `arch`.

    arch `sm_80`, `sm_90a`, ...: returns a cubin (machine code, loads without the driver's JIT);
    arch `compute_80`, ...: returns NUL-terminated PTX. Raises NvrtcError with the compile log; on success
    the log (warnings, `--ptxas-options=-v` output) is appended to `log` when given."""
    opts = [*BASE_OPTIONS, f"--gpu-architecture={arch}", *options,
            *(f"--include-path={d}" for d in include_dirs)]
    prog = _nvrtc_call("nvrtcCreateProgram", source.encode(), name.encode(), 0, [], [])
    try:
        try:
            _nvrtc_call("nvrtcCompileProgram", prog, len(opts), [o.encode() for o in opts])
        except CudaError as exc:
            raise NvrtcError(f"NVRTC failed to compile {name} for {arch} ({exc}):\n{_program_log(prog)}") from None
        if log is not None:
            log.append(_program_log(prog))
        kind = "CUBIN" if arch.startswith("sm_") else "PTX"
        image = bytearray(_nvrtc_call(f"nvrtcGet{kind}Size", prog))  # NVRTC writes into it
        _nvrtc_call(f"nvrtcGet{kind}", prog, image)
        return bytes(image)
    finally:
        _nvrtc_call("nvrtcDestroyProgram", prog)


def _program_log(prog: Any) -> str:
    # A fresh bytearray, never `b" " * n`: that may be an interned bytes object, which NVRTC would overwrite.
    log = bytearray(_nvrtc_call("nvrtcGetProgramLogSize", prog))
    _nvrtc_call("nvrtcGetProgramLog", prog, log)
    return bytes(log).rstrip(b"\0 ").decode(errors="replace")


def cache_dir() -> Path:
    """$BLIP3O_NVRTC_CACHE, else ~/.cache/blip3o_engine/nvrtc."""
    env = os.environ.get("BLIP3O_NVRTC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "blip3o_engine" / "nvrtc"


def _source_digest(path: Path) -> str:
    """sha256 of the file and of every header of its folder (a header change must miss the cache)."""
    digest = hashlib.sha256(path.read_bytes())
    for header in sorted(path.parent.glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    return digest.hexdigest()


def cache_key(filename: str, arch: str, options: Sequence[str] = ()) -> str:
    """The cache file name of `kernels/cuda/<filename>` built for `arch` by the loaded NVRTC."""
    major, minor = nvrtc_version()
    digest = hashlib.sha256("\0".join([_CACHE_FORMAT, _source_digest(CUDA_DIR / filename), arch,
                                       f"{major}.{minor}", *BASE_OPTIONS, *options]).encode()).hexdigest()
    suffix = "cubin" if arch.startswith("sm_") else "ptx"
    return f"{Path(filename).stem}-{arch}-{digest[:24]}.{suffix}"


def build(filename: str, arch: str, options: Sequence[str] = ()) -> bytes:
    """`kernels/cuda/<filename>` compiled for `arch`, from the disk cache when there (see `cache_key`)."""
    path = cache_dir() / cache_key(filename, arch, options)
    try:
        return path.read_bytes()
    except OSError:
        pass
    source = CUDA_DIR / filename
    image = compile_source(source.read_text(), filename, arch, options, include_dirs=(CUDA_DIR,))
    try:  # write-then-rename: a concurrent reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(image)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a recompile per process
    return image


def cuda_sources() -> list[Path]:
    """Every `.cu` file of kernels/cuda, sorted."""
    return sorted(CUDA_DIR.glob("*.cu"))


def compile_all(archs: Sequence[str] | None = None) -> list[tuple[str, str, float, bytes]]:
    """The CI compile gate: compiles every `.cu` for every arch (default `gate_archs()`), bypassing the cache.

    Returns (file name, arch, seconds, image) rows; collects all failures, then raises NvrtcError naming
    every broken (file, arch) with its log."""
    archs = gate_archs() if archs is None else archs
    rows, failures = [], []
    for source in cuda_sources():
        for arch in archs:
            start = time.perf_counter()
            try:
                image = compile_source(source.read_text(), source.name, arch, include_dirs=(CUDA_DIR,))
            except NvrtcError as exc:
                failures.append(str(exc))
                continue
            rows.append((source.name, arch, time.perf_counter() - start, image))
    if failures:
        raise NvrtcError("\n\n".join(failures))
    return rows


# ------------------------------------------------------------------------------------------------
# Loading and launching (needs a GPU and its driver).

_lock = threading.Lock()
_contexts: dict[int, Any] = {}  # device ordinal -> its retained primary CUcontext
_modules: dict[tuple[str, int], Any] = {}  # (file, device) -> CUmodule, never unloaded
_kernels: dict[tuple[str, str, int], CudaKernel] = {}  # (file, function, device) -> kernel


def _primary_context(device: int) -> Any:
    """Makes `device`'s primary context — the one torch's runtime uses — current on this thread."""
    with _lock:
        ctx = _contexts.get(device)
        if ctx is None:
            _driver_call("cuInit", 0)
            dev = _driver_call("cuDeviceGet", device)
            ctx = _contexts[device] = _driver_call("cuDevicePrimaryCtxRetain", dev)  # kept for the process
    current = _driver_call("cuCtxGetCurrent")
    if current is None or int(current) != int(ctx):
        _driver_call("cuCtxSetCurrent", ctx)
    return ctx


def arch_for_capability(cc: int, supported: Sequence[int]) -> str:
    """The NVRTC arch built for a device of compute capability `cc` (80, 90, ...) by an NVRTC that supports
    `supported`: the exact `sm_XY` cubin when it knows cc, else PTX for the newest arch it knows below cc
    (the driver JIT-compiles that forward). Pure, so the CI gate builds exactly what `device_arch` picks."""
    known = [a for a in supported if a <= cc]
    if cc in known:
        return f"sm_{cc}"
    if not known:
        raise CudaError(f"sm_{cc} is older than every arch this NVRTC supports ({sorted(supported)})")
    return f"compute_{max(known)}"


def gate_archs() -> tuple[str, ...]:
    """What the CI gate compiles: the arch `device_arch` picks for each GPU of GATE_CAPABILITIES with the
    loaded NVRTC (sm_90, not sm_90a: an H100/H200 loads the plain sm_90 cubin)."""
    supported = supported_archs()
    return tuple(arch_for_capability(cc, supported) for cc in GATE_CAPABILITIES)


def device_arch(device: int) -> str:
    """The NVRTC arch to build for `device` (see `arch_for_capability`)."""
    attr = _bindings()[1].CUdevice_attribute
    dev = _driver_call("cuDeviceGet", device)
    major = _driver_call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = _driver_call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return arch_for_capability(10 * major + minor, supported_archs())


@dataclass(frozen=True)
class CudaKernel:
    """One `extern "C" __global__` function, loaded into a device's primary context."""

    name: str
    device: int
    function: Any  # CUfunction
    module: Any  # CUmodule, kept alive with the function

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int],
               args: Sequence[ctypes._SimpleCData], stream: int, shared_bytes: int = 0) -> None:
        """cuLaunchKernel on `stream` (a raw cudaStream_t/CUstream handle as int; 0 = legacy default).

        `args` are ctypes scalars in the kernel's parameter order and types (`c_void_p` for pointers,
        `c_int`, `c_longlong`, `c_float`, ...): the driver copies each from its address."""
        _primary_context(self.device)
        _, driver = _bindings()
        params = (ctypes.c_void_p * max(len(args), 1))(*[ctypes.addressof(a) for a in args])
        _driver_call("cuLaunchKernel", self.function, *grid, *block, shared_bytes, driver.CUstream(stream),
                     ctypes.addressof(params), 0)


def _load_module(filename: str, device: int) -> Any:
    """`kernels/cuda/<filename>` built for `device` (disk cache) and loaded into its primary context; once
    per (file, device) for the process. Call with `_lock` held and the context current."""
    key = (filename, device)
    if key not in _modules:
        image = ctypes.create_string_buffer(build(filename, device_arch(device)))  # a stable address
        _modules[key] = _driver_call("cuModuleLoadData", ctypes.addressof(image))
    return _modules[key]


def get_kernel(filename: str, function: str, device: int) -> CudaKernel:
    """`function` (an `extern "C"` name) of `kernels/cuda/<filename>`, ready to launch on `device`."""
    key = (filename, function, device)
    kernel = _kernels.get(key)
    if kernel is None:
        _primary_context(device)
        with _lock:
            module = _load_module(filename, device)
            func = _driver_call("cuModuleGetFunction", module, function.encode())
            kernel = _kernels[key] = CudaKernel(function, device, func, module)
    return kernel


__all__ = [
    "CUDA_DIR", "GATE_CAPABILITIES", "CudaError", "NvrtcError", "CudaKernel",
    "nvrtc_version", "supported_archs", "compile_source", "cache_dir", "cache_key", "build",
    "cuda_sources", "compile_all", "arch_for_capability", "gate_archs", "device_arch", "get_kernel",
]
