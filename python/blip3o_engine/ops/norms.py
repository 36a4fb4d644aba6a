"""Ops both transformers share: RMSNorm (alone, or fused with the residual add before it) and the SwiGLU
product. Each has a dispatching wrapper (`ops.dispatch`) and its `*_ref` twin, which is THE formula: the
models call these, so a norm or an activation is written once in the package.

- `rms_norm(x, weight, eps)`: x `[..., H]` -> RMSNorm_w(x): variance and normalization in fp32, the
  normalized value rounded to x's dtype *before* the weight product (so half-precision results round
  twice, as Qwen2.5-VL and diffusers both do);
- `fused_add_rms_norm(x, residual, weight, eps)` -> (RMSNorm_w(x + residual), x + residual): a decoder
  layer's `residual = x + residual; h = norm(residual)` in one pass (the sum rounded to the dtype);
- `swiglu(gate, up)` -> silu(gate) * up: SiLU evaluated in fp32 and rounded, then the product rounded
  (what `F.silu(gate) * up` does on half tensors, and what the DiT's FP32SiLU does explicitly);
- `silu_and_mul(gate_up)`: the same over the two halves of one fused `[..., 2I]` projection.

The kernel path runs `kernels/triton/llm_norms.py` and `swiglu.py` through `torch.library.custom_op`s
with fake impls, so it traces under torch.compile and is captured by CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import check, use_kernel


def _kernels(name: str):
    """`blip3o_engine.kernels.triton.<name>`, imported at the first kernel call: importing a kernel module
    fixes whether `@triton.jit` interprets, which tests decide before that."""
    import importlib

    return importlib.import_module(f"..kernels.triton.{name}", __package__)


# ------------------------------------------------------------------------------------------------
# Twins


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x `[..., H]`, weight `[H]` -> RMSNorm_w(x), the rounding points of the module docstring."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(RMSNorm_w(x + residual), x + residual), the sum in the dtype."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: SiLU in fp32, cast back, times up."""
    return F.silu(gate.float()).to(gate.dtype) * up


def silu_and_mul_ref(gate_up: Tensor) -> Tensor:
    """`[..., 2I]` (gate | up) -> `[..., I]`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


# ------------------------------------------------------------------------------------------------
# Custom ops around the Triton launchers (the kernel path only). The norm kernels take `[T, H]`.


@torch.library.custom_op("blip3o::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _kernels("llm_norms").rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)


@_rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("blip3o::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = x.shape[-1]
    out, res = _kernels("llm_norms").fused_add_rms_norm(x.reshape(-1, h), residual.reshape(-1, h), weight, eps)
    return out.view(x.shape), res.view(x.shape)


@_fused_add_rms_norm_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("blip3o::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _kernels("swiglu").swiglu(gate, up)


@_swiglu_op.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape)


# ------------------------------------------------------------------------------------------------
# Public ops: validate (shapes only, no device reads), then dispatch.


def _check_norm(op: str, x: Tensor, weight: Tensor) -> None:
    if weight.shape == (x.shape[-1],) and weight.dtype == x.dtype and weight.device == x.device:
        return  # the hot path: one expression, messages only on failure
    check(x.dim() >= 1, op, "expected x [..., H], got a scalar")
    check(weight.shape == (x.shape[-1],), op, "weight must be [{}], got {}", x.shape[-1], tuple(weight.shape))
    check(weight.dtype == x.dtype, op, "weight is {}, expected {}", weight.dtype, x.dtype)
    check(weight.device == x.device, op, "weight is on {}, expected {}", weight.device, x.device)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x `[..., H]`, weight `[H]` -> RMSNorm_w(x) `[..., H]`."""
    _check_norm("rms_norm", x, weight)
    if use_kernel(x):
        return _rms_norm_op(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual `[..., H]`, weight `[H]` -> (normed, new_residual): new_residual = x + residual (in the
    dtype), normed = RMSNorm_w(new_residual)."""
    op = "fused_add_rms_norm"
    _check_norm(op, x, weight)
    if not (residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device):
        check(residual.shape == x.shape, op, "residual {} must match x {}", tuple(residual.shape), tuple(x.shape))
        check(False, op, "residual is {} on {}, expected {} on {}", residual.dtype, residual.device, x.dtype,
              x.device)
    if use_kernel(x):
        return _fused_add_rms_norm_op(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up `[..., F]` -> silu(gate) * up, same shape (SiLU in fp32, rounded, then the product)."""
    if not (gate.shape == up.shape and gate.dtype == up.dtype and gate.device == up.device and gate.dim() > 0):
        check(False, "swiglu", "gate {} {} and up {} {} must match", tuple(gate.shape), gate.dtype, tuple(up.shape),
              up.dtype)
    if use_kernel(gate):
        return _swiglu_op(gate, up)
    return swiglu_ref(gate, up)


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """gate_up `[..., 2I]` (gate | up, one fused projection) -> silu(gate) * up `[..., I]`. The kernel reads
    the two halves in place."""
    check(gate_up.dim() > 0 and gate_up.shape[-1] % 2 == 0, "silu_and_mul",
          "last dim must be even (gate | up), got {}", tuple(gate_up.shape))
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


__all__ = [
    "rms_norm", "rms_norm_ref", "fused_add_rms_norm", "fused_add_rms_norm_ref",
    "swiglu", "swiglu_ref", "silu_and_mul", "silu_and_mul_ref",
]
