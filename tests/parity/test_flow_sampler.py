"""FlowSampler (runtime/flow_sampler.py) vs the reference stage-1 loop, CPU fp32, tiny checkpoint.

The sampler computes the same function as `reference.sample_clip_features` in a different order
(hoisted condition and tables, fused GEMMs, the cross gate folded into V), so in fp32 it cannot be
bit-identical. The tolerance follows docs/ARCHITECTURE.md §7.9: against a float64 run of the same loop, the
sampler's error must be at most twice the fp32 reference's own error.
"""

from __future__ import annotations

import copy

import pytest
import torch

from blip3o_engine.errors import InputError
from blip3o_engine.runtime import reference
from blip3o_engine.runtime.cuda_graphs import batch_buckets, bucket_for
from blip3o_engine.runtime.flow_sampler import ChunkInputs, FlowSampler
from blip3o_engine.sampling.flow_match import flow_match_sigmas

PROMPTS = ["a red apple on a wooden table", "a blue car", "a lighthouse at night, oil painting"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model(tiny_engine):
    return tiny_engine.model


@pytest.fixture(scope="module")
def conds(tiny_engine) -> torch.Tensor:
    return torch.stack([tiny_engine.encode_prompt(p) for p in PROMPTS])  # [3, Q, H]


@pytest.fixture(scope="module")
def noise(model) -> torch.Tensor:
    c = model.cfg.dit
    return torch.randn(3, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def sampler(model) -> FlowSampler:
    return FlowSampler(model.dit, "cpu", torch.float32)


@pytest.fixture(scope="module")
def dit64(model):
    return copy.deepcopy(model.dit).double()


def sample_fp64(dit64, cond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """The reference loop (same int timesteps, σ table, CFG) entirely in float64: the error yardstick."""
    sigmas, timesteps = flow_match_sigmas(steps)
    sigmas, t = sigmas.double(), timesteps.to(torch.int64)
    x, cond = noise.double(), cond.double()
    caption = torch.cat([torch.zeros_like(cond), cond]) if guidance > 1 else cond
    with torch.no_grad():
        for i in range(steps):
            x_in = torch.cat([x, x]) if guidance > 1 else x
            v = dit64(x_in, t[i].expand(x_in.shape[0]), caption)
            if guidance > 1:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x.flatten(2).transpose(1, 2)  # [B, Q, C]


# Every pair of (batch 1/3, CFG on/off, 30/odd 7 steps) occurs once: a pairwise covering set of 4 runs
# instead of all 8 (each costs a float64 loop).
@pytest.mark.parametrize(("batch", "guidance", "steps"), [(3, 3.0, 30), (1, 3.0, 7), (1, 1.0, 30), (3, 1.0, 7)])
def test_features_match_reference(model, sampler, dit64, conds, noise, batch, guidance, steps) -> None:
    cond, z = conds[:batch], noise[:batch]
    expected = reference.sample_clip_features(model, cond, z, steps, guidance)
    feats = sampler.sample(cond, z, steps, guidance)
    truth = sample_fp64(dit64, cond, z, steps, guidance)
    assert feats.shape == expected.shape == (batch, model.cfg.n_query, model.cfg.dit.in_channels)
    assert feats.dtype == torch.float32
    # fp32, different summation order: no worse than 2x the reference's own fp32 error (docs/ARCHITECTURE.md §7.9).
    # Measured: ratio 0.7-1.1, both ~2e-7 (no CFG) to ~7e-7 (CFG 3 amplifies the difference by 5).
    ref_err = rel_err(expected, truth)
    assert 0 < ref_err < 1e-5
    assert rel_err(feats, truth) <= 2 * ref_err


def test_rows_are_independent(sampler, conds, noise) -> None:
    batched = sampler.sample(conds, noise, 7, 3.0)  # [3, Q, C]
    for row in range(3):
        single = sampler.sample(conds[row:row + 1], noise[row:row + 1], 7, 3.0)
        # fp32 GEMM blocking depends on the row count: ulp-level per op, the size of the fp32 loop's own
        # error (measured ~4e-7 relative after 7 CFG steps; the reference's own is ~5e-7, see above).
        # A leak between rows (wrong null/cond pairing, shared tables) would be O(1).
        assert rel_err(batched[row:row + 1], single) < 2e-6
    assert rel_err(batched[0], batched[1]) > 1e-2  # the rows really differ


def test_padded_bucket_rows_equal_unpadded(sampler, conds, noise) -> None:
    """The graph path pads a batch to its bucket with null rows; checked here through the eager loop."""
    assert [bucket_for(b, batch_buckets(16)) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6] and bucket_for(7, batch_buckets(6)) is None
    for guidance in (3.0, 1.0):
        padded = sampler.begin(conds, noise, 7, guidance, bucket=4)
        rows = 8 if guidance > 1 else 4
        assert padded.kv.shape[2] == padded.caption_emb.shape[0] == rows
        assert padded.x.shape[0] == 4 and not padded.x[3].any()
        sampler.advance(padded, 7)
        out = sampler.result(padded)
        unpadded = sampler.begin(conds, noise, 7, guidance)
        sampler.advance(unpadded, 7)
        # As test_rows_are_independent: only the row count differs (measured: bitwise equal here).
        assert out.shape[0] == 3 and rel_err(out, sampler.result(unpadded)) < 2e-6


def test_chunks_give_the_whole_loop(sampler, conds, noise) -> None:
    """The step loop advances a DiT batch a few steps per engine step: chunks of 3 (and one of 1) give what
    one 7-step chunk gives, and a chunk's tables are the whole schedule's rows (so, bitwise here)."""
    whole = sampler.begin(conds[:2], noise[:2], 7, 3.0)
    sampler.advance(whole, 7)
    chunked = sampler.begin(conds[:2], noise[:2], 7, 3.0)
    dones = []
    while not sampler.advance(chunked, 3):
        dones.append(chunked.done)
    assert dones == [3, 6] and chunked.finished
    assert torch.equal(sampler.result(chunked), sampler.result(whole))
    with pytest.raises(RuntimeError, match="done 0 of 7"):
        sampler.result(sampler.begin(conds[:1], noise[:1], 7, 3.0))


def test_static_buffers_give_the_same_loop(sampler, conds, noise) -> None:
    """What a graph replay relies on: static buffers of a chunk's shape, filled by copy_, run the chunk
    exactly like the freshly built inputs."""
    for guidance in (3.0, 1.0):
        run = sampler.begin(conds[:2], noise[:2], 5, guidance)
        inputs = sampler._chunk_inputs(run, 5)
        static = ChunkInputs(*(torch.zeros_like(t) if t is not None else None for t in (
            inputs.x, inputs.kv, inputs.mod, inputs.final_scale, inputs.dts, inputs.guidance)))
        static.copy_(inputs)
        with torch.inference_mode():
            assert torch.equal(sampler._chunk(static), sampler._chunk(inputs))


def test_null_condition_and_schedule_computed_once(model, conds, noise) -> None:
    sampler = FlowSampler(model.dit, "cpu", torch.float32)
    projected: list[bool] = []  # one entry per caption projection: was the caption all zero?
    timestep_batches: list[int] = []
    hooks = [
        model.dit.caption_projection.register_forward_hook(lambda m, args, out: projected.append(not args[0].any())),
        model.dit.time_caption_embed.timestep_embedder.register_forward_hook(
            lambda m, args, out: timestep_batches.append(args[0].shape[0])),
    ]
    try:
        sampler.sample(conds[:1], noise[:1], 6, 1.0)  # no CFG: no null branch
        assert projected == [False]
        sampler.sample(conds[:2], noise[:2], 6, 3.0)
        sampler.sample(conds[1:], noise[1:], 5, 4.5)
        sampler.sample(conds[:1], noise[:1], 6, 2.0)
    finally:
        for hook in hooks:
            hook.remove()
    assert projected.count(True) == 1 and projected.count(False) == 4
    assert timestep_batches == [6, 5]  # all S timestep embeddings in one call, once per step count


def test_modulation_tables_equal_reference_at_each_step(model, sampler, conds, noise) -> None:
    steps, guidance = 7, 3.0
    dit = model.dit
    inputs = sampler._chunk_inputs(sampler.begin(conds[:2], noise[:2], steps, guidance), steps)
    caption = torch.cat([torch.zeros_like(conds[:2]), conds[:2]])  # [2B, Q, H], uncond first
    _, timesteps = flow_match_sigmas(steps)
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.norm1.linear.register_forward_hook(lambda m, a, out, k=f"block{n}": seen.__setitem__(k, out))
             for n, layer in enumerate(dit.layers)]
    hooks.append(dit.norm_out.linear_1.register_forward_hook(lambda m, a, out: seen.__setitem__("final", out)))
    try:
        for i in range(steps):
            t = timesteps[i].to(torch.int64).expand(4)
            with torch.no_grad():
                dit(torch.cat([noise[:2], noise[:2]]), t, caption)
            for n in range(len(dit.layers)):
                expected = seen[f"block{n}"].unflatten(-1, (4, -1)).transpose(0, 1)  # [4, 2B, D]
                # fp32, the same ops on a [S·2B, T] instead of a [2B, T] batch: the GEMMs' blocking (so
                # their summation order over T) may differ; measured max 1e-6 abs on values up to ~3.
                # A wrong step, row or chunk order would be off by O(0.1).
                torch.testing.assert_close(inputs.mod[i, n], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(inputs.final_scale[i], seen["final"], rtol=1e-5, atol=1e-5)
    finally:
        for hook in hooks:
            hook.remove()
    assert not torch.allclose(inputs.mod[0], inputs.mod[1])  # the tables really change with the step


def test_callback_and_checks(sampler, conds, noise) -> None:
    calls: list[tuple[int, int]] = []
    sampler.sample(conds[:1], noise[:1], 4, 3.0, callback=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert not sampler.graphs.enabled  # CPU: no graph cache, every chunk eager
    with pytest.raises(InputError):
        sampler.sample(conds[0], noise[:1], 4, 3.0)  # cond without batch dim
    with pytest.raises(InputError):
        sampler.sample(conds[:2], noise[:1], 4, 3.0)  # batch mismatch
    with pytest.raises(InputError):
        sampler.sample(conds[:1], noise[:1], 0, 3.0)
