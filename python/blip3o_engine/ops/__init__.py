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

from . import dit_ops, llm_ops, sampling_ops
from .dit_ops import *  # noqa: F403
from .llm_ops import *  # noqa: F403
from .sampling_ops import *  # noqa: F403

__all__ = [*dit_ops.__all__, *llm_ops.__all__, *sampling_ops.__all__]
