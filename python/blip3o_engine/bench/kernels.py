"""`bench kernels`: one row per Triton / CUDA kernel against its torch twin, at the model's shapes.

Each case calls the public op of `blip3o_engine.ops` — the one dispatch point every model call goes
through — twice: under `dispatch_mode("kernel")` (backend "triton" or "cuda": the kernel the optimized
engine runs on a GPU) and under `reference_ops()` (backend "torch": the `*_ref` twin the reference backend
runs). `ratio_to_reference` is kernel / twin. Shapes come from the model and engine config: the LLM's ops at
the scheduler's token budget (prefill) or its max_num_seqs (decode), the DiT's at a full CFG image batch.

Cost per call: `bytes` = every tensor the op must read or write once (inputs, outputs, and for paged
attention the cached K/V of the contexts, not the whole pool), counted from the tensors themselves;
`flops` = the attention products of the paged attention ops (the other ops are elementwise: bytes only).
The rows carry the achieved GB/s (bytes / median) and, where there are FLOPs, TFLOP/s, and a floor from
the run's ceilings (copy bandwidth; the GEMM rate for the attention FLOPs).

On CPU nothing is timed: a Triton kernel runs there only in the interpreter (TRITON_INTERPRET=1), which
executes the kernel's Python per program instance and is no benchmark, and the CUDA kernel needs a GPU;
every row (kernel and twin) is emitted as skipped with that reason, so a CPU CSV says what was not
measured and why.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from ..models.dit import rope_2d
from ..ops.dispatch import HAS_TRITON, dispatch_mode, reference_ops
from .costs import Cost
from .timing import Timer, TimingPolicy

CPU_REASON = "CPU: the Triton interpreter is no benchmark; kernel rows are timed on CUDA only"
CPU_REASON_CUDA = "CPU: the CUDA sampling kernel needs a GPU; kernel rows are timed on CUDA only"
DECODE_CONTEXT = 1024  # tokens cached per sequence in the paged decode case
PREFILL_SEQS, PREFILL_PAST = 4, 512  # the paged prefill case: sequences, cached tokens before the new ones


@dataclass(frozen=True)
class KernelCase:
    """One kernel at one shape: `make()` builds the inputs and returns (the op call, its cost, shape notes)."""

    name: str  # the op (stage name)
    kernel: str  # "triton" | "cuda": the backend name of the kernel row
    make: Callable[[], tuple[Callable[[], object], Cost, tuple[str, ...]]]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kernel_unavailable(case: KernelCase, device: torch.device) -> str | None:
    """Why the kernel row of `case` cannot be timed here (None: it can)."""
    if device.type != "cuda":
        return CPU_REASON_CUDA if case.kernel == "cuda" else CPU_REASON
    if case.kernel == "triton" and not HAS_TRITON:
        return "triton is not installed: the ops run their torch twins"
    if case.kernel == "cuda":
        from ..ops import sampling_ops

        if os.environ.get("BLIP3O_DISABLE_CUDA_KERNELS") == "1":
            return "BLIP3O_DISABLE_CUDA_KERNELS=1: the CUDA sampling kernel is switched off"
        if not sampling_ops._has_cuda_python():
            return "cuda-python is not installed: the CUDA sampling kernel cannot be loaded (NVRTC)"
    return None


def kernel_cases(w) -> list[KernelCase]:
    """Every kernel of `kernels/` at the shapes of workload `w` (a `stages.Workload`)."""
    cfg, dev, dt = w.cfg, w.device, w.dtype
    sched, block = w.engine_config.scheduler, w.engine_config.cache.block_size
    t = cfg.text
    tokens, seqs = sched.max_num_batched_tokens, sched.max_num_seqs
    hq, hkv, d, h = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size

    cpu_gen = torch.Generator().manual_seed(w.settings.seed)  # for randperm, which draws on the host here

    def randn(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.randn(shape, generator=w.gen, device=dev, dtype=torch.float32).to(dtype)

    def rms_norm():
        x, weight = randn(tokens, h), 1 + 0.1 * randn(h)
        return (lambda: ops.rms_norm(x, weight, t.rms_norm_eps), Cost(bytes=2 * nbytes(x) + nbytes(weight)),
                (f"x=[{tokens}, {h}]",))

    def fused_add_rms_norm():
        x, res, weight = randn(tokens, h), randn(tokens, h), 1 + 0.1 * randn(h)
        return (lambda: ops.fused_add_rms_norm(x, res, weight, t.rms_norm_eps),
                Cost(bytes=4 * nbytes(x) + nbytes(weight)), (f"x=[{tokens}, {h}]",))

    def swiglu():
        gate_up = randn(tokens, 2 * t.intermediate_size)  # the LLM MLP's fused projection output
        return (lambda: ops.silu_and_mul(gate_up), Cost(bytes=nbytes(gate_up) * 3 // 2),
                (f"gate_up=[{tokens}, {2 * t.intermediate_size}]", "silu_and_mul"))

    def mrope():
        q, k = randn(tokens, hq, d), randn(tokens, hkv, d)
        table = ops.rope_cos_sin_cache(d, t.rope_theta, 4 * tokens, device=dev)  # fp32 [P, d]
        positions = torch.randint(0, 4 * tokens, (3, tokens), generator=w.gen, device=dev)
        lookups = tokens * d * table.element_size()  # each token reads d table values over its 3 sections
        return (lambda: ops.mrope_rotary(q, k, positions, table, t.mrope_section),
                Cost(bytes=2 * nbytes(q, k) + nbytes(positions) + lookups), (f"q=[{tokens}, {hq}, {d}]",))

    def write_kv():
        k, v = randn(tokens, hkv, d), randn(tokens, hkv, d)
        blocks = 2 * math.ceil(tokens / block)
        k_cache, v_cache = randn(blocks, block, hkv, d), randn(blocks, block, hkv, d)
        slots = torch.randperm(blocks * block, generator=cpu_gen)[:tokens].to(dev)
        return (lambda: ops.write_kv_cache(k, v, k_cache, v_cache, slots), Cost(bytes=2 * nbytes(k, v) + nbytes(slots)),
                (f"k=[{tokens}, {hkv}, {d}]", f"block_size={block}"))

    def paged_cache(lens: list[int]):
        """K/V caches holding sequences of `lens` tokens in shuffled blocks, their block tables and lens."""
        per_seq = [math.ceil(n / block) for n in lens]
        total = sum(per_seq)
        k_cache, v_cache = randn(total, block, hkv, d), randn(total, block, hkv, d)
        order = torch.randperm(total, generator=cpu_gen).to(torch.int32)
        table = torch.full((len(lens), max(per_seq)), -1, dtype=torch.int32)
        start = 0
        for s, n in enumerate(per_seq):
            table[s, :n] = order[start:start + n]
            start += n
        context = torch.tensor(lens, dtype=torch.int32)
        kv_read = 2 * sum(lens) * hkv * d * k_cache.element_size()
        return k_cache, v_cache, table.to(dev), context.to(dev), kv_read

    def paged_decode():
        k_cache, v_cache, table, context, kv_read = paged_cache([DECODE_CONTEXT] * seqs)
        q = randn(seqs, hq, d)
        flops = 4.0 * seqs * hq * d * DECODE_CONTEXT  # QK^T and AV
        return (lambda: ops.paged_decode_attention(q, k_cache, v_cache, table, context, d ** -0.5),
                Cost(flops=flops, bytes=kv_read + 2 * nbytes(q) + nbytes(table)),
                (f"seqs={seqs}", f"context={DECODE_CONTEXT}", f"heads={hq}/{hkv}x{d}"))

    def paged_prefill():
        new = max(1, tokens // PREFILL_SEQS)
        k_cache, v_cache, table, context, kv_read = paged_cache([PREFILL_PAST + new] * PREFILL_SEQS)
        q = randn(PREFILL_SEQS * new, hq, d)
        cu = torch.arange(0, PREFILL_SEQS * new + 1, new, dtype=torch.int32, device=dev)
        keys = PREFILL_SEQS * (new * PREFILL_PAST + new * (new + 1) / 2)  # causal: query i sees past + i + 1 keys
        return (lambda: ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, context, d ** -0.5),
                Cost(flops=4.0 * hq * d * keys, bytes=kv_read + 2 * nbytes(q) + nbytes(table)),
                (f"seqs={PREFILL_SEQS}", f"new={new}", f"past={PREFILL_PAST}", f"heads={hq}/{hkv}x{d}"))

    cases = [KernelCase("rms_norm", "triton", rms_norm),
             KernelCase("fused_add_rms_norm", "triton", fused_add_rms_norm),
             KernelCase("swiglu", "triton", swiglu),
             KernelCase("mrope_rotary", "triton", mrope),
             KernelCase("write_kv_cache", "triton", write_kv),
             KernelCase("paged_decode_attention", "triton", paged_decode),
             KernelCase("paged_prefill_attention", "triton", paged_prefill)]
    if cfg.can_generate_images:
        cases += _dit_cases(w, randn)

    def prepare_logits():
        v = t.vocab_size
        logits = randn(seqs, v)
        seen = torch.randint(0, v, (seqs, 256), generator=w.gen, device=dev)
        penalty = torch.full((seqs,), 1.1, device=dev)
        temperature = torch.full((seqs,), 0.7, device=dev)
        top_k = torch.full((seqs,), 50, dtype=torch.int64, device=dev)
        out = seqs * v * 4 + seqs * 8  # fp32 processed logits + int64 argmax
        return (lambda: ops.prepare_logits(logits, seen, penalty, temperature, top_k),
                Cost(bytes=nbytes(logits, seen, penalty, temperature, top_k) + out),
                (f"logits=[{seqs}, {v}]", "penalty=1.1", "temperature=0.7", "top_k=50"))

    return cases + [KernelCase("prepare_logits", "cuda", prepare_logits)]


def _dit_cases(w, randn) -> list[KernelCase]:
    """The NextDiT block's fused norms at a full CFG batch: R = 2 x max_image_batch rows of N tokens."""
    dit = w.cfg.dit
    rows, n, dim = 2 * w.engine_config.scheduler.max_image_batch, dit.num_tokens, dit.hidden_size
    eps = 1e-5
    shape = f"x=[{rows}, {n}, {dim}]"

    def modulate():
        x, weight, scale = randn(rows, n, dim), 1 + 0.1 * randn(dim), 0.1 * randn(rows, dim)
        return (lambda: ops.rms_norm_modulate(x, weight, scale, eps), Cost(bytes=2 * nbytes(x) + nbytes(weight, scale)),
                (shape,))

    def gated():
        x, y, weight, gate = randn(rows, n, dim), randn(rows, n, dim), 1 + 0.1 * randn(dim), randn(rows, dim)
        return (lambda: ops.gated_rms_residual(x, y, weight, gate, eps),
                Cost(bytes=3 * nbytes(x) + nbytes(weight, gate)), (shape,))

    def layer_norm_rope():
        x, weight, bias = randn(rows, n, dim), 1 + 0.1 * randn(dim), 0.1 * randn(dim)
        cos, sin = rope_2d(dit.input_size, dit.head_dim, dit.rope_theta, device=w.device)
        return (lambda: ops.layer_norm_rope(x, weight, bias, eps, cos, sin, dit.num_heads),
                Cost(bytes=2 * nbytes(x) + nbytes(weight, bias, cos, sin)), (shape, f"heads={dit.num_heads}"))

    return [KernelCase("rms_norm_modulate", "triton", modulate), KernelCase("gated_rms_residual", "triton", gated),
            KernelCase("layer_norm_rope", "triton", layer_norm_rope)]


def _run(fn: Callable[[], object], mode: str) -> Callable[[], object]:
    def call() -> object:
        with dispatch_mode(mode):
            return fn()
    return call


def run_kernels(w, timer: Timer, policy: TimingPolicy, log, emit, wanted: set[str] = frozenset()) -> list:
    """Time every case (kernel, then twin) on CUDA; on CPU emit every row as skipped (module docstring)."""
    from .stages import StageResult

    results = []
    for case in kernel_cases(w):
        if wanted and case.name not in wanted:
            continue
        reason = kernel_unavailable(case, w.device)
        if w.device.type != "cuda":
            rows = [StageResult(case.name, b, 1, None, None, skipped=reason) for b in (case.kernel, "torch")]
            log(f"  {case.name:<24} skipped ({reason})")
        else:
            call, cost, notes = case.make()
            rows = []
            for backend, mode in ((case.kernel, "kernel"), ("torch", "reference")):
                if backend == case.kernel and reason is not None:
                    rows.append(StageResult(case.name, backend, 1, None, cost, notes=notes, skipped=reason))
                    log(f"  {case.name:<24} {backend:<7} skipped ({reason})")
                    continue
                with torch.inference_mode():
                    timing = timer.measure(_run(call, mode), policy)
                what = "kernel" if mode == "kernel" else "torch twin (*_ref)"
                rows.append(StageResult(case.name, backend, 1, timing, cost, notes=(*notes, what)))
                log(f"  {case.name:<24} {backend:<7} median {timing.median_ms:9.4f} ms "
                    f"({cost.bytes / timing.median_ms / 1e6:,.0f} GB/s)")
            del call
        emit(rows)
        results += rows
    return results


__all__ = ["CPU_REASON", "CPU_REASON_CUDA", "KernelCase", "kernel_cases", "kernel_unavailable", "nbytes", "run_kernels"]
