"""The text model's one forward (`run_layers`) over the paged attention backends, vs the dense reference.

The kernel backend (`PagedKernelAttention`: per-layer `llm_ops`, i.e. the Triton kernels — what runs on CUDA)
is run here in Triton's interpreter with the fused q/k/v views, the fused gate/up GEMM and the in-major
weights the engine's runner sets up; the CPU backend plans each step once (`ops/llm_cpu.py`). Both run the same three steps — a packed prefill of
two sequences, a mixed step (a prefill chunk beside a decode), then a pure decode step — and their logits
are compared with `Qwen2_5_VLTextModel` run on each whole sequence with its contiguous KV cache.

Tolerance: fp32, 2e-5 of the logits' scale. Every op differs from the reference only in summation order
(paged vs contiguous attention, fused and in-major GEMMs): each is within 16 ulps (tests/kernels), and two
layers of the tiny model compound that to ~1e-6 relative; 2e-5 leaves room without hiding a wrong wiring
(a wrong rotary position or K/V slot moves the logits by O(1)).
"""

from __future__ import annotations

import copy

import pytest
import torch

from blip3o_engine.config import preset_config
from blip3o_engine.models.blip3o import random_model
from blip3o_engine.ops import force_triton
from blip3o_engine.ops.attention import paged_attention
from blip3o_engine.runtime.model_runner import cpu_in_major

BLOCK = 4


@pytest.fixture(scope="module")
def text_model():
    return random_model(preset_config("tiny", vocab_size=97), seed=3).text


def _reference_logits(text, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one whole sequence through the reference module: [n, V]."""
    pos = torch.arange(len(ids)).expand(3, 1, -1)
    hidden = text(text.embed(torch.tensor(ids)[None]), pos, text.new_cache())  # [1, n, H]
    return text.compute_logits(hidden[0])


class PagedRun:
    """Two sequences on shuffled physical blocks; `step` runs their next chunks through the paged forward."""

    def __init__(self, text, seqs: list[list[int]]) -> None:
        self.text, self.seqs = text, seqs
        need = [-(-len(s) // BLOCK) for s in seqs]
        physical = torch.randperm(sum(need) + 2, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables = torch.full((len(seqs), max(need)), -1, dtype=torch.int32)
        it = iter(physical)
        for s, n in enumerate(need):
            self.tables[s, :n] = torch.tensor([next(it) for _ in range(n)], dtype=torch.int32)
        shape = (len(physical), BLOCK, text.cfg.num_key_value_heads, text.cfg.head_dim)
        self.caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in text.layers]
        self.cos_sin = text.rope_table(64)
        self.done = [0] * len(seqs)

    def step(self, new: list[int], decode: bool) -> torch.Tensor:
        """Computes `new[s]` more tokens of each sequence; returns the logits of each one's last token [S, V]."""
        ids, pos, slots, cu = [], [], [], [0]
        for s, n in enumerate(new):
            for p in range(self.done[s], self.done[s] + n):
                ids.append(self.seqs[s][p])
                pos.append(p)
                slots.append(int(self.tables[s, p // BLOCK]) * BLOCK + p % BLOCK)
            cu.append(cu[-1] + n)
            self.done[s] += n
        text = self.text
        positions = torch.tensor(pos, dtype=torch.int32).expand(3, -1).contiguous()
        attn = paged_attention(positions, self.cos_sin, text.cfg.mrope_section, torch.float32, self.caches,
                               torch.tensor(slots, dtype=torch.int32), self.tables,
                               torch.tensor(self.done, dtype=torch.int32),
                               None if decode else torch.tensor(cu, dtype=torch.int32), text.cfg.head_dim ** -0.5)
        h = text.run_layers(text.embed(torch.tensor(ids)), attn)  # [T, H]
        return text.compute_logits(text.norm(h[torch.tensor(cu[1:]) - 1]))


def _run_three_steps(text, seqs: list[list[int]]) -> list[torch.Tensor]:
    run = PagedRun(text, seqs)
    return [run.step([5, 9], decode=False),  # packed prefill, both end mid-block
            run.step([1, 8], decode=False),  # a decode (q_len 1) beside a chunk over a cached prefix
            run.step([1, 1], decode=True)]  # pure decode step


def _expected(text, seqs: list[list[int]]) -> list[torch.Tensor]:
    full = [_reference_logits(text, s) for s in seqs]  # [n, V] each
    return [torch.stack([full[0][4], full[1][8]]), torch.stack([full[0][5], full[1][16]]),
            torch.stack([full[0][6], full[1][17]])]


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-5 * w.abs().max().item())


def _sequences() -> list[list[int]]:
    """Token ids of a 7-token and an 18-token sequence (lengths after all three steps)."""
    return [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 18)]


@pytest.fixture(scope="module")
def fused_model(text_model):
    """A copy with the engine's fused projections and CPU in-major layout (the reference keeps its own)."""
    fused = copy.deepcopy(text_model)
    fused.fuse_projections(cpu_in_major)
    return fused


@torch.inference_mode()
def test_cpu_path_matches_the_reference_module(text_model, fused_model):
    seqs = _sequences()
    _assert_close(_run_three_steps(fused_model, seqs), _expected(text_model, seqs))


@torch.inference_mode()
def test_kernel_path_matches_the_reference_module(text_model, fused_model, launches):
    seqs = _sequences()
    with force_triton():
        got = _run_three_steps(fused_model, seqs)
    n = len(text_model.layers)
    # Every op of every layer of the three steps (2 prefill, 1 decode) ran as a kernel: nothing fell back.
    # Norms per step: the first input norm, 2n - 1 fused add+norms, the final norm.
    assert dict(launches) == {"paged_prefill_kernel": 2 * n, "paged_decode_kernel": n, "write_kv_cache_kernel": 3 * n,
                              "mrope_kernel": 3 * n, "swiglu_kernel": 3 * n, "rms_norm_kernel": 3 * (2 * n + 1)}
    _assert_close(got, _expected(text_model, seqs))
