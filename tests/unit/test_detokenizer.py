"""Incremental detokenization (`runtime/detokenizer.py`) and the text the AR engine streams with it.

The detokenizer must give exactly `tokenizer.decode` of the whole id list after every token, on the tiny
checkpoint's byte-level BPE: random ids, text with multi-byte characters (which that vocabulary splits
into one token per byte), special tokens (also inside a character), both `skip_special_tokens`, and a
tokenizer forced to clean up spaces. Engine-level tests replace the sampler by a script (the model still
runs) and require every step's delta, text and finish reason to be what the engine produced when it
decoded all output ids at every step (`full_decode_stream`), stop strings across tokens included.
"""

from __future__ import annotations

import random

import pytest

from blip3o_engine.params import SamplingParams
from blip3o_engine.runtime.detokenizer import IncrementalDetokenizer
from blip3o_engine.runtime.reference import find_stop_string, stop_token_ids
from blip3o_engine.tokenization import load_tokenizer

TEXTS = ["Hello 中文 and émoji 😀 done.", " wörld, naïve café; 東京 タワー!", "A red apple 🍎 on a table.",
         "Ελληνικά και русский текст", "x = ∑ αβγ ≠ ∞ 🧪🧬", "plain ascii words only"]


@pytest.fixture(scope="module")
def tokenizer(tiny_engine):
    return tiny_engine.tokenizer


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Pieces of encoded multilingual text, random ids (stray UTF-8 bytes included) and added tokens."""
    added = sorted(tok.added_tokens_decoder)
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.5:
            text = rng.choice(TEXTS)
            start = rng.randrange(len(text))
            ids += encode(tok, text[start:start + rng.randint(1, 12)])
        elif kind < 0.8:
            ids.append(rng.randrange(len(tok)))
        else:
            ids.insert(rng.randint(max(0, len(ids) - 3), len(ids)), rng.choice(added))  # maybe inside a character
    return ids[:n]


def check_every_step(tok, ids: list[int], skip: bool, cleanup: bool = False) -> None:
    """After each token: text + pending is the full decode, text is all of it but a trailing run of
    U+FFFD (with the space cleanup: a prefix of it), and the returned pieces are the text; after flush
    the text is the full decode."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    streamed = ""
    for k, token in enumerate(ids, 1):
        streamed += detok.add(token)
        full = tok.decode(ids[:k], skip_special_tokens=skip)
        assert (detok.text, detok.text + detok.pending) == (streamed, full), ids[:k]
        assert len(streamed) == len(full.rstrip("\ufffd")) or cleanup and full.startswith(streamed), ids[:k]
    assert streamed + detok.flush() == detok.text == tok.decode(ids, skip_special_tokens=skip)


# ------------------------------------------------------------------------------------------------
# The detokenizer alone


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_equal_the_full_decode_at_every_step(tokenizer, skip):
    rng = random.Random(1234 + skip)
    for _ in range(150):
        check_every_step(tokenizer, random_ids(tokenizer, rng, rng.randint(1, 40)), skip)


def test_multibyte_character_is_returned_with_its_last_byte(tokenizer):
    tok = tokenizer
    ids = encode(tok, "a中😀")
    assert len(ids) == 1 + 3 + 4, "the tiny vocabulary should spell these characters byte by byte"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert pieces == ["a", "", "", "中", "", "", "", "😀"]
    # An unfinished character is pending (as U+FFFD), never returned; flush hands it out as it is.
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:3]] == ["a", "", ""]
    assert detok.pending == "\ufffd"
    assert detok.flush() == "\ufffd" and detok.text == tok.decode(ids[:3])
    with pytest.raises(RuntimeError, match="after flush"):
        detok.add(ids[3])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_between_and_inside_characters(tokenizer, tiny_engine, skip):
    tok, sp = tokenizer, tiny_engine.special
    zhong = encode(tok, "中")
    for ids in (encode(tok, "Hi") + [sp.im_end] + encode(tok, " there"),
                zhong[:2] + [sp.vision_start] + zhong[2:] + encode(tok, "!"),  # a skipped token splits 中
                [sp.im_end, sp.endoftext] + encode(tok, "é") + [sp.im_start]):
        check_every_step(tok, ids, skip)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    text = "".join(detok.add(i) for i in encode(tok, "Hi") + [sp.im_end] + encode(tok, " there"))
    assert text == ("Hi there" if skip else "Hi<|im_end|> there")


class ByteTokenizer:
    """A byte-level tokenizer stand-in whose tokens may hold the end of one character and the start of the
    next, as real byte-level BPE vocabularies' tokens do (the tiny one, trained on ASCII text, has none)."""

    def __init__(self, vocab: list[bytes]) -> None:
        self.vocab = vocab

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_tokens_that_straddle_characters():
    tok = ByteTokenizer([b"a\xe4", b"\xb8\xad", b"\xad b", b"\xf0\x9f", b"\x98\x80\xe4\xb8", b"x", b"\xff"])
    detok = IncrementalDetokenizer(tok)
    # "a" is final at once although its token ends inside the next character.
    assert [detok.add(i) for i in (0, 1, 3, 4, 2)] == ["a", "中", "", "😀", "中 b"]
    rng = random.Random(5)
    for _ in range(300):
        check_every_step(tok, [rng.randrange(len(tok.vocab)) for _ in range(rng.randint(1, 25))], skip=True)


def test_forced_space_cleanup_still_equals_the_full_decode(tiny_dir):
    """A tokenizer whose decode() cleans up spaces (" ." -> "."): a pattern may span windows."""
    tok = load_tokenizer(tiny_dir)
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert tok.decode(encode(tok, "a . b n't")) == "a. bn't", "the cleanup is not active: this test would prove nothing"
    # Every rule's pattern, split into tokens (" n't" is " n", "'", "t"), then random mixes of them.
    patterns = [" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"]
    pieces = patterns + [" ", "'", "n", "a", "中", "x y", "  "]
    for text in patterns + ["a ' ' b", "x  .", "a ' ve"]:
        check_every_step(tok, encode(tok, text), skip=True, cleanup=True)
    rng = random.Random(7)
    for _ in range(300):
        ids = [i for _ in range(rng.randint(1, 8)) for i in encode(tok, rng.choice(pieces))]
        ids.insert(rng.randint(0, len(ids)), rng.randrange(len(tok)))
        check_every_step(tok, ids, skip=bool(rng.getrandbits(1)), cleanup=True)


def test_work_is_linear_in_the_number_of_tokens(tokenizer):
    """Ids decoded in all: a small multiple of the length (decoding everything each step: n^2 / 2)."""

    class Counting:
        def __init__(self, tok):
            self.tok, self.decoded = tok, 0

        def decode(self, ids, **kwargs):
            self.decoded += len(ids)
            return self.tok.decode(ids, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    counting = Counting(tokenizer)
    ids = (encode(tokenizer, " ".join(TEXTS)) * 8)[:800]
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)
    assert counting.decoded <= 12 * len(ids)


# ------------------------------------------------------------------------------------------------
# The engine's streamed text


def full_decode_stream(tok, script: list[int], params: SamplingParams, stops: set[int]) -> list[tuple]:
    """(delta, text, finish reason) per step as the engine made them by decoding all output ids every
    step: the behaviour the incremental path must keep exactly."""
    skip = params.skip_special_tokens
    hold = max((len(s) for s in params.stop), default=1) - 1
    emitted, outs = "", []
    for k in range(1, len(script) + 1):
        ids, reason = script[:k], None
        if ids[-1] in stops:
            text, reason = tok.decode(ids[:-1], skip_special_tokens=skip), "stop"
        else:
            text = tok.decode(ids, skip_special_tokens=skip)
            cut = find_stop_string(text, params.stop)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            elif k == params.max_tokens:
                reason = "length"
        if reason is None:
            text = text.rstrip("\ufffd")
            text = text[:max(len(text) - hold, len(emitted))]
        assert text.startswith(emitted)
        outs.append((text[len(emitted):], text, reason))
        emitted = text
        if reason is not None:
            return outs
    raise AssertionError("the script ends before the request does")


def run_scripted(tiny_engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Run the requests together through an AR stage whose sampler plays each request's script."""
    from _paged_util import ar_stage  # tests/parity/_paged_util.py

    le = ar_stage(tiny_engine, 128, block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    le._sample = lambda logits, states: [requests[st.request.request_id][0][st.request.num_output_tokens]
                                         for st in states]
    prompt = tiny_engine.prompts.chat([{"role": "user", "content": "Hi."}])
    for rid, (_, params) in requests.items():
        le.add_request(rid, prompt, params)
    outs: dict[str, list] = {rid: [] for rid in requests}
    while le.has_unfinished():
        for out in le.step():
            outs[out.request_id].append(out)
    return outs


def check_stream(tiny_engine, outs: list, script: list[int], params: SamplingParams) -> None:
    tok = tiny_engine.tokenizer
    want = full_decode_stream(tok, script, params, stop_token_ids(params, tiny_engine.special))
    assert [(o.text_delta, o.text, o.finish_reason) for o in outs] == want
    assert "".join(o.text_delta for o in outs) == outs[-1].text
    assert outs[-1].finished and outs[-1].token_ids == script[:len(outs)]


def test_engine_streams_what_decoding_everything_did(tiny_engine):
    tok, sp = tiny_engine.tokenizer, tiny_engine.special
    text = encode(tok, "Hello 中文 and émoji 😀 done. Hello again 東京!")
    stop_across = "o 中"  # ' o' ... of three byte tokens: the stop string ends with a completed character
    assert not any(stop_across in tok.decode([i]) for i in text), "the stop string must span tokens"
    requests = {
        "length": (text, SamplingParams(max_tokens=len(text))),
        "stop string": (text, SamplingParams(max_tokens=len(text), stop=("never", stop_across))),
        "earliest stop": (text, SamplingParams(max_tokens=len(text), stop=("again", "moji 😀"))),
        "one-char stop": (text, SamplingParams(max_tokens=len(text), stop=("!", "."))),
        "stop token": (text[:9] + [sp.im_end] + text[9:], SamplingParams(max_tokens=len(text))),
        "specials kept": (text[:4] + [sp.vision_start] + text[4:], SamplingParams(
            max_tokens=len(text) + 1, skip_special_tokens=False, stop=("start|>",))),
    }
    outs = run_scripted(tiny_engine, requests)
    for rid, (script, params) in requests.items():
        check_stream(tiny_engine, outs[rid], script, params)
    assert outs["stop string"][-1].text == "Hell" and outs["stop string"][-1].finish_reason == "stop"
    assert outs["length"][-1].text == tok.decode(text)
    assert outs["stop token"][-1].text == tok.decode(text[:9])
    assert "\ufffd" not in "".join(o.text_delta for o in outs["length"])


def test_engine_random_scripts_and_stop_strings(tiny_engine):
    tok = tiny_engine.tokenizer
    rng = random.Random(99)
    requests = {}
    for i in range(8):
        script = random_ids(tok, rng, 40)
        text = tok.decode(script)
        start = rng.randrange(len(text))
        stop = tuple(s for s in (text[start:start + rng.randint(1, 6)], "zz\ufffdzz") if s.strip())
        requests[str(i)] = (script, SamplingParams(max_tokens=40, ignore_eos=i % 2 == 1, stop=stop if i % 4 else (),
                                                   skip_special_tokens=i % 3 != 0))
    outs = run_scripted(tiny_engine, requests)
    for rid, (script, params) in requests.items():
        check_stream(tiny_engine, outs[rid], script, params)
    assert any(o[-1].finish_reason == "stop" for o in outs.values())
