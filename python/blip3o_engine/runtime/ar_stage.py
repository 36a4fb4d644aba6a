"""The AR stage of the optimized backend: the language model's requests, continuously batched over a paged
KV cache.

    add_request(id, prompt, params) / add_t2i_request(id, prompt)  ->  step() -> [RequestOutput, ...]

It serves the engine's step loop (`runtime/step_loop.py`), which routes its outputs by request kind.

Each `step()` runs one scheduler step (`runtime/scheduler.py`: chunked prefill, decode, preemption
by recompute, prefix caching in `runtime/kv_manager.py`), one forward of the paged model
(`runtime/model_runner.py`), and samples the next token of every request whose chunk reached its
end. Sampling follows `sampling/text.py` exactly (HF processor order: repetition penalty, greedy
argmax, else temperature, top-k, top-p, multinomial), batched through `ops.sampling_ops.prepare_logits`;
a request with a seed draws from its own `torch.Generator`, so its tokens do not depend on what it
is batched with. Finishing mirrors `reference.generate_text`: a stop token (EOS unless ignore_eos,
plus stop_token_ids) ends with reason "stop" and is kept in the ids but not the text; a stop string
ends with "stop" and the text is cut before it; max_tokens ends with "length".

Images: a request's ViT features are computed when its image tokens are first scheduled (batched
across the requests of that step) and dropped once all its image tokens have their KV; a request
preempted before that (or whose recomputation misses the prefix cache) simply runs the ViT again.
Each image enters the prefix-cache hash chain through a sha256 of its pixels and grid, so two
prompts share cached image blocks only when the images are equal.

Text-to-image prefill (`add_t2i_request`): a prefill-only request whose sequence is the T2I prompt
followed by the Q latent queries, at 1-D positions 0..L+Q-1 on all three RoPE axes (docs/model_spec.md §1.3), also
with an input image. It is scheduled like any prompt (chunked, batched with chat, preempted), samples
nothing, and finishes once every row has its KV; its one output carries the post-final-norm hidden
states of the queries `[Q, H]`. The query rows have no token ids: they hold the placeholder
`QUERY_PLACEHOLDER_ID` (-1, never a real token; 0 is looked up instead and the row's embedding is then
replaced by its query, as image features are) and are the request's uncached tail, so they are always
computed (their hidden states are the output) and never hashed into the prefix cache. The prompt part
is cached like chat: a text-only T2I prompt's blocks hold exactly the KV of a chat prompt with the
same tokens (same ids, same positions), so they are shared; from an image on the positions differ
from chat's M-RoPE ones, so a T2I image enters the hash chain under a different key.

Text streaming: every output carries the text delta since the previous one. The text is the decode of
the output ids (as the reference does), minus a held-back tail while it could still change: a trailing
incomplete UTF-8 character, and, with stop strings, the last len(longest stop) - 1 characters. The deltas
of a request concatenate to its final text. Each request's text is decoded incrementally
(`runtime/detokenizer.py`, a few tokens per step, equal to the full decode), and a stop string is looked
for only in the held-back characters and the new text, so the text costs time linear in its length.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine_config import EngineConfig
from ..errors import CapacityError, ConfigError, InputError
from ..models.blip3o import Blip3oModel
from ..models.qwen2_5_vl import get_mrope_positions
from ..outputs import RequestOutput
from ..ops.sampling_ops import prepare_logits
from ..params import SamplingParams
from ..prompts import PreparedPrompt
from ..sampling.text import apply_top_p
from ..tokenization import SpecialTokens
from .detokenizer import IncrementalDetokenizer
from .kv_manager import ImageSpan, KVBlockManager
from .limits import check_context
from .cuda_graphs import GraphPool
from .model_runner import ModelRunner, StepInputs, inference_mode
from .reference import find_stop_string, stop_token_ids
from .scheduler import Request, ScheduledRequest, Scheduler, SchedulerOutput


# The token id held by a T2I request's latent-query rows (module docstring).
QUERY_PLACEHOLDER_ID = -1
# Salt of a T2I image's prefix-cache key: its tokens sit at 1-D positions, not chat's M-RoPE ones.
_T2I_IMAGE_SALT = b"blip3o-t2i-1d-positions"


@dataclass(eq=False)
class _State:
    """Per-request host state beside the scheduler's `Request`."""

    request: Request
    prompt: PreparedPrompt
    params: SamplingParams
    stop_ids: set[int]
    generator: torch.Generator | None
    positions: np.ndarray | None  # [3, L] int64 M-RoPE positions of an image prompt; None = text (0..L-1)
    delta: int  # M-RoPE delta of the decode positions
    image_index: np.ndarray | None  # [L] feature row of each image token, -1 elsewhere
    image_end: int  # one past the last image token (0 without images)
    feats: Tensor | None = None  # [N_img_tok, H] ViT features while needed
    detok: IncrementalDetokenizer | None = None  # chat: the text of the output ids (None for T2I)
    emitted: str = ""  # text already handed out in deltas
    held: str = ""  # final text not handed out yet: a stop string may begin in it (at most len(longest) - 1)
    stop_tail: str | None = None  # when a stop string ended the request: the text after `emitted` up to it
    query_start: int | None = None  # T2I prefill: index of the first latent-query row; None for chat
    hidden: Tensor | None = None  # T2I prefill: [Q, H] query states, filled as their rows are computed


def image_content_hash(pixel_values: Tensor, grid: tuple[int, int, int], salt: bytes = b"") -> int:
    """64-bit content key of one image: sha256 over the salt, its grid and pixel bytes."""
    h = hashlib.sha256(salt)
    h.update(np.asarray(grid, dtype=np.int64).tobytes())
    h.update(pixel_values.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little")


class ARStage:
    """Continuously batched chat generation and T2I prefills over one `Blip3oModel` (module docstring)."""

    def __init__(self, model: Blip3oModel, tokenizer: Any, special: SpecialTokens, config: EngineConfig,
                 num_blocks: int, max_model_len: int, graph_pool: GraphPool | None = None) -> None:
        """num_blocks / max_model_len: the memory plan's KV pool and request bound."""
        self.model = model
        self.tokenizer = tokenizer
        self.special = special
        self.config = config
        self.runner = ModelRunner(model.text, config, num_blocks, max_model_len, graph_pool)
        self.kv = KVBlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        sched = config.scheduler
        self.scheduler = Scheduler(self.kv, sched.max_num_seqs, sched.max_num_batched_tokens, sched.long_prefill_chunk)
        self._states: dict[str, _State] = {}
        self.last_step_prefilled = False  # the last step held prompt tokens (the step loop reads it)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    # ------------------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> None:
        """Queue a request. Raises InputError past the model's context, CapacityError if it could not
        fit the KV pool even alone, ValueError for an id in use."""
        check_context("prompt + max_tokens", len(prompt.token_ids) + params.max_tokens, self.max_model_len,
                      self.model.cfg.text.max_position_embeddings)
        state = self._new_state(request_id, prompt, params)
        self.scheduler.add_request(state.request)  # CapacityError before anything is kept
        self._states[request_id] = state

    def add_t2i_request(self, request_id: str, prompt: PreparedPrompt) -> None:
        """Queue a T2I prefill (module docstring): its one output, once finished, carries the query states
        `[Q, H]` in `hidden_states`. Raises like `add_request`; ConfigError without latent queries."""
        if self.model.queries is None:
            raise ConfigError("this checkpoint has no latent queries: it cannot generate images")
        q = self.model.queries.weight.shape[1]
        n = len(prompt.token_ids) + q
        check_context(f"prompt + {q} latent queries", n, self.max_model_len,
                      self.model.cfg.text.max_position_embeddings)
        state = self._new_t2i_state(request_id, prompt, q)
        self.scheduler.add_request(state.request)
        self._states[request_id] = state

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        self._states.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def fail_pending_step(self) -> list[str]:
        """After `step` raised: abort the requests of the failed step (their work is lost) and return their ids,
        so the caller fails exactly them and the stage stays usable."""
        ids = self.scheduler.discard_pending()
        for rid in ids:
            self._states.pop(rid, None)
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished_requests

    def _new_state(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> _State:
        ids = prompt.token_ids
        positions, delta, index, end, spans = None, 0, None, 0, ()
        if prompt.pixel_values is not None:
            merge = self.model.cfg.vision.spatial_merge_size
            pos, delta = get_mrope_positions(ids, prompt.image_grid_thw, self.special.image_pad, merge)
            positions = pos.numpy().astype(np.int64)
            index, end, spans = self._image_layout(prompt)
        elif not prompt.use_mrope:
            raise InputError("the AR engine runs chat prompts (M-RoPE); text-to-image prompts go through add_t2i_request")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        request = Request(request_id, ids, params.max_tokens, spans)
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        return _State(request, prompt, params, stop_token_ids(params, self.special), generator, positions, delta,
                      index, end, detok=detok)

    def _new_t2i_state(self, request_id: str, prompt: PreparedPrompt, q: int) -> _State:
        """Prompt ids + q placeholder rows, 1-D positions (positions None, delta 0: the batch builder then
        gives row p position p on every axis), a prefill-only request whose queries are never cached."""
        index, end, spans = None, 0, ()
        if prompt.pixel_values is not None:
            index, end, spans = self._image_layout(prompt, salt=_T2I_IMAGE_SALT)
        ids = list(prompt.token_ids) + [QUERY_PLACEHOLDER_ID] * q
        request = Request(request_id, ids, 1, spans, prefill_only=True, num_uncached_tail=q)
        hidden = torch.empty(q, self.model.cfg.text.hidden_size, dtype=self.model.dtype, device=self.runner.device)
        return _State(request, prompt, SamplingParams(max_tokens=1), set(), None, None, 0, index, end,
                      query_start=len(prompt.token_ids), hidden=hidden)

    def _image_layout(self, prompt: PreparedPrompt, salt: bytes = b"") -> tuple[np.ndarray, int, tuple[ImageSpan, ...]]:
        """Feature row of each image token ([L], -1 elsewhere), one past the last image token, and the
        prefix-cache spans of the images."""
        is_pad = np.asarray(prompt.token_ids) == self.special.image_pad  # [L]
        index = np.where(is_pad, np.cumsum(is_pad) - 1, -1)
        end = int(np.nonzero(is_pad)[0][-1]) + 1
        return index, end, self._image_spans(prompt, is_pad, salt)

    def _image_spans(self, prompt: PreparedPrompt, is_pad: np.ndarray, salt: bytes) -> tuple[ImageSpan, ...]:
        """One span per image-token run, keyed by that image's pixels (and the salt)."""
        starts = np.nonzero(is_pad & ~np.concatenate(([False], is_pad[:-1])))[0]
        merge2 = self.model.cfg.vision.spatial_merge_size ** 2
        spans, patch = [], 0
        for start, grid in zip(starts, prompt.image_grid_thw):
            patches = grid[0] * grid[1] * grid[2]
            key = image_content_hash(prompt.pixel_values[patch:patch + patches], grid, salt)
            spans.append(ImageSpan(int(start), patches // merge2, key))
            patch += patches
        return tuple(spans)

    def stats(self) -> dict[str, int]:
        """Requests by kind and state, and KV blocks, for `Engine.stats()`."""
        sched = self.scheduler
        t2i_running = sum(1 for r in sched.running if r.prefill_only)
        t2i_waiting = sum(1 for r in sched.waiting if r.prefill_only)
        return {"chat_running": len(sched.running) - t2i_running, "chat_waiting": len(sched.waiting) - t2i_waiting,
                "t2i_running": t2i_running, "t2i_waiting": t2i_waiting,
                "kv_blocks_used": self.kv.num_blocks - self.kv.num_free_blocks,
                "kv_blocks_total": self.kv.num_blocks}

    # ------------------------------------------------------------------------------ isolated prefill

    @torch.inference_mode()
    def encode_alone(self, prompt: PreparedPrompt) -> Tensor:
        """The query states `[Q, H]` of one T2I prompt, computed in steps of its own (no other sequence in
        the batch, no prefix-cache hit), so the result depends on nothing else in flight. Runs between
        scheduled steps, on blocks freed for it (the newest running requests are preempted if the pool is
        full: they recompute later, as after any preemption)."""
        q = self.model.queries.weight.shape[1]
        rid = "\0alone"  # never a user id: the step loop checks ids, and this one is never scheduled
        state = self._new_t2i_state(rid, prompt, q)
        n = len(state.request.token_ids)
        self.scheduler.make_room(self.kv.blocks_for(n))
        if not self.kv.allocate_slots(rid, n):
            raise CapacityError(f"no room for a {n}-token prefill in the KV pool ({self.kv.num_blocks} blocks)")
        try:
            table, chunk = list(self.kv.block_table(rid)), self.runner.max_tokens
            for start in range(0, n, chunk):
                new = state.request.token_ids[start:start + chunk]
                out = SchedulerOutput([ScheduledRequest(rid, start, len(new), new, table, True, False)], [], [])
                self._encode_images(out, [state])
                inputs, query_slices = self._step_inputs(out, [state])
                _, hidden = self.runner.execute(inputs)
                self._store_query_states(hidden, query_slices)
        finally:
            self.kv.free(rid)
        return state.hidden

    # ------------------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """One scheduler step + forward + sampling; outputs of the requests that sampled a token and of
        the T2I prefills that finished."""
        with inference_mode():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_step_prefilled = any(s.is_prefill for s in out.scheduled)
        if not out.scheduled:
            self.scheduler.update_from_output(out, {})
            return []
        states = [self._states[s.request_id] for s in out.scheduled]
        self._encode_images(out, states)
        inputs, query_slices = self._step_inputs(out, states)
        logits, hidden = self.runner.execute(inputs)  # [S, V], [sum of query rows, H] or None
        self._store_query_states(hidden, query_slices)
        rows = [i for i, s in enumerate(out.scheduled) if s.samples]
        sampling = [states[i] for i in rows]
        tokens = self._sample(logits[rows], sampling) if rows else []
        stopped = {st.request.request_id for st, tok in zip(sampling, tokens) if self._is_stop(st, tok)}
        sampled = {st.request.request_id: tok for st, tok in zip(sampling, tokens)}
        self.scheduler.update_from_output(out, sampled, stopped)
        for st in states:
            if st.feats is not None and st.request.num_computed_tokens >= st.image_end:
                st.feats = None  # every image token has its KV now
        outputs = [self._output(st, tok) for st, tok in zip(sampling, tokens)]
        return outputs + [self._t2i_output(st) for st in states
                          if st.query_start is not None and st.request.finish_reason is not None]

    def _encode_images(self, out: SchedulerOutput, states: list[_State]) -> None:
        """ViT for the requests whose chunk this step holds image tokens without cached features (one
        batched call)."""
        need = [st for s, st in zip(out.scheduled, states)
                if st.feats is None and s.num_computed_tokens < st.image_end
                and (st.image_index[s.num_computed_tokens:s.num_computed_tokens + s.num_new_tokens] >= 0).any()]
        if not need:
            return
        device, dtype = self.runner.device, self.model.dtype
        pixels = torch.cat([st.prompt.pixel_values for st in need]).to(device=device, dtype=dtype)
        grids = [g for st in need for g in st.prompt.image_grid_thw]
        feats = self.model.visual(pixels, torch.tensor(grids, device=device))  # [sum N_img_tok, H]
        sizes = [int((st.image_index >= 0).sum()) for st in need]
        for st, f in zip(need, feats.split(sizes)):
            st.feats = f

    def _step_inputs(self, out: SchedulerOutput, states: list[_State]
                     ) -> tuple[StepInputs, list[tuple[_State, int, int]]]:
        """The runner's inputs, and per T2I chunk holding query rows (state, first query, end query) in
        the order of `hidden_rows`."""
        input_ids: list[int] = []
        image_rows: list[int] = []
        feats: list[Tensor] = []
        hidden_rows: list[int] = []
        query_slices: list[tuple[_State, int, int]] = []
        for s, st in zip(out.scheduled, states):
            if st.feats is not None:
                idx = st.image_index[s.num_computed_tokens:s.num_computed_tokens + s.num_new_tokens]  # [n]
                hit = np.nonzero(idx >= 0)[0]
                if hit.size:
                    image_rows += (hit + len(input_ids)).tolist()
                    feats.append(st.feats[torch.from_numpy(idx[hit]).to(st.feats.device)])
            ids = s.new_token_ids
            if st.query_start is not None:
                start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
                first = max(start, st.query_start)  # the chunk's first query row (absolute)
                if end > first:
                    q0, q1 = first - st.query_start, end - st.query_start  # query indices [q0, q1)
                    rows = list(range(len(input_ids) + first - start, len(input_ids) + end - start))
                    image_rows += rows
                    hidden_rows += rows
                    feats.append(self.model.queries.weight[0, q0:q1])  # [q1 - q0, H]
                    query_slices.append((st, q0, q1))
                    ids = ids[:first - start] + [0] * (end - first)  # placeholders -> any valid id
            input_ids += ids
        return StepInputs(
            input_ids=input_ids, block_ids=[s.block_table for s in out.scheduled],
            num_computed_tokens=[s.num_computed_tokens for s in out.scheduled],
            num_new_tokens=[s.num_new_tokens for s in out.scheduled],
            prompt_positions=[st.positions for st in states], mrope_deltas=[st.delta for st in states],
            is_decode=not any(s.is_prefill for s in out.scheduled),
            image_rows=image_rows, image_feats=torch.cat(feats) if feats else None,
            hidden_rows=hidden_rows), query_slices

    @staticmethod
    def _store_query_states(hidden: Tensor | None, query_slices: list[tuple[_State, int, int]]) -> None:
        """Copy this step's query hidden states `[R, H]` into each T2I request's `[Q, H]` buffer (a
        recomputation after preemption simply overwrites its rows)."""
        row = 0
        for st, q0, q1 in query_slices:
            st.hidden[q0:q1] = hidden[row:row + q1 - q0]
            row += q1 - q0

    def _t2i_output(self, st: _State) -> RequestOutput:
        self._states.pop(st.request.request_id, None)
        return RequestOutput(st.request.request_id, [], "", True, st.request.finish_reason.value,
                             prompt_tokens=st.query_start, hidden_states=st.hidden)

    def _sample(self, logits: Tensor, states: list[_State]) -> list[int]:
        """Next token per row of logits `[R, V]`: greedy rows take the penalized argmax; the others
        sample from their own generator. One host transfer at the end."""
        dev = logits.device
        params = [st.params for st in states]
        if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            # Nothing to process: prepare_logits' argmax of these rows is the plain argmax (the fp32
            # upcast is exact and monotone). Skips its top-k sort over the vocabulary.
            return logits.argmax(dim=-1).tolist()
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32).to(dev, non_blocking=True)
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(dev, non_blocking=True)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64).to(dev, non_blocking=True)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen_lists = [st.request.token_ids for st in states]
            width = max(len(s) for s in seen_lists)
            seen = torch.full((len(states), width), -1, dtype=torch.int64)
            for i, ids in enumerate(seen_lists):
                seen[i, :len(ids)] = torch.tensor(ids)
            seen = seen.to(dev, non_blocking=True)
        else:
            seen = torch.empty((len(states), 0), dtype=torch.int64, device=dev)
        processed, tokens = prepare_logits(logits, seen, penalty, temperature, top_k)  # [R, V], [R]
        for i, p in enumerate(params):
            if not p.greedy:
                row = apply_top_p(processed[i], p.top_p)
                tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=states[i].generator)[0]
        return tokens.tolist()

    def _is_stop(self, st: _State, token: int) -> bool:
        """Take in `token`'s text; True for a stop token (never decoded: its text is not part of the output)
        or when a stop string completes (the text up to it is remembered)."""
        if token in st.stop_ids:
            return True
        st.held += st.detok.add(token)
        if not st.params.stop:
            return False
        # Text before `held` was checked at earlier tokens and cannot change, so a new stop string ends
        # in the new or pending text and starts at most len(longest) - 1 characters earlier, i.e. within
        # `held` (`_output` keeps those back). Any stop string found here is then also the earliest one.
        window = st.held + st.detok.pending
        cut = find_stop_string(window, st.params.stop)
        if cut >= 0:
            st.stop_tail = window[:cut]
            return True
        return False

    def _output(self, st: _State, token: int) -> RequestOutput:
        req = st.request
        finished = req.finish_reason is not None
        if st.stop_tail is not None:  # a stop string ended it: the text stops before it
            delta = st.stop_tail
        elif finished:  # all the rest, incomplete characters included (a stop token was never decoded)
            delta = st.held + st.detok.flush()
        else:  # hand out the final text except where a stop string may still begin
            keep = min(len(st.held), max(len(s) for s in st.params.stop) - 1) if st.params.stop else 0
            delta, st.held = st.held[:len(st.held) - keep], st.held[len(st.held) - keep:]
        st.emitted += delta
        if finished:
            self._states.pop(req.request_id, None)
        return RequestOutput(req.request_id, [token], delta, finished, req.finish_reason.value if finished else None,
                             list(req.output_token_ids), st.emitted, req.num_prompt_tokens,
                             queue_time=req.queue_time)  # output_token_ids is a copy: the request's list
        # keeps growing, and an output already handed out must not change under its holder


__all__ = ["ARStage", "QUERY_PLACEHOLDER_ID", "RequestOutput", "image_content_hash"]
