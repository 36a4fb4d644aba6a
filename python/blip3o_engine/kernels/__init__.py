"""Device kernels of blip3o_engine (`blip3o_engine.kernels`).

Every kernel lives in one place, the repository's top-level `kernels/` folder: `kernels/triton/*.py` (a
`@triton.jit` kernel plus its launcher) and `kernels/cuda/*.cu` (CUDA C++ taking raw pointers and a
stream, no torch), the latter compiled at first use by NVRTC through cuda-python and launched with the
driver API (`nvrtc.py`, here), so a plain install needs no nvcc. setup.py installs those two folders as
the subpackages `blip3o_engine.kernels.triton` and `blip3o_engine.kernels.cuda` of this package.
This package may import torch, triton and cuda-python, but never the rest of `blip3o_engine`; the Python
wrappers in `blip3o_engine.ops` dispatch here and carry the torch reference twins.

Why this file is not `kernels/__init__.py`: from the repository root Python puts the current directory
first on sys.path (`python -c`, `python -m pytest`, any script there), and a `kernels/__init__.py` there
would make the folder a regular top-level package `kernels` that hides PyPI's `kernels` (which
transformers >= 5.25 imports). Without it the folder is at most a namespace portion, which an installed
`kernels` always wins over and which transformers treats as "not installed" (tests/unit/test_packaging.py).

What is here:
- `triton/dit_norms.py`: the NextDiT block's per-token fused norms — `rms_norm_modulate` (AdaRMSNormZero),
  `gated_rms_residual` (tanh-gated RMSNorm residual), `layer_norm_rope` (q/k LayerNorm + 2-D RoPE);
- `triton/swiglu.py`: SiLU(gate) * up (the DiT feed-forward and the LLM's silu_and_mul);
- `triton/paged_attention.py`, `triton/kv_cache.py`, `triton/llm_norms.py`, `triton/mrope.py`: the
  paged-KV language-model path — decode and varlen prefill attention over a block table (GQA),
  KV-cache writes through a slot mapping, (fused add +) RMSNorm, M-RoPE rotary;
- `triton/__init__.py`: `KernelSpec` and `compile_all()`, the CI compile gate over every Triton kernel
  (sm_80, sm_90), run by tests/kernels/test_compile_gate.py;
- `nvrtc.py` (this folder) + `cuda/sampling.cu`: the NVRTC build/cache/launch layer and the fused batched
  logits-preparation kernel (repetition penalty, temperature, top-k, greedy argmax).
The wrappers and reference twins are in `blip3o_engine.ops` (`dit_ops`, `llm_ops`, `sampling_ops`).
"""
