"""Launcher of `sampling.cu`'s `prepare_logits_{f32,bf16,f16}`: torch tensors in, torch tensors out.

Checks nothing the wrapper (`blip3o_engine.ops.sampling_ops.prepare_logits`) has checked already; it only
normalizes layouts (unit column stride for logits, contiguous int32/fp32 per-row tensors) and launches
one block per row on torch's current stream of the logits' device, with no host synchronization.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import nvrtc

THREADS = 1024  # must equal THREADS in sampling.cu
_ENTRY = {torch.float32: "prepare_logits_f32", torch.bfloat16: "prepare_logits_bf16",
          torch.float16: "prepare_logits_f16"}


def prepare_logits(logits: Tensor, seen_ids: Tensor, penalty: Tensor, temperature: Tensor,
                   top_k: Tensor) -> tuple[Tensor, Tensor]:
    """logits `[S, V]` (CUDA; fp32/bf16/fp16, any row stride), seen_ids `[S, N]` (-1 = pad), penalty and
    temperature `[S]`, top_k `[S]` -> (processed fp32 logits `[S, V]`, greedy argmax int64 `[S]`)."""
    s, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    seen = seen_ids.to(torch.int32).contiguous()  # [S, N]
    penalty = penalty.to(torch.float32).contiguous()  # [S]
    temperature = temperature.to(torch.float32).contiguous()  # [S]
    top_k = top_k.to(torch.int32).contiguous()  # [S]
    out = torch.empty((s, v), dtype=torch.float32, device=logits.device)  # [S, V]
    argmax = torch.empty((s,), dtype=torch.int64, device=logits.device)  # [S]
    if s == 0:
        return out, argmax
    device = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    kernel = nvrtc.get_kernel("sampling.cu", _ENTRY[logits.dtype], device)
    n_seen = seen.shape[1]
    args = [
        ctypes.c_void_p(logits.data_ptr()), ctypes.c_longlong(logits.stride(0)),
        ctypes.c_void_p(seen.data_ptr() if n_seen else 0), ctypes.c_int(n_seen),
        ctypes.c_void_p(penalty.data_ptr()), ctypes.c_void_p(temperature.data_ptr()),
        ctypes.c_void_p(top_k.data_ptr()), ctypes.c_int(v),
        ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(argmax.data_ptr()),
    ]
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    kernel.launch(grid=(s, 1, 1), block=(THREADS, 1, 1), args=args, stream=stream)
    return out, argmax
