"""FlowSampler on CUDA (skipped without a GPU): a captured chunk graph replays exactly what the eager chunk
computes, takes fresh inputs on every replay, allocates nothing, is bounded by the graph cache, splits long
schedules into windows, and bf16 tracks fp32."""

from __future__ import annotations

import pytest
import torch

from blip3o_engine import Engine
from blip3o_engine.runtime import reference
from blip3o_engine.runtime.flow_sampler import FlowSampler
from _gpu_util import graph_cache  # tests/gpu is on sys.path under pytest

pytestmark = pytest.mark.gpu

PROMPTS = ["a red apple on a wooden table", "a blue car", "a lighthouse at night, oil painting"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def engines(tiny_dir) -> dict[str, Engine]:
    return {name: Engine.from_pretrained(str(tiny_dir), device="cuda", dtype=name) for name in DTYPES}


@pytest.fixture(scope="module")
def conds(tiny_engine) -> torch.Tensor:
    return torch.stack([tiny_engine.encode_prompt(p) for p in PROMPTS])  # [3, Q, H] fp32 CPU


def make_noise(engine: Engine, batch: int, seed: int) -> torch.Tensor:
    c = engine.cfg.dit
    return torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(seed))


def sampler(engine: Engine, dtype: str, graphs: bool = True, **kw) -> FlowSampler:
    return FlowSampler(engine.model.dit, "cuda", DTYPES[dtype], graph_cache("dit", graphs, kw.pop("max_graphs", 8)),
                       **kw)


def eager_on_bucket(eager: FlowSampler, bucket: int, cond, noise, steps: int, guidance: float) -> torch.Tensor:
    """The eager loop on the same padded bucket as the graph (same GEMM shapes, so the same kernels)."""
    run = eager.begin(cond, noise, steps, guidance, bucket=bucket)
    eager.advance(run, steps)
    return eager.result(run)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_graph_replay_equals_eager(engines, conds, dtype, batch, guidance) -> None:
    engine = engines[dtype]
    graphed, eager = sampler(engine, dtype), sampler(engine, dtype, graphs=False)
    assert graphed.graphs.enabled and not eager.graphs.enabled
    cond, noise = conds[:batch], make_noise(engine, batch, seed=1)
    out = graphed.sample(cond, noise, 30, guidance)
    assert out.shape == (batch, engine.cfg.n_query, engine.cfg.dit.in_channels) and out.is_cuda
    # Same kernels on the same shapes (the bucket's padding included), so the replay is bit-exact.
    bucket = 1 << (batch - 1).bit_length()
    assert torch.equal(out, eager_on_bucket(eager, bucket, cond, noise, 30, guidance))
    # Padding rows do not leak into real rows: the unpadded eager run differs only by GEMM shapes.
    unpadded = eager.sample(cond, noise, 30, guidance)
    assert rel_err(out, unpadded) < (1e-5 if dtype == "float32" else 5e-2)


def test_long_schedules_replay_windows_of_a_bounded_graph(engines, conds) -> None:
    """A 70-step schedule with graphs of at most 32 steps: chunks of 32, 32 and 6 (two graphs), equal to the
    eager loop; the cache never holds more than its bound."""
    engine = engines["float32"]
    graphed = sampler(engine, "float32", max_unrolled_steps=32, max_graphs=2)
    eager = sampler(engine, "float32", graphs=False)
    noise = make_noise(engine, 2, seed=7)
    out = graphed.sample(conds[:2], noise, 70, 3.0)
    assert torch.equal(out, eager_on_bucket(eager, 2, conds[:2], noise, 70, 3.0))
    assert len(graphed.graphs) == 2 and graphed.graphs.num_captures == 2
    graphed.sample(conds[:1], noise[:1], 7, 3.0)  # a third shape evicts the least recently used graph
    assert len(graphed.graphs) == 2 and len(graphed._static) <= 2


def test_bf16_graph_tracks_fp32_reference(engines, tiny_engine, conds) -> None:
    noise = make_noise(tiny_engine, 3, seed=2)
    truth = reference.sample_clip_features(tiny_engine.model, conds, noise, 30, 3.0)  # fp32 CPU
    bf16 = engines["bfloat16"]
    feats = sampler(bf16, "bfloat16").sample(conds, noise, 30, 3.0)
    ref_bf16 = reference.sample_clip_features(bf16.model, conds.cuda(), noise.cuda(), 30, 3.0)
    # docs/ARCHITECTURE.md §7.9: no worse than twice the bf16 reference's own error against fp32.
    assert feats.dtype == torch.bfloat16
    assert rel_err(feats, truth) <= 2 * rel_err(ref_bf16, truth)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_second_request_gets_fresh_results(engines, conds, dtype) -> None:
    engine = engines[dtype]
    graphed, eager = sampler(engine, dtype), sampler(engine, dtype, graphs=False)
    noise_a, noise_b = make_noise(engine, 2, seed=3), make_noise(engine, 2, seed=4)
    first = graphed.sample(conds[:2], noise_a, 12, 3.0)
    kept = first.clone()
    second = graphed.sample(conds[1:], noise_b, 12, 3.0)  # same bucket: the same graph replays
    third = graphed.sample(conds[1:], noise_b, 12, 5.0)  # new guidance through the static buffer
    assert len(graphed.graphs) == 1
    assert torch.equal(second, eager.sample(conds[1:], noise_b, 12, 3.0))
    assert torch.equal(third, eager.sample(conds[1:], noise_b, 12, 5.0))
    assert rel_err(second, first) > 1e-1 and rel_err(third, second) > 1e-2
    assert torch.equal(first, kept)  # results are copies, not views of the graph's output


def test_replay_allocates_nothing_and_reports_every_step(engines, conds) -> None:
    engine = engines["bfloat16"]
    s = sampler(engine, "bfloat16")
    steps: list[tuple[int, int]] = []
    s.sample(conds[:2], make_noise(engine, 2, seed=5), 30, 3.0, callback=lambda i, n: steps.append((i, n)))
    assert steps == [(i, 30) for i in range(30)]  # called after the replay, once per step
    run = s.begin(conds[:2], make_noise(engine, 2, seed=6), 30, 3.0)
    key = next(iter(s.graphs._graphs))
    graph = s.graphs._graphs[key]
    s._static[key].copy_(s._chunk_inputs(run, 30))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert len(s.graphs) == 1  # captured once, replayed since
