"""CUDA C++ kernels (kernels/cuda/*.cu): the NVRTC compile gate, the loader, and `prepare_logits`.

- Compile gate (no GPU): every `.cu` compiles through the runtime's own NVRTC path for exactly the archs
  an A100 and an H100/H200 load (sm_80, sm_90), with no register spills; skipped, with the reason, only where cuda-python / libnvrtc are missing.
- CPU: `prepare_logits_ref` against sampling/text.py row by row (bitwise), its semantics (duplicate ids,
  pads, ties at the k-th value), the wrapper's checks, the custom op's fake impl, and the lazy import.
- GPU (`gpu` marker): the kernel against the ref, bit for bit (the kernel promises identical IEEE ops and
  selection rules), at the real vocabulary size, strided and 16-bit inputs, and under CUDA-graph capture.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from blip3o_engine.kernels import nvrtc
from blip3o_engine.ops.sampling_ops import prepare_logits, prepare_logits_ref
from blip3o_engine.params import SamplingParams
from blip3o_engine.sampling import text

VOCAB = 151_668  # Qwen2.5-VL's LM head
ENTRIES = {"sampling.cu": {"prepare_logits_f32", "prepare_logits_bf16", "prepare_logits_f16"}}


def _nvrtc_or_skip() -> tuple[int, int]:
    try:
        return nvrtc.nvrtc_version()
    except nvrtc.CudaError as exc:
        pytest.skip(f"NVRTC unavailable, compile gate not run: {exc}")


# ------------------------------------------------------------------------------------------------
# Compile gate and loader (no GPU).


def test_the_gate_builds_what_a100_and_h100_load():
    """`device_arch` picks the exact `sm_XY` cubin a GPU loads (an H100/H200 loads sm_90, never sm_90a), or
    PTX for a GPU newer than NVRTC; the gate must compile those very archs."""
    _nvrtc_or_skip()
    supported = nvrtc.supported_archs()
    assert nvrtc.GATE_CAPABILITIES == (80, 90)
    assert nvrtc.gate_archs() == ("sm_80", "sm_90")
    assert nvrtc.gate_archs() == tuple(nvrtc.arch_for_capability(cc, supported) for cc in (80, 90))
    assert nvrtc.arch_for_capability(86, [75, 80, 90]) == "compute_80"  # no exact cubin: PTX, JIT-compiled
    with pytest.raises(nvrtc.CudaError, match="older than"):
        nvrtc.arch_for_capability(70, [75, 80])


def test_every_cu_file_compiles_for_the_gate_archs():
    version = _nvrtc_or_skip()
    assert version[0] == 13, f"NVRTC {version}: the GPU driver is CUDA 13.0, pin nvidia-cuda-nvrtc==13.0.*"
    rows = nvrtc.compile_all()
    files = {p.name for p in nvrtc.cuda_sources()}
    assert files >= set(ENTRIES), "a known .cu file is missing from kernels/cuda"
    assert {(name, arch) for name, arch, _, _ in rows} == {(f, a) for f in files for a in nvrtc.gate_archs()}
    for name, arch, _, image in rows:
        assert image[:4] == b"\x7fELF", f"{name} {arch}: not a cubin"
        for entry in ENTRIES.get(name, ()):  # extern "C" names stay unmangled in the symbol table
            assert entry.encode() in image, f"{name} {arch}: entry {entry} missing"
    # No timed budget (it would fail on a loaded machine, not on a change): ~2 s per (file, arch) on 2 cores.


@pytest.mark.parametrize("capability", nvrtc.GATE_CAPABILITIES)
def test_sampling_kernels_do_not_spill(capability):
    """1024 threads per block caps registers at 64; a spill would put local-memory traffic in every pass."""
    _nvrtc_or_skip()
    arch = nvrtc.arch_for_capability(capability, nvrtc.supported_archs())
    log: list[str] = []
    source = (nvrtc.CUDA_DIR / "sampling.cu").read_text()
    nvrtc.compile_source(source, "sampling.cu", arch, options=["--ptxas-options=-v"], log=log)
    spills = [line for line in log[0].splitlines() if "spill" in line]
    assert len(spills) == len(ENTRIES["sampling.cu"]), log[0]
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in line for line in spills), log[0]


def test_compile_error_carries_the_nvrtc_log():
    _nvrtc_or_skip()
    with pytest.raises(nvrtc.NvrtcError, match=r"broken\.cu.*sm_80(.|\n)*undefined_thing"):
        nvrtc.compile_source('extern "C" __global__ void k() { undefined_thing(); }', "broken.cu", "sm_80")


def test_ptx_target_returns_ptx():
    _nvrtc_or_skip()
    ptx = nvrtc.compile_source('extern "C" __global__ void k(float* x) { x[0] = 1.f; }', "k.cu", "compute_80")
    assert b".target sm_80" in ptx and b".entry k" in ptx and ptx.endswith(b"\0")


def test_build_uses_the_disk_cache(tmp_path, monkeypatch):
    _nvrtc_or_skip()
    monkeypatch.setenv("BLIP3O_NVRTC_CACHE", str(tmp_path))
    first = nvrtc.build("sampling.cu", "sm_80")
    cached = tmp_path / nvrtc.cache_key("sampling.cu", "sm_80")
    assert cached.read_bytes() == first
    assert nvrtc.cache_key("sampling.cu", "sm_90a") != cached.name  # the arch is part of the key

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled although the cache holds the image")

    monkeypatch.setattr(nvrtc, "compile_source", no_compile)
    assert nvrtc.build("sampling.cu", "sm_80") == first


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path")
def test_no_driver_is_a_clean_error():
    _nvrtc_or_skip()
    with pytest.raises(nvrtc.CudaError, match="cuInit|cuDeviceGet|driver"):
        nvrtc.get_kernel("sampling.cu", "prepare_logits_f32", 0)


def test_imports_without_cuda_python(tmp_path):
    """The package imports, and the ops take the ref, where cuda-python is missing; the kernel layer then
    raises a CudaError that says what to install. A `cuda` package that raises on import hides the real one."""
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "__init__.py").write_text("raise ImportError('cuda-python hidden by the test')\n")
    script = (
        "import torch\n"
        "from blip3o_engine.ops import sampling_ops\n"
        "from blip3o_engine.kernels import nvrtc\n"
        "assert not sampling_ops._has_cuda_python()\n"
        "try:\n"
        "    nvrtc.compile_source('', 'x.cu', 'sm_80')\n"
        "except nvrtc.CudaError as exc:\n"
        "    assert 'pip install' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no CudaError')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# The reference twin on CPU.


def _batch(s: int, v: int, n: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Random logits and mixed per-row settings: greedy and sampled rows, penalties above and below 1,
    top-k off (0, -1, >= V), 1 and in between; seen ids with duplicates and -1 padding."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, v, generator=g) * 5).to(dtype)
    seen = torch.randint(0, v, (s, n), generator=g, dtype=torch.int32)
    if n >= 8:
        seen[:, 1] = seen[:, 0]  # a duplicate: must be penalized once
        seen[::2, -5:] = -1  # padding of the shorter histories
    cycle = lambda values: torch.tensor([values[i % len(values)] for i in range(s)])  # noqa: E731
    penalty = cycle([1.0, 1.3, 0.8, 1.1, 2.0])
    temperature = cycle([0.0, 0.7, 1.0, 1.6, 0.3, 0.0])
    top_k = cycle([0, 50, -1, 1, v, 7, v - 1]).to(torch.int32)
    tensors = (logits, seen, penalty, temperature, top_k)
    return tuple(t.to(device) for t in tensors)


def _text_row(logits, seen, penalty, temperature, top_k):
    """One row through sampling/text.py, as `select_next_token` does before softmax."""
    ids = seen[seen >= 0].long()
    x = text.apply_repetition_penalty(logits.float(), ids, float(penalty))
    greedy = int(torch.argmax(x))
    if temperature > 0:
        x = x / float(temperature)
    return text.apply_top_k(x, int(top_k)), greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ref_matches_text_sampling_row_by_row(dtype):
    batch = _batch(11, 997, 40, dtype)
    out, argmax = prepare_logits_ref(*batch)
    assert out.dtype == torch.float32 and argmax.dtype == torch.int64
    for s in range(out.shape[0]):
        expected, greedy = _text_row(*(t[s] for t in batch))
        # Bitwise: the same fp32 ops in the same order (division by a 0-dim vs a per-row tensor is IEEE
        # division either way on CPU).
        assert torch.equal(out[s], expected), f"row {s}"
        assert argmax[s] == greedy, f"row {s}"
        if batch[3][s] == 0:
            params = SamplingParams(temperature=0.0, repetition_penalty=float(batch[2][s]))
            assert argmax[s] == text.select_next_token(batch[0][s], params, batch[1][s][batch[1][s] >= 0].long(), None)


def test_ref_penalizes_duplicates_once_and_ignores_pads():
    logits = torch.tensor([[2.0, -2.0, 4.0, 1.0]])
    seen = torch.tensor([[0, 0, 1, 1, 1, -1, -1]], dtype=torch.int32)
    out, argmax = prepare_logits_ref(logits, seen, torch.tensor([2.0]), torch.tensor([0.0]),
                                     torch.tensor([0], dtype=torch.int32))
    assert out.tolist() == [[1.0, -4.0, 4.0, 1.0]]
    assert argmax.tolist() == [2]


def test_ref_top_k_keeps_ties_and_argmax_takes_the_first_maximum():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]])
    none = torch.empty(1, 0, dtype=torch.int32)
    out, argmax = prepare_logits_ref(logits, none, torch.tensor([1.0]), torch.tensor([1.0]),
                                     torch.tensor([3], dtype=torch.int32))
    inf = float("inf")
    assert out.tolist() == [[-inf, 3.0, 2.0, 3.0, 2.0, -inf]]  # the 3rd largest is 2.0: both 2.0s stay
    assert argmax.tolist() == [1]


def test_wrapper_on_cpu_is_the_ref_and_checks_inputs():
    batch = _batch(3, 101, 9, torch.bfloat16)
    out, argmax = prepare_logits(*batch)
    ref_out, ref_argmax = prepare_logits_ref(*batch)
    assert torch.equal(out, ref_out) and torch.equal(argmax, ref_argmax)
    logits, seen, penalty, temperature, top_k = batch
    with pytest.raises(ValueError, match="logits must be"):
        prepare_logits(logits[0], seen, penalty, temperature, top_k)
    with pytest.raises(ValueError, match="seen_ids"):
        prepare_logits(logits, seen.float(), penalty, temperature, top_k)
    with pytest.raises(ValueError, match="top_k"):
        prepare_logits(logits, seen, penalty, temperature, top_k.float())
    with pytest.raises(ValueError, match="temperature"):
        prepare_logits(logits, seen, penalty, temperature[:2], top_k)


def test_custom_op_schema_and_fake_impl():
    """opcheck runs the op on CPU (its ref body) and under fake tensors: shapes, dtypes, no aliasing."""
    batch = _batch(4, 257, 12, torch.float32)
    torch.library.opcheck(torch.ops.blip3o.prepare_logits.default, batch)


# ------------------------------------------------------------------------------------------------
# The kernel on a GPU.


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [VOCAB, 997, 33])  # real size; odd; fewer columns than threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_ref_bitwise(vocab, dtype):
    batch = _batch(13, vocab, 64, dtype, device="cuda", seed=vocab)
    out, argmax = prepare_logits(*batch)
    ref_out, ref_argmax = prepare_logits_ref(*batch)
    # Bitwise: exact upcasts, IEEE-rounded mul/div (no fast-math, no contraction), the same k-th value
    # and the same first-index argmax.
    assert torch.equal(out, ref_out)
    assert torch.equal(argmax, ref_argmax)


@pytest.mark.gpu
def test_kernel_ties_strided_rows_and_no_history():
    """Integer-valued logits (many ties at the k-th value and at the max), a strided [S, V] view of
    [S, L, V] (the last position of each sequence), and an empty seen list."""
    g = torch.Generator().manual_seed(1)
    full = torch.randint(-6, 7, (5, 3, 4099), generator=g).float().cuda()  # [S, L, V]
    logits = full[:, -1]  # [S, V], row stride L * V
    seen = torch.empty(5, 0, dtype=torch.int32, device="cuda")
    penalty = torch.ones(5, device="cuda")
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0], device="cuda")
    top_k = torch.tensor([3, 10, 100, 4098, 1], dtype=torch.int32, device="cuda")
    out, argmax = prepare_logits(logits, seen, penalty, temperature, top_k)
    ref_out, ref_argmax = prepare_logits_ref(logits.contiguous(), seen, penalty, temperature, top_k)
    assert torch.equal(out, ref_out) and torch.equal(argmax, ref_argmax)


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph():
    batch = _batch(6, 5003, 32, torch.bfloat16, device="cuda")
    prepare_logits(*batch)  # load the module before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, argmax = prepare_logits(*batch)
    fresh = _batch(6, 5003, 32, torch.bfloat16, device="cuda", seed=7)
    for static, new in zip(batch, fresh):
        static.copy_(new)
    graph.replay()
    ref_out, ref_argmax = prepare_logits_ref(*fresh)
    assert torch.equal(out, ref_out) and torch.equal(argmax, ref_argmax)
