"""DiT block kernels (kernels/triton/dit_norms.py, swiglu.py) vs their torch twins (ops/dit_ops.py).

On CPU the kernels run in Triton's interpreter (fp32 and fp16 only: it gets bf16 wrong), on random,
odd-sized inputs whose batch/token strides are those of slices of fused projections. Every Triton test
counts the kernel launches, so a dispatch that silently fell back to the reference cannot pass. The
`*_ref` twins are themselves checked bit for bit against the modules of models/dit.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from blip3o_engine.config import DiTConfig
from blip3o_engine.models import dit
from blip3o_engine.kernels.triton.dit_norms import _tanh
from blip3o_engine import ops
from _kernel_util import randomized  # tests/kernels is on sys.path under pytest

EPS = 1e-5  # DiTConfig.norm_eps and dit.LAYER_NORM_EPS
# (B, N, D, heads): widths 60 and 84 leave masked tails in the power-of-two block; 1792 with 28 heads of
# 64 is the released DiT (B = 1 there: the interpreter's cost is per token, and B > 1 strides are covered
# by the others); N = 37 is not a square grid (RoPE rows sliced from a 7x7 table).
SHAPES = [(3, 64, 60, 3), (3, 37, 84, 7), (1, 64, 1792, 28)]
CPU_DTYPES = [torch.float32, torch.float16]


def make_inputs(b: int, n: int, d: int, heads: int, dtype: torch.dtype, device: str = "cpu",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs laid out as the sampler produces them: x a third of a fused [B, N, 3D] projection
    (token stride 3D), y token-major [N, B, D] transposed (batch stride D < token stride B*D), scale and
    gate two chunks of one [B, 4D] modulation matmul (batch stride 4D). cos/sin are rope_2d rows, fp32."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(device=device, dtype=dtype)

    grid = int(n**0.5 - 1e-9) + 1
    cos, sin = dit.rope_2d(grid, d // heads, 10000.0, device=torch.device(device))
    modulation = randn(b, 4 * d, std=0.8)  # |gate| spans both branches of the kernel's tanh (0.5 cut)
    return {
        "x": randn(b, n, 3 * d, std=2.0, mean=0.5)[..., d:2 * d],  # nonzero mean exercises LayerNorm's centering
        "y": randn(n, b, d, std=3.0).transpose(0, 1),
        "weight": randn(d, std=0.3, mean=1.0),
        "bias": randn(d, std=0.3),
        "scale": modulation[:, :d],
        "gate": modulation[:, d:2 * d],
        "cos": cos[:n],
        "sin": sin[:n],
    }


def _upcast(args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)


def assert_matches_ref(out: torch.Tensor, ref_fn, args: tuple) -> None:
    """Kernel output vs the torch reference on the same inputs.

    fp32: the two differ only in summation order (tree vs torch's vectorized sum, over <= 1792 values)
    and the last ulp of rsqrt/exp, amplified at most by RoPE's a·cos − b·sin cancellation: within
    8 fp32 ulps of the largest output (measured: <= 1.7).
    Half precision (docs/ARCHITECTURE.md §7.9): vs an fp32 oracle (the same formula on upcast inputs, ~2^13
    times finer than fp16), the kernel's error is at most 2x the reference's own; and since the kernel
    rounds at the reference's cast points, >= 99% of elements are bit-identical (the rest are last-ulp
    flips from rsqrt/exp/summation order; measured: at most 0.04% differ).
    """
    ref = ref_fn(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    if out.dtype == torch.float32:
        tol = 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()
        err = (out - ref).abs().max().item()
        assert err <= tol, f"fp32 max error {err:.3g} > {tol:.3g}"
        return
    oracle = ref_fn(*_upcast(args))
    err = (out.float() - oracle).abs().max().item()
    ref_err = (ref.float() - oracle).abs().max().item()
    assert err <= 2 * ref_err, f"{out.dtype}: kernel error {err:.3g} > 2 x reference error {ref_err:.3g}"
    identical = (out == ref).float().mean().item()
    assert identical >= 0.99, f"{out.dtype}: only {identical:.2%} of elements equal the reference"


# ------------------------------------------------------------------------------------------------
# Kernels in the CPU interpreter vs the references


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_modulate(shape, dtype, launches):
    i = make_inputs(*shape, dtype)
    args = (i["x"], i["weight"], i["scale"], EPS)
    with ops.force_triton():
        out = ops.rms_norm_modulate(*args)
    assert launches == {"rms_norm_modulate_kernel": 1}
    assert_matches_ref(out, ops.rms_norm_modulate_ref, args)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_rms_residual(shape, dtype, launches):
    i = make_inputs(*shape, dtype)
    args = (i["x"], i["y"], i["weight"], i["gate"], EPS)
    with ops.force_triton():
        out = ops.gated_rms_residual(*args)
    assert launches == {"gated_rms_residual_kernel": 1}
    assert_matches_ref(out, ops.gated_rms_residual_ref, args)


# Without RoPE only the rotation is skipped (the rounding points are shared), so fp32 suffices there.
@pytest.mark.parametrize("dtype,rope", [(torch.float32, True), (torch.float16, True), (torch.float32, False)],
                         ids=["fp32-rope", "fp16-rope", "fp32-no_rope"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_rope(shape, dtype, rope, launches):
    i = make_inputs(*shape, dtype)
    cos, sin = (i["cos"], i["sin"]) if rope else (None, None)
    args = (i["x"], i["weight"], i["bias"], EPS, cos, sin, shape[3])
    with ops.force_triton():
        out = ops.layer_norm_rope(*args)
    assert launches == {"layer_norm_rope_kernel": 1}
    assert_matches_ref(out, ops.layer_norm_rope_ref, args)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu(shape, dtype, launches):
    b, n, f, _ = shape
    fused = make_inputs(b, n, 2 * f, 2, dtype)["x"]  # [B, N, 2F] view: gate and up read in place, F = 60/84/1792
    gate, up = fused[..., :f], fused[..., f:]
    with ops.force_triton():
        out = ops.swiglu(gate, up)
    assert launches == {"swiglu_kernel": 1}
    assert_matches_ref(out, ops.swiglu_ref, (gate, up))


def test_channel_strided_inputs(launches):
    """Inputs whose channel stride is not 1 (here [B, D, N] transposed) are copied, then computed right."""
    b, n, d, heads = 2, 5, 24, 2
    i = make_inputs(b, n, d, heads, torch.float32)
    x = i["x"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, D], channel stride N
    scale = i["scale"].t().contiguous().t()  # [B, D], channel stride B
    with ops.force_triton():
        outs = [ops.rms_norm_modulate(x, i["weight"], scale, EPS),
                ops.gated_rms_residual(x, x, i["weight"], scale, EPS),
                ops.layer_norm_rope(x, i["weight"], i["bias"], EPS, i["cos"], i["sin"], heads),
                ops.swiglu(x, x)]
    refs = [ops.rms_norm_modulate_ref(x, i["weight"], scale, EPS),
            ops.gated_rms_residual_ref(x, x, i["weight"], scale, EPS),
            ops.layer_norm_rope_ref(x, i["weight"], i["bias"], EPS, i["cos"], i["sin"], heads),
            ops.swiglu_ref(x, x)]
    assert sum(launches.values()) == 4
    for out, ref in zip(outs, refs):
        # fp32, summation order / rsqrt ulp only (see assert_matches_ref).
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_empty_inputs(launches):
    """Zero tokens: an empty result without a (zero-sized) launch."""
    i = make_inputs(2, 4, 24, 2, torch.float32)
    x = i["x"][:, :0]
    with ops.force_triton():
        assert ops.rms_norm_modulate(x, i["weight"], i["scale"], EPS).shape == (2, 0, 24)
        assert ops.layer_norm_rope(x, i["weight"], i["bias"], EPS, i["cos"][:0], i["sin"][:0], 2).shape == (2, 0, 2, 12)
        assert ops.swiglu(x, x).shape == (2, 0, 24)
    assert sum(launches.values()) == 0



@triton.jit
def _tanh_probe_kernel(g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _tanh(tl.load(g_ptr + offs, mask=mask, other=0.0)), mask=mask)


def _tanh_max_ulps(device: str) -> float:
    """Max relative error of the kernels' libdevice-free tanh vs fp64 torch.tanh, in fp32 ulps (2^-23),
    over both branches, the 0.5 cut, tiny and saturated arguments."""
    mags = torch.cat([torch.linspace(0, 12, 6001), torch.logspace(-30, 1, 2001),
                      torch.tensor([0.5, 0.49999997, 0.50000006, 40.0])])
    g = torch.cat([mags, -mags]).to(device)
    out = torch.empty_like(g)
    _tanh_probe_kernel[(triton.cdiv(g.numel(), 4096),)](g, out, g.numel(), BLOCK=4096)
    exact = torch.tanh(g.double())
    rel = (out.double() - exact).abs() / exact.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return (rel.max() / 2**-23).item()


def test_tanh(interpreted):
    assert _tanh_max_ulps("cpu") <= 4  # exact exp (numpy): Taylor/Horner and (1-e)/(1+e) rounding only; measured 1.9

# ------------------------------------------------------------------------------------------------
# Dispatch, validation, custom ops


def test_cpu_dispatch_uses_the_reference(launches):
    """Without forcing, CPU tensors take the reference path: no launch, results identical to the refs."""
    i = make_inputs(3, 37, 84, 7, torch.float32)
    x, w, s = i["x"], i["weight"], i["scale"]
    assert torch.equal(ops.rms_norm_modulate(x, w, s, EPS), ops.rms_norm_modulate_ref(x, w, s, EPS))
    assert torch.equal(ops.gated_rms_residual(x, i["y"], w, s, EPS),
                       ops.gated_rms_residual_ref(x, i["y"], w, s, EPS))
    assert torch.equal(ops.layer_norm_rope(x, w, i["bias"], EPS, i["cos"], i["sin"], 7),
                       ops.layer_norm_rope_ref(x, w, i["bias"], EPS, i["cos"], i["sin"], 7))
    assert torch.equal(ops.swiglu(x, i["y"]), ops.swiglu_ref(x, i["y"]))
    with ops.force_triton(), ops.force_triton(False):  # nested: the inner setting wins, then restores
        ops.swiglu(x, x)
    assert sum(launches.values()) == 0
    with ops.force_triton():
        ops.swiglu(x, x)
    assert launches == {"swiglu_kernel": 1}


def test_env_var_forces_triton():
    """BLIP3O_FORCE_TRITON=1 (read at import) turns forcing on, as force_triton() does."""
    code = "from blip3o_engine.ops import dispatch; print(dispatch.mode())"
    env = {**os.environ, "BLIP3O_FORCE_TRITON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kernel"


def test_validation_errors():
    i = make_inputs(2, 4, 24, 2, torch.float32)
    x, w, s = i["x"], i["weight"], i["scale"]
    with pytest.raises(ValueError, match="x \\[B, N, D\\]"):
        ops.rms_norm_modulate(x[0], w, s, EPS)
    with pytest.raises(ValueError, match="scale must be"):
        ops.rms_norm_modulate(x, w, s[:1], EPS)
    with pytest.raises(ValueError, match="weight is torch.float16"):
        ops.gated_rms_residual(x, x, w.half(), s, EPS)
    with pytest.raises(ValueError, match="y .* must match"):
        ops.gated_rms_residual(x, x[:, :2], w, s, EPS)
    with pytest.raises(ValueError, match="heads of even size"):
        ops.layer_norm_rope(x, w, i["bias"], EPS, None, None, 5)
    with pytest.raises(ValueError, match="both cos and sin"):
        ops.layer_norm_rope(x, w, i["bias"], EPS, i["cos"], None, 2)
    with pytest.raises(ValueError, match="cos/sin must be"):
        ops.layer_norm_rope(x, w, i["bias"], EPS, i["cos"][:3], i["sin"][:3], 2)
    with pytest.raises(ValueError, match="must match"):
        ops.swiglu(x, x.half())


def _small_op_args() -> dict[str, tuple]:
    i = make_inputs(2, 3, 24, 2, torch.float32)
    return {
        "rms_norm_modulate": (i["x"], i["weight"], i["scale"], EPS),
        "gated_rms_residual": (i["x"], i["y"], i["weight"], i["gate"], EPS),
        "layer_norm_rope": (i["x"], i["weight"], i["bias"], EPS, i["cos"], i["sin"], 2),
        "layer_norm_rope_no_rope": (i["x"], i["weight"], i["bias"], EPS, None, None, 2),
        "swiglu": (i["x"], i["y"]),
    }


@pytest.mark.parametrize("case", list(_small_op_args()))
def test_opcheck(case, interpreted):
    """torch.library.opcheck: schema, fake impl vs real outputs (shape/dtype/strides), AOT dispatch."""
    op = getattr(torch.ops.blip3o, case.removesuffix("_no_rope")).default
    torch.library.opcheck(op, _small_op_args()[case])


def test_torch_compile_fullgraph(launches):
    """The Triton path traces into one graph (fake impls give the shapes) and runs the kernels."""
    i = make_inputs(2, 4, 24, 2, torch.float32)

    def block(x, y, w, b, scale, gate, cos, sin):
        h = ops.rms_norm_modulate(x, w, scale, EPS)
        q = ops.layer_norm_rope(h, w, b, EPS, cos, sin, 2)
        k = ops.layer_norm_rope(y, w, b, EPS, None, None, 2)
        return ops.gated_rms_residual(x, ops.swiglu(q, k).flatten(2), w, gate, EPS)

    args = (i["x"], i["y"], i["weight"], i["bias"], i["scale"], i["gate"], i["cos"], i["sin"])
    with ops.force_triton():
        eager = block(*args)
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(*args)
    assert sum(launches.values()) == 2 * 5
    assert torch.equal(compiled, eager)  # the same kernels on the same inputs


# ------------------------------------------------------------------------------------------------
# The references equal models/dit.py bit for bit


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_fused_block_equals_unfused(dtype):
    """models/dit.py calls these ops (their twins ARE its formulas, checked against diffusers in
    tests/parity/test_dit.py); what the engine changes is the layout: one [q1; k1; v1; q2] GEMM and one [w1; w3]
    GEMM per block (`fuse`), and the cross gate folded into V. A block in that layout equals the plain block:
    the same products in one wider GEMM, and softmax(qkᵀ)·(V·g) = (softmax(qkᵀ)·V)·g, both a few ulps apart."""
    cfg = DiTConfig(input_size=7, in_channels=16, hidden_size=84, num_heads=7, num_kv_heads=7,
                    ffn_hidden_size=96, caption_dim=32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, 84, generator=g).to(dtype)
    cp = torch.randn(3, 5, 84, generator=g).to(dtype)
    temb = torch.randn(3, cfg.time_embed_dim, generator=g).to(dtype)
    rope = tuple(t[:37] for t in dit.rope_2d(7, cfg.head_dim, cfg.rope_theta))
    with torch.no_grad():
        block = randomized(dit.NextDiTBlock(cfg), dtype, 2)
        mod = block.norm1.modulation(temb).transpose(0, 1)  # [4, B, D]
        plain = block(x, mod, torch.stack(block.cross_key_value(cp)), rope, gate_folded=False)
        block.fuse()
        assert block.qkvq is not None and block.feed_forward.w13 is not None
        fused = block(x, mod, torch.stack(block.cross_key_value(cp, fold_gate=True)), rope, gate_folded=True)
        with ops.reference_ops():  # the reference never takes the fused layout, even when it exists
            again = block(x, mod, torch.stack(block.cross_key_value(cp)), rope, gate_folded=False)
    assert torch.equal(again, plain)
    # fp32: ~1e-7 relative measured; fp16: products rounded at other points, a few ulps of the output scale.
    tol = 64 * torch.finfo(dtype).eps * plain.abs().max().item()
    torch.testing.assert_close(fused, plain, rtol=0, atol=tol)
    assert not torch.equal(plain, x)  # the block did something


# ------------------------------------------------------------------------------------------------
# GPU: compiled kernels at bf16 (and fp32), CUDA graphs, torch.compile


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_kernels_vs_ref(shape, dtype):
    i = make_inputs(*shape, dtype, device="cuda")
    heads, rope = shape[3], (i["cos"], i["sin"])
    cases = [
        (ops.rms_norm_modulate, ops.rms_norm_modulate_ref, (i["x"], i["weight"], i["scale"], EPS)),
        (ops.gated_rms_residual, ops.gated_rms_residual_ref, (i["x"], i["y"], i["weight"], i["gate"], EPS)),
        (ops.layer_norm_rope, ops.layer_norm_rope_ref, (i["x"], i["weight"], i["bias"], EPS, *rope, heads)),
        (ops.layer_norm_rope, ops.layer_norm_rope_ref, (i["x"], i["weight"], i["bias"], EPS, None, None, heads)),
        (ops.swiglu, ops.swiglu_ref, (i["x"], i["y"])),
    ]
    for op, ref, args in cases:
        assert_matches_ref(op(*args), ref, args)  # CUDA tensors dispatch to Triton without forcing



@pytest.mark.gpu
def test_gpu_tanh():
    # The GPU's exp is ex2.approx of a rounded x·log2(e): ~|2g|·2^-24 more error where e^-2|g| still counts.
    assert _tanh_max_ulps("cuda") <= 8

@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    """The ops capture into a CUDA graph and compile (inductor, fullgraph) with results equal to eager."""
    i = make_inputs(2, 64, 1792, 28, torch.bfloat16, device="cuda")

    def block(x, y, w, b, scale, gate, cos, sin):
        h = ops.rms_norm_modulate(x, w, scale, EPS)
        q = ops.layer_norm_rope(h, w, b, EPS, cos, sin, 28)
        k = ops.layer_norm_rope(y, w, b, EPS, None, None, 28)
        return ops.gated_rms_residual(x, ops.swiglu(q, k).flatten(2), w, gate, EPS)

    args = (i["x"], i["y"], i["weight"], i["bias"], i["scale"], i["gate"], i["cos"], i["sin"])
    eager = block(*args)
    assert torch.equal(torch.compile(block, fullgraph=True)(*args), eager)

    static = [a.clone() for a in args]
    block(*static)  # warm-up launch compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(*static)
    fresh = make_inputs(2, 64, 1792, 28, torch.bfloat16, device="cuda", seed=1)
    for s, name in zip(static, ["x", "y", "weight", "bias", "scale", "gate", "cos", "sin"]):
        s.copy_(fresh[name])
    graph.replay()
    assert torch.equal(out, block(*static))
