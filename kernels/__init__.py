"""Device kernels of blip3o_engine, installed as `blip3o_engine.kernels`.

Every kernel lives here, in one place: `triton/*.py` (a `@triton.jit` kernel plus its launcher) and
`cuda/*.cu` (CUDA C++ taking raw pointers and a stream, no torch), the latter compiled at first use
by NVRTC through cuda-python and launched with the driver API, so a plain install needs no nvcc.
This package may import torch, triton and cuda-python, but never `blip3o_engine.*`; the Python
wrappers in `blip3o_engine.ops` dispatch here and carry the torch reference twins.

It is empty for now: the kernels arrive with the AR and generation work.
"""
