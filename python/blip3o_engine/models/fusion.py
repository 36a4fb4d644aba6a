"""Fused projection weights that cost no memory: one `[sum(out), in]` matrix whose rows ARE the layers'.

Several linears reading the same input (q/k/v, gate/up, the DiT's q1/k1/v1/q2, SwiGLU's w1/w3) run as
one GEMM when their weights sit back to back in one matrix. Keeping a concatenated copy next to the
checkpoint modules would double those weights (1.45 GB bf16 for the released DiT alone); instead
`fuse_linears` builds the matrix once and re-points every layer's `weight` (and `bias`) to its rows —
contiguous views — and frees the originals. The checkpoint-named modules keep working unchanged (the
reference backend, tests and the loader's key names still see `q_proj.weight` etc.); only code that
wants the fused GEMM reads the returned matrix.

Calling it again on the same layers returns the same matrix without copying (several samplers or
runners may share one model), in the layout the first call chose. On CPU the LLM keeps its matrices in-major (see `fuse_linears`). The views share storage, so `safetensors.save_file` of a fused model's
state dict needs `save_model` (which handles shared tensors) or a `.contiguous()` copy per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _fused_group(linears: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None] | None:
    """The (weight, bias) an earlier `fuse_linears` call built for exactly these layers, if any."""
    group = getattr(linears[0], "_blip3o_fused", None)
    if group is not None and group[0] == tuple(map(id, linears)) and is_live(group[1], linears[0]):
        return group[1], group[2]
    return None


@torch.no_grad()
def fuse_linears(linears: Sequence[nn.Linear], in_major: bool = False) -> tuple[Tensor, Tensor | None]:
    """(weight `[sum(out_i), in]`, bias `[sum(out_i)]` or None) with `linears[i]`'s parameters re-pointed
    to rows `[sum(out_<i), sum(out_<=i))` of them. All layers must share in_features, dtype, device and
    whether they have a bias.

    in_major: store the matrix transposed (`[in, sum(out)]` contiguous; the returned weight and the
    layers' weights are transposed views of it). `F.linear` then runs `x @ Wᵀ` on a contiguous `Wᵀ`,
    which is what CPU BLAS is fastest at for one or two rows (a decode step): measured on the 2-core
    dev machine, MKL's `x @ Wᵀ` over a row-major W streams weights single-threaded at ~9.5 GB/s,
    over an in-major one at ~19 GB/s; from ~8 rows up both layouts are within 10%.
    """
    if not linears:
        raise ValueError("fuse_linears needs at least one layer")
    done = _fused_group(linears)
    if done is not None:
        return done
    first = linears[0]
    for lin in linears:
        if (lin.in_features != first.in_features or lin.weight.dtype != first.weight.dtype
                or lin.weight.device != first.weight.device or (lin.bias is None) != (first.bias is None)):
            raise ValueError("fused linears must share in_features, dtype, device and bias presence")
    if in_major:
        weight = torch.cat([lin.weight.detach().t() for lin in linears], dim=1).t()  # [sum(out), in], strides (1, sum(out))
    else:
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum(out), in] contiguous
    bias = None if first.bias is None else torch.cat([lin.bias.detach() for lin in linears])  # [sum(out)]
    start = 0
    for lin in linears:
        stop = start + lin.out_features
        lin.weight = nn.Parameter(weight[start:stop], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:stop], requires_grad=False)
        start = stop
    first._blip3o_fused = (tuple(map(id, linears)), weight, bias)
    return weight, bias


def is_live(fused: Tensor | None, first: nn.Linear) -> bool:
    """Whether `fused` (a matrix `fuse_linears` built, its first rows `first`'s weight) still holds the
    layers' weights: False once the module was converted (`.to(dtype)`, `.double()`), reloaded with
    `assign=True` or deep-copied and converted — then the layers' own weights are the truth and a caller
    runs them unfused. One pointer comparison: cheap enough for every forward."""
    if fused is None or torch.compiler.is_compiling():
        # Tracing (torch.export, dynamo): fake tensors have no pointer, and `fused` is a plain attribute that
        # a trace would bake in as a constant copy of the weights; the layers' own weights are the module's
        # parameters, which the exported program takes as its inputs.
        return False
    # A converted or reloaded weight is a new tensor with new storage, so the pointer alone tells.
    return fused.data_ptr() == first.weight.data_ptr()


__all__ = ["fuse_linears", "is_live"]
