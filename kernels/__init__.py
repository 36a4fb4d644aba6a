"""Device kernels of blip3o_engine, installed as `blip3o_engine.kernels`.

Every kernel lives here, in one place: `triton/*.py` (a `@triton.jit` kernel plus its launcher) and
`cuda/*.cu` (CUDA C++ taking raw pointers and a stream, no torch), the latter compiled at first use
by NVRTC through cuda-python and launched with the driver API, so a plain install needs no nvcc.
This package may import torch, triton and cuda-python, but never `blip3o_engine.*`; the Python
wrappers in `blip3o_engine.ops` dispatch here and carry the torch reference twins.

What is here:
- `triton/dit_norms.py`: the NextDiT block's per-token fused norms — `rms_norm_modulate` (AdaRMSNormZero),
  `gated_rms_residual` (tanh-gated RMSNorm residual), `layer_norm_rope` (q/k LayerNorm + 2-D RoPE);
- `triton/swiglu.py`: the DiT feed-forward's SiLU(gate) * up;
- `triton/__init__.py`: `KernelSpec` and `compile_all()`, the CI compile gate over every Triton kernel
  (sm_80, sm_90), run by tests/kernels/test_compile_gate.py.
The wrappers and reference twins are in `blip3o_engine.ops.dit_ops`. No CUDA C++ kernels yet.
"""
