"""Batched sampling preparation for chat decode: a dispatching wrapper and its plain-torch `*_ref` twin.

`prepare_logits(logits, seen_ids, penalty, temperature, top_k)` does, for each of S rows at once and in
transformers' processor order (the order of `sampling/text.py`):
  1. repetition penalty (HF/CTRL semantics) over the ids of `seen_ids[s]` that lie in [0, V) — -1 pads
     are ignored, and an id listed twice is penalized once, as `apply_repetition_penalty`'s
     gather/scatter does;
  2. the greedy token: `argmax` of the penalized logits (first index of the maximum);
  3. temperature: divide by `temperature[s]` when it is > 0 (0 marks a greedy row, left unscaled);
  4. top-k when 0 < top_k[s] < V: everything below the k-th largest value becomes -inf (ties kept).
It returns `(processed fp32 logits [S, V], argmax int64 [S])`. Per-row parameters are device tensors, not
Python numbers, so one launch serves a batch of requests with different settings, nothing syncs with the
host, and a captured CUDA graph replays with new values.

Top-p is not fused: it needs the softmax mass in sorted order, i.e. a full sort of each 152k-entry row,
which torch's sort already does well; apply `sampling.text.apply_top_p` (or a batched torch version) to
the processed rows, then softmax + multinomial.

Dispatch: CUDA tensors go through `torch.ops.blip3o.prepare_logits`, a `torch.library.custom_op` (fake
impl included, so it traces under torch.compile and is captured by CUDA graphs) whose CUDA body is the
CUDA C++ kernel `kernels/cuda/sampling.cu` (NVRTC-compiled at first use, needs cuda-python); CPU tensors,
and any tensor under `ops.dispatch.reference_ops()`, call the ref directly. CUDA tensors also take the ref when cuda-python is not installed, or when
BLIP3O_DISABLE_CUDA_KERNELS=1 (read at import).
The kernel equals the ref bit for bit (IEEE division/multiplication, same selection rules).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from .dispatch import mode

_DISABLED = os.environ.get("BLIP3O_DISABLE_CUDA_KERNELS") == "1"

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _has_cuda_python() -> bool:
    """Whether cuda-python is installed (looked up, not imported: the kernel path imports it on first use)."""
    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except (ImportError, ValueError):  # no `cuda` package at all, or a broken one
        return False


def prepare_logits_ref(logits: Tensor, seen_ids: Tensor, penalty: Tensor, temperature: Tensor,
                       top_k: Tensor) -> tuple[Tensor, Tensor]:
    """logits `[S, V]` (fp32/bf16/fp16), seen_ids `[S, N]` int (-1 = pad), penalty / temperature `[S]`
    float, top_k `[S]` int -> (processed fp32 logits `[S, V]`, greedy argmax int64 `[S]`).

    Row s equals `apply_top_k(apply_repetition_penalty(logits[s].float(), ids, p) / t, k)` of
    sampling/text.py (ids = the valid entries of seen_ids[s]); the argmax is its greedy token."""
    x = logits.float()  # [S, V]
    s, v = x.shape
    ids = seen_ids.long()  # [S, N]
    # Invalid ids (pads) point at an extra column that is dropped again: one scatter serves every row.
    ids = torch.where((ids >= 0) & (ids < v), ids, v)
    padded = torch.cat([x, x.new_zeros(s, 1)], dim=1)  # [S, V + 1]
    picked = padded.gather(1, ids)  # [S, N]: original logits, so duplicates compute the same value
    p = penalty.float()[:, None]  # [S, 1]
    picked = torch.where(picked < 0, picked * p, picked / p)
    x = padded.scatter(1, ids, picked)[:, :v]  # [S, V]
    argmax = x.argmax(dim=-1)  # [S]

    t = temperature.float()
    x = x / torch.where(t > 0, t, torch.ones_like(t))[:, None]  # [S, V]; greedy rows: / 1, exact

    k = top_k.long()
    active = (k > 0) & (k < v)  # [S]
    if not x.is_cuda and not bool(active.any()):  # no row filters (a free host check on CPU): skip the sort
        return x, argmax
    kth = x.sort(dim=-1, descending=True).values.gather(1, (k.clamp(1, v) - 1)[:, None])  # [S, 1]
    x = x.masked_fill(active[:, None] & (x < kth), float("-inf"))
    return x, argmax


@torch.library.custom_op("blip3o::prepare_logits", mutates_args=())
def _prepare_logits_op(logits: Tensor, seen_ids: Tensor, penalty: Tensor, temperature: Tensor,
                       top_k: Tensor) -> tuple[Tensor, Tensor]:
    if logits.is_cuda and not _DISABLED and _has_cuda_python():
        from ..kernels.cuda import sampling  # imports cuda-python's launcher path on first use only

        return sampling.prepare_logits(logits, seen_ids, penalty, temperature, top_k)
    return prepare_logits_ref(logits, seen_ids, penalty, temperature, top_k)


@_prepare_logits_op.register_fake
def _(logits: Tensor, seen_ids: Tensor, penalty: Tensor, temperature: Tensor,
      top_k: Tensor) -> tuple[Tensor, Tensor]:
    s, v = logits.shape
    return logits.new_empty((s, v), dtype=torch.float32), logits.new_empty((s,), dtype=torch.int64)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"prepare_logits: {message}")


def prepare_logits(logits: Tensor, seen_ids: Tensor, penalty: Tensor, temperature: Tensor,
                   top_k: Tensor) -> tuple[Tensor, Tensor]:
    """Repetition penalty, greedy argmax, temperature and top-k for S rows at once (module docstring).

    logits `[S, V]` fp32/bf16/fp16; seen_ids `[S, N]` integer, -1 padded (N may be 0); penalty `[S]`
    float (> 0); temperature `[S]` float (0 = greedy row); top_k `[S]` integer (<= 0 or >= V: off);
    all on one device. Returns (fp32 `[S, V]` with masked entries -inf, int64 argmax `[S]`)."""
    _check(logits.dim() == 2 and logits.shape[1] > 0, f"logits must be [S, V] with V > 0, got {tuple(logits.shape)}")
    _check(logits.dtype in _LOGIT_DTYPES, f"logits must be fp32, bf16 or fp16, got {logits.dtype}")
    s = logits.shape[0]
    _check(seen_ids.dim() == 2 and seen_ids.shape[0] == s and not seen_ids.is_floating_point(),
           f"seen_ids must be an integer [{s}, N], got {tuple(seen_ids.shape)} {seen_ids.dtype}")
    for name, t, floating in (("penalty", penalty, True), ("temperature", temperature, True),
                              ("top_k", top_k, False)):
        _check(t.shape == (s,) and t.is_floating_point() == floating,
               f"{name} must be a {'float' if floating else 'integer'} [{s}], got {tuple(t.shape)} {t.dtype}")
    for name, t in (("seen_ids", seen_ids), ("penalty", penalty), ("temperature", temperature), ("top_k", top_k)):
        _check(t.device == logits.device, f"{name} is on {t.device}, logits on {logits.device}")
    if logits.is_cuda and mode() != "reference":
        return _prepare_logits_op(logits, seen_ids, penalty, temperature, top_k)
    return prepare_logits_ref(logits, seen_ids, penalty, temperature, top_k)


__all__ = ["prepare_logits", "prepare_logits_ref"]
