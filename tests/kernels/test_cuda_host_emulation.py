"""kernels/cuda/sampling.cu run on the CPU: compiled unchanged by g++ through a host shim and compared with
its torch twin `prepare_logits_ref` bit for bit.

`cuda_host/cuda_host.h` emulates the CUDA built-ins the file uses (threads of a block as coroutines that
meet at `__syncthreads` and at the warp exchange of each shuffle, `__shared__` as statics, IEEE fp32
intrinsics); `cuda_host/sampling_host.cpp` includes the .cu and exports one launcher per entry. This checks
the kernel's own algorithm on a machine without a GPU — the exact upcasts, the repetition penalty over
duplicate and padded ids, the first-index argmax with its NaN rule, temperature, and the 11/11/10-bit radix
select of the k-th value with ties kept — which NVRTC's compile gate cannot. What it cannot check (timing,
races the barriers hide) is left to the `gpu` tests of test_cuda_kernels.py, which run the same source.

Bitwise: the shim maps __fmul_rn / __fdiv_rn to plain IEEE fp32 products and quotients (compiled with
-ffp-contract=off, no fast-math), the operations torch performs for the twin.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from blip3o_engine.kernels import nvrtc
from blip3o_engine.ops.sampling_ops import prepare_logits_ref

SHIM_DIR = Path(__file__).resolve().parent / "cuda_host"
ENTRIES = {torch.float32: "host_prepare_logits_f32", torch.bfloat16: "host_prepare_logits_bf16",
           torch.float16: "host_prepare_logits_f16"}


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory) -> ctypes.CDLL:
    """sampling.cu + the shim as a shared library (a few seconds of g++)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the CUDA host emulation needs a C++17 compiler")
    lib = tmp_path_factory.mktemp("cuda_host") / "libsampling_host.so"
    cmd = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
           f"-I{nvrtc.CUDA_DIR}", f"-I{SHIM_DIR}", str(SHIM_DIR / "sampling_host.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"g++ failed:\n{proc.stderr[-4000:]}"
    handle = ctypes.CDLL(str(lib))
    for name in ENTRIES.values():
        getattr(handle, name).restype = ctypes.c_char_p
    return handle


def _emulate(lib: ctypes.CDLL, logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor,
             temperature: torch.Tensor, top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch, as kernels/cuda/sampling.py does it, on host memory."""
    s, v = logits.shape
    assert logits.stride(1) == 1
    seen = seen.to(torch.int32).contiguous()  # [S, N]
    penalty, temperature = penalty.float().contiguous(), temperature.float().contiguous()  # [S]
    top_k = top_k.to(torch.int32).contiguous()  # [S]
    out = torch.empty(s, v, dtype=torch.float32)  # [S, V]
    argmax = torch.empty(s, dtype=torch.int64)  # [S]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    error = getattr(lib, ENTRIES[logits.dtype])(
        ctypes.c_int(s), ptr(logits), ctypes.c_longlong(logits.stride(0)),
        ptr(seen) if seen.shape[1] else ctypes.c_void_p(0), ctypes.c_int(seen.shape[1]), ptr(penalty),
        ptr(temperature), ptr(top_k), ctypes.c_int(v), ptr(out), ptr(argmax))
    assert error is None, error.decode()
    return out, argmax


def _assert_bitwise(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    (out, argmax), (ref_out, ref_argmax) = got, want
    # Bit patterns, not values: -0 vs +0 and NaN payloads count too.
    mismatch = (out.view(torch.int32) != ref_out.view(torch.int32)).nonzero()
    assert mismatch.numel() == 0, (f"{mismatch.shape[0]} differing elements, first at {mismatch[0].tolist()}: "
                                   f"{out[tuple(mismatch[0])]} vs {ref_out[tuple(mismatch[0])]}")
    assert torch.equal(argmax, ref_argmax), (argmax, ref_argmax)


def _batch(s: int, v: int, n: int, dtype: torch.dtype, seed: int):
    """Random logits (one row with a NaN) and mixed per-row settings: greedy and sampled rows, penalties
    above and below 1, top-k off (0, -1, >= V), 1, V - 1 and in between; seen ids with a duplicate and -1
    padding."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, v, generator=g) * 5).to(dtype)  # [S, V]
    logits[2, v // 3] = float("nan")  # argmax takes the NaN; top-k's k-th value is then NaN too or a number
    seen = torch.randint(0, v, (s, n), generator=g, dtype=torch.int32)  # [S, N]
    seen[:, 1] = seen[:, 0]  # a duplicate: penalized once
    seen[::2, -5:] = -1  # padding of the shorter histories
    cycle = lambda values: torch.tensor([values[i % len(values)] for i in range(s)])  # noqa: E731
    penalty = cycle([1.0, 1.3, 0.8, 1.1, 2.0])
    temperature = cycle([0.0, 0.7, 1.0, 1.6, 0.3, 0.0])
    top_k = cycle([0, 50, -1, 1, v, 7, v - 1, 3]).to(torch.int32)
    return logits, seen, penalty, temperature, top_k


@pytest.mark.parametrize("vocab", [33, 997, 5003])  # fewer columns than threads; odd; several per thread
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_the_torch_twin_bitwise(host_lib, dtype, vocab):
    batch = _batch(8, vocab, 16, dtype, seed=vocab)
    _assert_bitwise(_emulate(host_lib, *batch), prepare_logits_ref(*batch))


def test_kernel_at_the_real_vocabulary(host_lib):
    """Qwen2.5-VL's 151,668 logits: ~148 per thread, the radix select's digits spread over real bins."""
    batch = _batch(3, 151_668, 64, torch.bfloat16, seed=5)
    _assert_bitwise(_emulate(host_lib, *batch), prepare_logits_ref(*batch))


def test_kernel_with_ties_strided_rows_and_no_history(host_lib):
    """Integer-valued logits (many ties at the k-th value and at the max), a strided [S, V] view of
    [S, L, V] (the last position of each sequence), and an empty seen list (a null pointer)."""
    g = torch.Generator().manual_seed(1)
    full = torch.randint(-6, 7, (5, 3, 4099), generator=g).float()  # [S, L, V]
    logits = full[:, -1]  # [S, V], row stride L * V
    seen = torch.empty(5, 0, dtype=torch.int32)
    penalty = torch.ones(5)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0])
    top_k = torch.tensor([3, 10, 100, 4098, 1], dtype=torch.int32)
    got = _emulate(host_lib, logits, seen, penalty, temperature, top_k)
    _assert_bitwise(got, prepare_logits_ref(logits.contiguous(), seen, penalty, temperature, top_k))


def test_half_load_is_exact_for_every_bit_pattern(host_lib):
    """The fp16 upcast (plain C++, shared by the GPU build) against torch's, for all 65,536 halves."""
    halves = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)  # every bit pattern
    out = torch.empty(halves.numel(), dtype=torch.float32)
    host_lib.host_half_bits_to_float(ctypes.c_void_p(halves.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                     ctypes.c_longlong(halves.numel()))
    want = halves.view(torch.float16).float()
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))
