"""CUDA C++ kernels of blip3o_engine (`blip3o_engine.kernels.cuda`).

Each `<name>.cu` here is CUDA C++ on raw pointers (no torch, no headers needed), compiled at first use by
NVRTC and launched with the driver API by `blip3o_engine.kernels.nvrtc`; `<name>.py` beside it is its
launcher (torch tensors in, torch tensors out, on torch's current stream).

- `sampling.cu` / `sampling.py`: `prepare_logits`, the batched repetition penalty + temperature + top-k
  + greedy argmax of chat decode (the wrapper and torch twin are in `blip3o_engine.ops.sampling_ops`).

The CI compile gate (`nvrtc.compile_all()`, run by tests/kernels/test_cuda_kernels.py) compiles every
`.cu` of this folder for sm_80 and sm_90 — the cubins an A100 and an H100/H200 load (`nvrtc.gate_archs()`)
— so a new file is covered without being registered.
"""
