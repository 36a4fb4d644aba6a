"""Next-token selection vs transformers' logits processors on random logits: identical values and
identical -inf patterns (these are exact elementwise ops, so the comparison is exact, atol=0)."""

from __future__ import annotations

import pytest
import torch

from blip3o_engine import SamplingParams
from blip3o_engine.sampling.text import apply_repetition_penalty, apply_top_k, apply_top_p, select_next_token

gen_utils = pytest.importorskip("transformers.generation.logits_process")
RepetitionPenaltyLogitsProcessor = gen_utils.RepetitionPenaltyLogitsProcessor
TemperatureLogitsWarper = gen_utils.TemperatureLogitsWarper
TopKLogitsWarper = gen_utils.TopKLogitsWarper
TopPLogitsWarper = gen_utils.TopPLogitsWarper

VOCAB = 537  # the tiny checkpoint's vocabulary size: odd, not a power of two
SEEDS = [0, 1, 2, 3, 4]


def random_logits(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 4.0  # [V]; scale 4 gives peaked and flat regions


def seen_ids(seed: int, n: int = 40, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab, (n,), generator=g)  # [N] with duplicates, like a real history


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Exact: same -inf positions and bitwise-equal finite values."""
    assert ours.shape == ref.shape
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def hf(proc, logits: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.zeros(1, 0, dtype=torch.long) if ids is None else ids[None]
    return proc(ids, logits[None].clone())[0]


# ------------------------------------------------------------------------------------------------
# Repetition penalty


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_hf(seed, penalty):
    logits, ids = random_logits(seed), seen_ids(seed)
    ours = apply_repetition_penalty(logits, ids, penalty)
    assert_same(ours, hf(RepetitionPenaltyLogitsProcessor(penalty), logits, ids))
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(ours[untouched], logits[untouched])
    assert not torch.equal(ours, logits)


def test_repetition_penalty_duplicates_penalized_once():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 0, 0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_repetition_penalty_noops():
    logits = random_logits(0)
    assert torch.equal(apply_repetition_penalty(logits, seen_ids(0), 1.0), logits)
    assert torch.equal(apply_repetition_penalty(logits, torch.zeros(0, dtype=torch.long), 1.5), logits)


def test_repetition_penalty_does_not_modify_input():
    logits = random_logits(0)
    before = logits.clone()
    apply_repetition_penalty(logits, seen_ids(0), 1.5)
    assert torch.equal(logits, before)


# ------------------------------------------------------------------------------------------------
# Temperature / top-k / top-p


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.1, 0.8, 1.7])
def test_temperature_matches_hf(seed, temperature):
    """select_next_token divides by the temperature, as HF's warper does."""
    logits = random_logits(seed)
    assert_same(logits / temperature, hf(TemperatureLogitsWarper(temperature), logits))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 17, 100, VOCAB - 1])
def test_top_k_matches_hf(seed, k):
    logits = random_logits(seed)
    ours = apply_top_k(logits, k)
    assert_same(ours, hf(TopKLogitsWarper(k), logits))
    assert int(torch.isfinite(ours).sum()) == k  # random fp32 logits have no ties


@pytest.mark.parametrize("k", [VOCAB, VOCAB + 1, 10**6])
def test_top_k_at_or_above_vocab_is_noop(k):
    logits = random_logits(0)
    assert torch.equal(apply_top_k(logits, k), logits)
    assert_same(apply_top_k(logits, k), hf(TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("k", [0, -1])
def test_top_k_disabled(k):
    logits = random_logits(0)
    assert torch.equal(apply_top_k(logits, k), logits)


def test_top_k_ties_keep_all_tied_tokens_like_hf():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, -1.0])
    for k in (1, 2, 3, 4):
        assert_same(apply_top_k(logits, k), hf(TopKLogitsWarper(k), logits))
    # k=3 cuts inside the tie at 2.0: every token equal to the k-th value stays.
    assert torch.isfinite(apply_top_k(logits, 3)).tolist() == [False, True, True, True, True, True, False]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_hf(seed, p):
    logits = random_logits(seed)
    assert_same(apply_top_p(logits, p), hf(TopPLogitsWarper(p), logits))


@pytest.mark.parametrize("seed", SEEDS)
def test_top_p_tiny_keeps_exactly_the_argmax(seed):
    logits = random_logits(seed)
    out = apply_top_p(logits, 1e-8)
    assert int(torch.isfinite(out).sum()) == 1
    assert int(torch.argmax(out)) == int(torch.argmax(logits))
    assert out[torch.argmax(logits)] == logits.max()
    assert_same(out, hf(TopPLogitsWarper(1e-8), logits))


def test_top_p_one_is_noop():
    logits = random_logits(0)
    assert torch.equal(apply_top_p(logits, 1.0), logits)


def test_top_p_ties_match_hf():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0, -3.0])
    for p in (0.1, 0.5, 0.9, 0.99):
        assert_same(apply_top_p(logits, p), hf(TopPLogitsWarper(p), logits))


@pytest.mark.parametrize("seed", SEEDS)
def test_full_chain_matches_hf_order(seed):
    """penalty -> temperature -> top-k -> top-p, HF's processor order in generate()."""
    logits, ids = random_logits(seed), seen_ids(seed)
    params = dict(penalty=1.2, temperature=0.7, k=50, p=0.8)
    ours = apply_repetition_penalty(logits, ids, params["penalty"]) / params["temperature"]
    ours = apply_top_p(apply_top_k(ours, params["k"]), params["p"])
    ref = logits[None].clone()
    for proc in (RepetitionPenaltyLogitsProcessor(params["penalty"]), TemperatureLogitsWarper(params["temperature"]),
                 TopKLogitsWarper(params["k"]), TopPLogitsWarper(params["p"])):
        ref = proc(ids[None], ref)
    assert_same(ours, ref[0])


# ------------------------------------------------------------------------------------------------
# select_next_token


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_is_argmax_after_penalty(seed):
    logits, ids = random_logits(seed), seen_ids(seed, n=200)
    # Make the raw argmax a seen token so the penalty can change the choice.
    logits[ids[0]] = logits.max() + 0.1
    for penalty in (1.0, 1.5, 50.0):
        params = SamplingParams(temperature=0.0, repetition_penalty=penalty)
        expected = int(torch.argmax(hf(RepetitionPenaltyLogitsProcessor(penalty), logits, ids)))
        assert select_next_token(logits, params, ids, None) == expected
    assert select_next_token(logits, SamplingParams(temperature=0.0, repetition_penalty=50.0), ids, None) != ids[0]


def test_select_accepts_half_precision_logits():
    logits = random_logits(3).to(torch.bfloat16)
    token = select_next_token(logits, SamplingParams(temperature=0.0), torch.zeros(0, dtype=torch.long), None)
    assert token == int(torch.argmax(logits.float()))


def test_top_k_one_and_tiny_top_p_sample_the_argmax():
    logits, ids = random_logits(7), seen_ids(7)
    expected = select_next_token(logits, SamplingParams(temperature=0.0, repetition_penalty=1.1), ids, None)
    g = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=1.5, top_k=1, repetition_penalty=1.1),
                   SamplingParams(temperature=1.5, top_p=1e-9, repetition_penalty=1.1)):
        assert {select_next_token(logits, params, ids, g) for _ in range(20)} == {expected}


def test_seeded_sampling_is_reproducible_and_varies():
    logits = random_logits(5) / 4.0  # flatter: many tokens are plausible
    params = SamplingParams(temperature=1.0)
    empty = torch.zeros(0, dtype=torch.long)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [select_next_token(logits, params, empty, g) for _ in range(30)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert len(set(draw(1))) > 1


def test_sampling_distribution_matches_softmax():
    """Empirical frequencies over 20k draws at temperature 2 match softmax(logits / 2) on a 5-token
    vocabulary within 4 standard errors (a wrong temperature or mask moves them by far more)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    probs = (logits / 2.0).softmax(-1)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=2.0)
    empty = torch.zeros(0, dtype=torch.long)
    n = 20000
    counts = torch.bincount(torch.tensor([select_next_token(logits, params, empty, g) for _ in range(n)]),
                            minlength=5).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert torch.all((counts - probs.double()).abs() < 4 * se)
