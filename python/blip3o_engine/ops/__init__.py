"""Ops: kernel wrappers and their plain-torch twins, behind one dispatch point (`ops.dispatch`).

Each public op validates its inputs and runs either its Triton/CUDA kernel (through a
`torch.library.custom_op`, so it survives torch.compile and CUDA graphs) or its `*_ref` twin, which is the
one written-down formula of that op: the models call these ops and hold no copy of them.

- `dispatch`: the mode ("auto" | "reference" | "kernel"), `reference_ops()`, `force_triton()`.
- `norms`: rms_norm, fused_add_rms_norm, swiglu, silu_and_mul (both transformers).
- `dit_ops`: the NextDiT block's fused norms (rms_norm_modulate, gated_rms_residual, layer_norm_rope).
- `llm_ops`: the paged-KV language model's ops (write_kv_cache, paged decode/prefill attention, M-RoPE);
  its docstring documents the paged cache layout.
- `llm_cpu`: the paged attention's CPU path, planned once per step.
- `attention`: the language model's attention backends (dense reference, paged kernels, paged CPU).
- `sampling_ops`: prepare_logits (batched repetition penalty, temperature, top-k, greedy argmax; the CUDA C++
  kernel through NVRTC on GPU).
"""

from . import dispatch, dit_ops, llm_ops, norms, sampling_ops
from .dispatch import force_triton, reference_ops
from .dit_ops import *  # noqa: F403
from .llm_ops import *  # noqa: F403
from .norms import *  # noqa: F403
from .sampling_ops import *  # noqa: F403

__all__ = ["force_triton", "reference_ops", *dit_ops.__all__, *llm_ops.__all__, *norms.__all__,
           *sampling_ops.__all__]
