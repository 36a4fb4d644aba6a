"""Fused ops of the NextDiT block: a dispatching wrapper and a plain-torch `*_ref` twin per op.

- `rms_norm_modulate(x, weight, scale, eps)`: `RMSNorm_w(x) * (1 + scale[:, None])`, AdaRMSNormZero's h;
- `gated_rms_residual(x, y, weight, gate, eps)`: `x + tanh(gate)[:, None] * RMSNorm_w(y)`, both residuals
  of NextDiTBlock;
- `layer_norm_rope(t, weight, bias, eps, cos, sin, num_heads)`: LayerNorm over D, split into heads, then
  `apply_rope` — DiTAttention.query, and key_value's keys (cos = sin = None: no rotation);
- `swiglu(gate, up)`: `silu(gate.float()).to(gate.dtype) * up`, FeedForward's inner product.

The `*_ref` twins repeat dit.py's formulas (this package may not import `models`, which sits above it),
so they equal the model's modules bit for bit (tests/kernels checks fp32 and fp16).

Dispatch: the Triton kernel (`blip3o_engine.kernels.triton`) when the input is a CUDA tensor and triton
is installed, or when forced (`force_triton()`, or BLIP3O_FORCE_TRITON=1 read at import; the CPU tests
force it, with TRITON_INTERPRET=1 so that the kernels run in Triton's interpreter); otherwise the ref.
The Triton path goes through `torch.ops.blip3o.<name>`, a `torch.library.custom_op` with a fake impl,
so it traces under torch.compile and is captured by CUDA graphs; the CPU path calls the ref directly,
without the custom-op dispatch overhead. The kernel modules are imported at the first Triton call, so
importing this module never fixes whether `@triton.jit` interprets.

Inputs to the Triton path may have any batch/token strides (channel stride 1, else they are copied);
outputs are always new contiguous tensors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_FORCE_TRITON = os.environ.get("BLIP3O_FORCE_TRITON") == "1"


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Route every op through its Triton kernel (or, with `enabled=False`, never) inside the block,
    whatever the device. On CPU tensors this needs TRITON_INTERPRET=1 set before the kernels load."""
    global _FORCE_TRITON
    previous = _FORCE_TRITON
    _FORCE_TRITON = enabled
    try:
        yield
    finally:
        _FORCE_TRITON = previous


def _use_triton(x: Tensor) -> bool:
    return _HAS_TRITON and (_FORCE_TRITON or x.is_cuda)


def _norm_kernels() -> ModuleType:
    from ..kernels.triton import dit_norms  # imported on first use, see the module docstring

    return dit_norms


def _swiglu_kernels() -> ModuleType:
    from ..kernels.triton import swiglu as swiglu_module

    return swiglu_module


# ------------------------------------------------------------------------------------------------
# Reference twins: dit.py's formulas, with its fp32 upcasts and its cast-back points.


def _rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`dit.RMSNorm.forward`: variance in fp32, normalized value cast to x's dtype, then times weight."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def rms_norm_modulate_ref(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    """x `[B, N, D]`, weight `[D]`, scale `[B, D]` -> `[B, N, D]` (AdaRMSNormZero's h)."""
    return _rms_norm_ref(x, weight, eps) * (1 + scale[:, None])


def gated_rms_residual_ref(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """x, y `[B, N, D]`, weight `[D]`, gate `[B, D]` (pre-tanh) -> `[B, N, D]` (NextDiTBlock's residuals)."""
    return x + gate[:, None].tanh() * _rms_norm_ref(y, weight, eps)


def layer_norm_rope_ref(t: Tensor, weight: Tensor, bias: Tensor, eps: float, cos: Tensor | None,
                        sin: Tensor | None, num_heads: int) -> Tensor:
    """t `[B, N, D]` -> `[B, N, H, d]`: LayerNorm over D, split into heads, `dit.apply_rope` by cos/sin
    `[N, d/2]` (from `dit.rope_2d`) unless cos is None."""
    h = F.layer_norm(t, (t.shape[-1],), weight, bias, eps).unflatten(-1, (num_heads, -1))  # [B, N, H, d]
    if cos is None:
        return h
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, N, 1, d/2]
    a, b = h.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, d/2] each: pairs (2j, 2j+1)
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # [B, N, H, d/2, 2]
    return rotated.flatten(-2).to(h.dtype)


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """`dit.FeedForward`'s inner product: SiLU in fp32, cast back, times up."""
    return F.silu(gate.float()).to(gate.dtype) * up


# ------------------------------------------------------------------------------------------------
# Custom ops around the Triton launchers (the Triton path only).


@torch.library.custom_op("blip3o::rms_norm_modulate", mutates_args=())
def _rms_norm_modulate_op(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    return _norm_kernels().rms_norm_modulate(x, weight, scale, eps)


@_rms_norm_modulate_op.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("blip3o::gated_rms_residual", mutates_args=())
def _gated_rms_residual_op(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    return _norm_kernels().gated_rms_residual(x, y, weight, gate, eps)


@_gated_rms_residual_op.register_fake
def _(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("blip3o::layer_norm_rope", mutates_args=())
def _layer_norm_rope_op(t: Tensor, weight: Tensor, bias: Tensor, eps: float, cos: Tensor | None,
                        sin: Tensor | None, num_heads: int) -> Tensor:
    return _norm_kernels().layer_norm_rope(t, weight, bias, eps, cos, sin, num_heads)


@_layer_norm_rope_op.register_fake
def _(t: Tensor, weight: Tensor, bias: Tensor, eps: float, cos: Tensor | None, sin: Tensor | None,
      num_heads: int) -> Tensor:
    b, n, d = t.shape
    return t.new_empty((b, n, num_heads, d // num_heads))


@torch.library.custom_op("blip3o::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _swiglu_kernels().swiglu(gate, up)


@_swiglu_op.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape)


# ------------------------------------------------------------------------------------------------
# Public ops: validate (same rules on both paths), then dispatch.


def _check(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{op}: {message}")


def _check_rows(op: str, x: Tensor, vectors: dict[str, Tensor], per_batch: dict[str, Tensor]) -> None:
    """x `[B, N, D]`; each of `vectors` `[D]` and of `per_batch` `[B, D]`; one dtype and device for all."""
    _check(x.dim() == 3, op, f"expected x [B, N, D], got {tuple(x.shape)}")
    b, _, d = x.shape
    for name, v in vectors.items():
        _check(v.shape == (d,), op, f"{name} must be [{d}], got {tuple(v.shape)}")
    for name, v in per_batch.items():
        _check(v.shape == (b, d), op, f"{name} must be [{b}, {d}], got {tuple(v.shape)}")
    for name, v in {**vectors, **per_batch}.items():
        _check(v.dtype == x.dtype, op, f"{name} is {v.dtype}, x is {x.dtype}")
        _check(v.device == x.device, op, f"{name} is on {v.device}, x on {x.device}")


def rms_norm_modulate(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    """x `[B, N, D]`, weight `[D]`, scale `[B, D]` -> RMSNorm_w(x) * (1 + scale[:, None]) `[B, N, D]`."""
    _check_rows("rms_norm_modulate", x, {"weight": weight}, {"scale": scale})
    if _use_triton(x):
        return _rms_norm_modulate_op(x, weight, scale, eps)
    return rms_norm_modulate_ref(x, weight, scale, eps)


def gated_rms_residual(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """x, y `[B, N, D]`, weight `[D]`, gate `[B, D]` pre-tanh -> x + tanh(gate)[:, None] * RMSNorm_w(y)."""
    _check_rows("gated_rms_residual", x, {"weight": weight}, {"gate": gate})
    _check(y.shape == x.shape and y.dtype == x.dtype, "gated_rms_residual",
           f"y {tuple(y.shape)} {y.dtype} must match x {tuple(x.shape)} {x.dtype}")
    if _use_triton(x):
        return _gated_rms_residual_op(x, y, weight, gate, eps)
    return gated_rms_residual_ref(x, y, weight, gate, eps)


def layer_norm_rope(t: Tensor, weight: Tensor, bias: Tensor, eps: float, cos: Tensor | None,
                    sin: Tensor | None, num_heads: int) -> Tensor:
    """t `[B, N, D]` -> LayerNorm over D (affine), heads `[B, N, H, d]`, 2-D RoPE by cos/sin `[N, d/2]`
    (`dit.rope_2d`); cos = sin = None: no rotation (cross-attention keys)."""
    op = "layer_norm_rope"
    _check_rows(op, t, {"weight": weight, "bias": bias}, {})
    _, n, d = t.shape
    _check(num_heads > 0 and d % num_heads == 0 and (d // num_heads) % 2 == 0, op,
           f"D={d} must split into {num_heads} heads of even size")
    _check((cos is None) == (sin is None), op, "give both cos and sin, or neither")
    if cos is not None:
        half = d // num_heads // 2
        _check(cos.shape == (n, half) and sin.shape == (n, half), op,
               f"cos/sin must be [{n}, {half}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
        _check(cos.device == t.device and sin.device == t.device, op, "cos/sin must be on t's device")
    if _use_triton(t):
        return _layer_norm_rope_op(t, weight, bias, eps, cos, sin, num_heads)
    return layer_norm_rope_ref(t, weight, bias, eps, cos, sin, num_heads)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up `[..., F]` -> silu(gate.float()).to(gate.dtype) * up, same shape."""
    _check(gate.shape == up.shape and gate.dtype == up.dtype and gate.device == up.device and gate.dim() > 0,
           "swiglu", f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    if _use_triton(gate):
        return _swiglu_op(gate, up)
    return swiglu_ref(gate, up)


__all__ = [
    "force_triton",
    "rms_norm_modulate", "rms_norm_modulate_ref",
    "gated_rms_residual", "gated_rms_residual_ref",
    "layer_norm_rope", "layer_norm_rope_ref",
    "swiglu", "swiglu_ref",
]
