"""Fused ops of the NextDiT block: a dispatching wrapper (`ops.dispatch`) and a plain-torch `*_ref` twin per op.

- `rms_norm_modulate(x, weight, scale, eps)`: `RMSNorm_w(x) * (1 + scale[:, None])`, AdaRMSNormZero's h;
- `gated_rms_residual(x, y, weight, gate, eps)`: `x + tanh(gate)[:, None] * RMSNorm_w(y)`, both residuals
  of NextDiTBlock;
- `layer_norm_rope(t, weight, bias, eps, cos, sin, num_heads)`: LayerNorm over D, split into heads, then
  the 2-D RoPE rotation — a block's queries and self-attention keys (cos = sin = None: no rotation, the
  cross-attention keys).
The SwiGLU product the feed-forward uses is `ops.norms.swiglu`, shared with the language model.

The twins are the model's formulas (models/dit.py calls these ops and has no copy of them); tests/kernels
checks the kernels against them in fp32 and fp16.

The kernel path goes through `torch.ops.blip3o.<name>`, a `torch.library.custom_op` with a fake impl, so it
traces under torch.compile and is captured by CUDA graphs. Inputs to the kernels may have any batch/token
strides (channel stride 1, else they are copied); outputs are always new contiguous tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import check, use_kernel
from .norms import rms_norm_ref


def _norm_kernels():
    from ..kernels.triton import dit_norms  # imported at the first kernel call (see ops.norms._kernels)

    return dit_norms


# ------------------------------------------------------------------------------------------------
# Reference twins: the block's formulas, with their fp32 upcasts and cast-back points.


def rms_norm_modulate_ref(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    """x `[B, N, D]`, weight `[D]`, scale `[B, D]` -> `[B, N, D]` (AdaRMSNormZero's h)."""
    return rms_norm_ref(x, weight, eps) * (1 + scale[:, None])


def gated_rms_residual_ref(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """x, y `[B, N, D]`, weight `[D]`, gate `[B, D]` (pre-tanh) -> `[B, N, D]` (NextDiTBlock's residuals)."""
    return x + gate[:, None].tanh() * rms_norm_ref(y, weight, eps)


def rope_2d_ref(h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of `h [B, N, H, d]` by cos/sin `[N, d/2]` in fp32, cast back:
    (a, b) -> (a·cos − b·sin, a·sin + b·cos), the complex product diffusers' Lumina RoPE computes."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, N, 1, d/2]
    a, b = h.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, d/2] each
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # [B, N, H, d/2, 2]
    return rotated.flatten(-2).to(h.dtype)


def layer_norm_rope_ref(t: Tensor, weight: Tensor, bias: Tensor, eps: float, cos: Tensor | None,
                        sin: Tensor | None, num_heads: int) -> Tensor:
    """t `[B, N, D]` -> `[B, N, H, d]`: LayerNorm over D, split into heads, `rope_2d_ref` unless cos is None."""
    h = F.layer_norm(t, (t.shape[-1],), weight, bias, eps).unflatten(-1, (num_heads, -1))  # [B, N, H, d]
    return h if cos is None else rope_2d_ref(h, cos, sin)


# ------------------------------------------------------------------------------------------------
# Custom ops around the Triton launchers (the kernel path only).


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


# ------------------------------------------------------------------------------------------------
# Public ops: validate (same rules on both paths), then dispatch.


def _check_rows(op: str, x: Tensor, vectors: dict[str, Tensor], per_batch: dict[str, Tensor]) -> None:
    """x `[B, N, D]`; each of `vectors` `[D]` and of `per_batch` `[B, D]`; one dtype and device for all."""
    check(x.dim() == 3, op, "expected x [B, N, D], got {}", tuple(x.shape))
    b, _, d = x.shape
    for name, v in vectors.items():
        check(v.shape == (d,), op, "{} must be [{}], got {}", name, d, tuple(v.shape))
    for name, v in per_batch.items():
        check(v.shape == (b, d), op, "{} must be [{}, {}], got {}", name, b, d, tuple(v.shape))
    for name, v in {**vectors, **per_batch}.items():
        check(v.dtype == x.dtype, op, "{} is {}, x is {}", name, v.dtype, x.dtype)
        check(v.device == x.device, op, "{} is on {}, x on {}", name, v.device, x.device)


def rms_norm_modulate(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    """x `[B, N, D]`, weight `[D]`, scale `[B, D]` -> RMSNorm_w(x) * (1 + scale[:, None]) `[B, N, D]`."""
    _check_rows("rms_norm_modulate", x, {"weight": weight}, {"scale": scale})
    if use_kernel(x):
        return _rms_norm_modulate_op(x, weight, scale, eps)
    return rms_norm_modulate_ref(x, weight, scale, eps)


def gated_rms_residual(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """x, y `[B, N, D]`, weight `[D]`, gate `[B, D]` pre-tanh -> x + tanh(gate)[:, None] * RMSNorm_w(y)."""
    _check_rows("gated_rms_residual", x, {"weight": weight}, {"gate": gate})
    check(y.shape == x.shape and y.dtype == x.dtype, "gated_rms_residual",
          "y {} {} must match x {} {}", tuple(y.shape), y.dtype, tuple(x.shape), x.dtype)
    if use_kernel(x):
        return _gated_rms_residual_op(x, y, weight, gate, eps)
    return gated_rms_residual_ref(x, y, weight, gate, eps)


def layer_norm_rope(t: Tensor, weight: Tensor, bias: Tensor, eps: float, cos: Tensor | None,
                    sin: Tensor | None, num_heads: int) -> Tensor:
    """t `[B, N, D]` -> LayerNorm over D (affine), heads `[B, N, H, d]`, 2-D RoPE by cos/sin `[N, d/2]`
    (`models.dit.rope_2d`); cos = sin = None: no rotation (cross-attention keys)."""
    op = "layer_norm_rope"
    _check_rows(op, t, {"weight": weight, "bias": bias}, {})
    _, n, d = t.shape
    check(num_heads > 0 and d % num_heads == 0 and (d // num_heads) % 2 == 0, op,
          "D={} must split into {} heads of even size", d, num_heads)
    check((cos is None) == (sin is None), op, "give both cos and sin, or neither")
    if cos is not None:
        half = d // num_heads // 2
        check(cos.shape == (n, half) and sin.shape == (n, half), op,
              "cos/sin must be [{}, {}], got {}, {}", n, half, tuple(cos.shape), tuple(sin.shape))
        check(cos.device == t.device and sin.device == t.device, op, "cos/sin must be on t's device")
    if use_kernel(t):
        return _layer_norm_rope_op(t, weight, bias, eps, cos, sin, num_heads)
    return layer_norm_rope_ref(t, weight, bias, eps, cos, sin, num_heads)


__all__ = [
    "rms_norm_modulate", "rms_norm_modulate_ref",
    "gated_rms_residual", "gated_rms_residual_ref",
    "layer_norm_rope", "layer_norm_rope_ref", "rope_2d_ref",
]
