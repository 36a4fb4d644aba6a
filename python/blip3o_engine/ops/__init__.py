"""Ops: one Python wrapper per fused op. Each dispatches to `blip3o_engine.kernels` on GPU (through a
`torch.library.custom_op`, so it survives torch.compile and CUDA graphs) and has a plain-torch `*_ref`
twin that is the oracle and the CPU path.

- `dit_ops`: the NextDiT block's norms (rms_norm_modulate, gated_rms_residual, layer_norm_rope) and
  swiglu, plus `force_triton()`.
- `llm_ops`: the paged-KV language model's ops (write_kv_cache, paged_decode_attention,
  paged_prefill_attention, rms_norm, fused_add_rms_norm, mrope_rotary with rope_cos_sin_cache,
  silu_and_mul); its docstring documents the paged cache layout.
- `sampling_ops`: prepare_logits (batched repetition penalty, temperature, top-k, greedy argmax; the
  CUDA C++ kernel through NVRTC on GPU).
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
from .llm_ops import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    mrope_rotary,
    mrope_rotary_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    rms_norm,
    rms_norm_ref,
    rope_cos_sin_cache,
    silu_and_mul,
    silu_and_mul_ref,
    write_kv_cache,
    write_kv_cache_ref,
)
from .sampling_ops import prepare_logits, prepare_logits_ref

__all__ = [
    "force_triton",
    "rms_norm_modulate", "rms_norm_modulate_ref",
    "gated_rms_residual", "gated_rms_residual_ref",
    "layer_norm_rope", "layer_norm_rope_ref",
    "swiglu", "swiglu_ref",
    "write_kv_cache", "write_kv_cache_ref",
    "paged_decode_attention", "paged_decode_attention_ref",
    "paged_prefill_attention", "paged_prefill_attention_ref",
    "rms_norm", "rms_norm_ref",
    "fused_add_rms_norm", "fused_add_rms_norm_ref",
    "rope_cos_sin_cache", "mrope_rotary", "mrope_rotary_ref",
    "silu_and_mul", "silu_and_mul_ref",
    "prepare_logits", "prepare_logits_ref",
]
