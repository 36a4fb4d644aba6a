"""Ops: one Python wrapper per fused op. Each dispatches to `blip3o_engine.kernels` on GPU (through a
`torch.library.custom_op`, so it survives torch.compile and CUDA graphs) and has a plain-torch `*_ref`
twin that is the oracle and the CPU path.

- `dit_ops`: the NextDiT block's norms (rms_norm_modulate, gated_rms_residual, layer_norm_rope) and
  swiglu, plus `force_triton()`.
"""

from .dit_ops import (
    force_triton,
    gated_rms_residual,
    gated_rms_residual_ref,
    layer_norm_rope,
    layer_norm_rope_ref,
    rms_norm_modulate,
    rms_norm_modulate_ref,
    swiglu,
    swiglu_ref,
)

__all__ = [
    "force_triton",
    "rms_norm_modulate", "rms_norm_modulate_ref",
    "gated_rms_residual", "gated_rms_residual_ref",
    "layer_norm_rope", "layer_norm_rope_ref",
    "swiglu", "swiglu_ref",
]
