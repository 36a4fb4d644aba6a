"""Incremental detokenization: the text of a growing list of token ids in time linear in its length.

Decoding all output ids at every step costs O(n) per token, O(n^2) per request. As vLLM's
`detokenize_incrementally` does, each step decodes only a short window instead:

    ids:  [ settled ... | prefix_offset ... | read_offset ... newest ]
                        '---- context ----'  '------ tail ---------'

The window `ids[prefix_offset:]` is decoded and the text past its context `ids[prefix_offset:read_offset]`
(decoded alone when the offsets move) is the tail's text. The context gives the tail's first token what
precedes it: a decoder that treats a sequence's first token specially (SentencePiece drops its leading
space) does so to the context, in both decodes, not to the tail. Once the tail's text ends on a complete
character (not in the replacement char "\\ufffd"), it becomes the next context and the window restarts there.

Why a window gives exactly the full decode's text (byte-level BPE, the Qwen tokenizers): the decoder
joins the tokens' bytes and decodes them as UTF-8, each invalid or incomplete sequence becoming "\\ufffd".
That decoding is left to right and restarts clean after every complete character, and a window only
ever starts where an earlier one ended on a complete character. Within a tail that ends in "\\ufffd" (an
incomplete character the next tokens may complete), the characters before the trailing run of "\\ufffd"
are already final: `add` returns them at once, the run waits.

Space cleanup: transformers' `clean_up_tokenization` (" ." -> "." and nine more such rules) runs over the
whole decoded string, so a window ending in " " cannot know whether a "." follows. transformers 5 skips it
for BPE tokenizers such as Qwen's unless forced, and the tiny tokenizer turns it off; where `decode`
does apply it, windows are decoded raw and the cleanup runs over the raw text in chunks cut only where it
is provably local (`_safe_cut`), so the result still equals the full decode. The price is latency only:
text then waits until three characters without a space follow it.

Limit (as in vLLM): the window only restarts on text that ends on a complete character, so a run of tokens
that add no text (skipped special tokens) or keep ending in "\\ufffd" is decoded again with each token of
the run; such runs are a few tokens long in practice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what the decoder makes of an incomplete or invalid UTF-8 sequence


class IncrementalDetokenizer:
    """The text of one request's output ids, token by token (module docstring).

    At any time `text + pending == tokenizer.decode(token_ids, skip_special_tokens=...)`; `text` only
    grows, by what `add` returns. `flush` hands out `pending` too, when no token will follow.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        clean = _default_cleanup(tokenizer)
        self._cleanup = _CleanupStream(clean) if clean is not None else None
        self._prefix_offset = 0  # window start: the context, decoded again with every new token
        self._read_offset = 0  # tail start: text before it is settled
        self._context_len = 0  # len(decode(ids[prefix_offset:read_offset]))
        self._tail = ""  # raw text of ids[read_offset:], possibly ending in an incomplete character
        self._returned = 0  # chars of the tail already returned by add()
        self._pieces: list[str] = []  # what add() returned, joined only when `text` is read
        self._flushed = False

    def add(self, token_id: int) -> str:
        """Append one token; returns the text that became final with it (often "", never changed later)."""
        if self._flushed:
            raise RuntimeError("add() after flush(): the detokenizer's text is already final")
        self.token_ids.append(int(token_id))
        new = self._advance_window()
        if self._cleanup is not None:
            new = self._cleanup.push(new)
        if new:
            self._pieces.append(new)
        return new

    @property
    def text(self) -> str:
        """The final text so far: everything `add` (and `flush`) returned."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def pending(self) -> str:
        """The text after `text` as it decodes now; later tokens may still change it."""
        raw = self._tail[self._returned:]
        return raw if self._cleanup is None else self._cleanup.rest(raw)

    def flush(self) -> str:
        """Hand out `pending` as final (incomplete characters included): the sequence ended."""
        rest = self.pending
        self._flushed = True
        if rest:
            self._pieces.append(rest)
        return rest

    def _advance_window(self) -> str:
        """Decode the window with the new token; returns the raw text that became final."""
        ids = self.token_ids
        self._tail = self._decode(ids[self._prefix_offset:])[self._context_len:]
        if self._tail and not self._tail.endswith(REPLACEMENT_CHAR):
            new = self._tail[self._returned:]
            # The tail ends on a complete character: it is settled, and the next window's context.
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            self._context_len = len(self._decode(ids[self._prefix_offset:self._read_offset]))
            self._tail, self._returned = "", 0
            return new
        final = len(self._tail.rstrip(REPLACEMENT_CHAR))  # what precedes the trailing run is final
        new = self._tail[self._returned:final]
        self._returned = max(self._returned, final)
        return new

    def _decode(self, ids: list[int]) -> str:
        if self._cleanup is None:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)


def _default_cleanup(tokenizer: Any) -> Callable[[str], str] | None:
    """The tokenizer's space cleanup if its `decode` applies it by default, else None.

    transformers applies `clean_up_tokenization` when `clean_up_tokenization_spaces` is set, except for
    BPE models in transformers 5 unless forced; asking `decode` about a sample settles it either way."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    ids = tokenizer.encode("a .", add_special_tokens=False)
    if tokenizer.decode(ids) == tokenizer.decode(ids, clean_up_tokenization_spaces=False):
        return None
    return tokenizer.clean_up_tokenization


# transformers' cleanup rules each turn a pattern that starts with a space and is at most this long into the
# same pattern without its spaces (" n't" -> "n't", " ' " -> "'").
_CLEANUP_PATTERN_MAX = 4


class _CleanupStream:
    """`clean` over raw text that arrives in pieces, equal to `clean` of the whole: raw text after the last
    cut where the cleanup is local (`_safe_cut`) is held back."""

    def __init__(self, clean: Callable[[str], str]) -> None:
        self._clean = clean
        self._raw = ""  # raw text after the last safe cut

    def push(self, raw: str) -> str:
        """Append final raw text; returns the cleaned text up to the new last safe cut."""
        checked = len(self._raw)
        self._raw += raw
        cut = _safe_cut(self._raw, checked)
        out, self._raw = self._clean(self._raw[:cut]), self._raw[cut:]
        return out

    def rest(self, raw_pending: str) -> str:
        """The cleaned text of what is held back followed by `raw_pending`."""
        return self._clean(self._raw + raw_pending)


def _safe_cut(text: str, checked: int) -> int:
    """The largest c in (checked, len(text)] with no space among the (up to) 3 characters before c; else 0.

    Why clean(text[:c] + rest) == clean(text[:c]) + clean(rest) for such a c and any rest: a pattern that
    spans the cut would start with a space among those 3 characters; the rules only delete spaces, so
    those 3 stay the last characters of text[:c] through every rule and no rule ever spans the cut. The
    cuts up to `checked` were rejected by an earlier call (the characters before them have not changed).
    """
    for c in range(len(text), checked, -1):
        if " " not in text[max(0, c - _CLEANUP_PATTERN_MAX + 1):c]:
            return c
    return 0


__all__ = ["IncrementalDetokenizer", "REPLACEMENT_CHAR"]
