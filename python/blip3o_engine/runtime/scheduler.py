"""AR scheduler: continuous batching with chunked prefill and preemption by recompute (CPU only).

Each step, `schedule()` decides how many tokens every request computes, under a token budget
(`max_num_batched_tokens`) and a cap on running requests (`max_num_seqs`), and returns a plain
`SchedulerOutput`; the runner executes it and hands the sampled tokens to `update_from_output()`.
The two calls alternate. The scheduler never touches tensors.

Progress is counters, not phases: a request holds `num_tokens` tokens (prompt, then the outputs
sampled so far) of which the first `num_computed_tokens` have their KV in the cache. Prefill,
chunked prefill, decode and recomputation after a preemption are the same rule: compute the next
`num_tokens - num_computed_tokens` tokens (at most `long_prefill_chunk` of them at once, within
the budget); when a step's tokens reach the end, the last one's logits give the next token.

Policy (first come, first served):
  1. Running requests first, oldest first. When a request's new tokens need blocks the pool does
     not have, the newest running request is preempted: its blocks are freed, its
     `num_computed_tokens` reset to 0 and it goes back to the front of the waiting queue (its
     tokens are kept, so it resumes by recomputing them; the prefix cache often gives most back).
  2. Then, unless someone was preempted this step, waiting requests in order, while the budget,
     `max_num_seqs` and the pool allow; a prompt longer than the remaining budget is split.
A request that could not fit the pool even alone is refused by `add_request` (CapacityError), so
every accepted request finishes: the oldest running request is never preempted for another one.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from blip3o_engine.errors import CapacityError, InputError
from blip3o_engine.runtime.kv_manager import ImageSpan, KVBlockManager


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, new or preempted; holds no blocks
    RUNNING = "running"  # holds blocks; scheduled each step while the budget allows
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop condition seen by the caller (EOS, stop token or string)
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """One AR request as the scheduler sees it: token ids and counters, nothing on the device."""

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    image_spans: tuple[ImageSpan, ...] = ()
    # Prefill only (T2I): the request finishes, without sampling, once all its tokens have KV. Its last
    # `num_uncached_tail` tokens are always computed and never enter the prefix cache (latent queries:
    # placeholder ids, and their hidden states are the request's output).
    prefill_only: bool = False
    num_uncached_tail: int = 0
    token_ids: list[int] = field(init=False)  # prompt, then the sampled outputs
    num_computed_tokens: int = field(default=0, init=False)  # tokens whose KV is in the cache
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    num_preemptions: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.token_ids = [int(t) for t in self.prompt_token_ids]
        self.prompt_token_ids = tuple(self.token_ids)
        self.image_spans = tuple(ImageSpan(*span) for span in self.image_spans)
        if not self.token_ids:
            raise InputError(f"request {self.request_id!r} has an empty prompt")
        if self.max_tokens < 1:
            raise InputError(f"request {self.request_id!r}: max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.num_uncached_tail < len(self.token_ids):
            raise InputError(f"request {self.request_id!r}: num_uncached_tail must be in [0, prompt length)")
        for span in self.image_spans:
            if span.offset < 0 or span.length < 1 or span.offset + span.length > len(self.token_ids):
                raise InputError(f"request {self.request_id!r}: image span {span} is outside the prompt")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_cacheable_tokens(self) -> int:
        """Tokens that may be shared through the prefix cache (all but the uncached tail)."""
        return len(self.token_ids) - self.num_uncached_tail


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute tokens [num_computed_tokens, + num_new_tokens)."""

    request_id: str
    num_computed_tokens: int  # tokens already in the KV cache (where this step's chunk starts)
    num_new_tokens: int
    new_token_ids: list[int]  # the tokens this step computes
    block_table: list[int]  # a snapshot covering num_computed_tokens + num_new_tokens tokens
    is_prefill: bool  # prompt tokens or recomputation; False for a one-token decode step
    samples: bool  # the chunk reaches the request's last token: sample the next one (never prefill-only)


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step runs; plain data for the model runner."""

    scheduled: list[ScheduledRequest]
    preempted_ids: list[str]  # preempted this step (their blocks are gone; they will recompute)
    finished_ids: list[str]  # finished or aborted since the previous step (drop per-request state)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Continuous-batching AR scheduler over a `KVBlockManager` (see the module docstring)."""

    def __init__(self, kv: KVBlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_chunk: int | None = None) -> None:
        chunk_ok = long_prefill_chunk is None or long_prefill_chunk >= 1
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or not chunk_ok:
            raise ValueError(f"max_num_seqs ({max_num_seqs}), max_num_batched_tokens ({max_num_batched_tokens}) "
                             f"and long_prefill_chunk ({long_prefill_chunk}) must be >= 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_chunk = long_prefill_chunk
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first: preemption takes from the end
        self._finished_ids: list[str] = []
        self._pending: SchedulerOutput | None = None  # scheduled, output not applied yet

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, req: Request) -> None:
        """Queue a new request. Raises CapacityError if it could not fit the KV pool even alone."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.status is not RequestStatus.WAITING or req.num_output_tokens or req.num_computed_tokens:
            raise ValueError(f"request {req.request_id!r} is not a fresh request")
        # The last sampled token's KV is never written, hence the -1; a prefill-only request samples nothing.
        max_kv_tokens = req.num_prompt_tokens + (0 if req.prefill_only else req.max_tokens - 1)
        need = self.kv.blocks_for(max_kv_tokens)
        if need > self.kv.num_blocks:
            raise CapacityError(
                f"request {req.request_id!r} needs up to {need} KV blocks ({req.num_prompt_tokens} prompt tokens "
                f"+ max_tokens {req.max_tokens}, {self.kv.block_size} tokens a block) but the KV pool holds only "
                f"{self.kv.num_blocks} blocks ({self.kv.num_blocks * self.kv.block_size} tokens)")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then waiting ones (module docstring)."""
        if self._pending is not None:
            raise RuntimeError("update_from_output() must apply the previous step before the next schedule()")
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, budget)
            if not self._allocate_or_preempt(req, n, preempted):
                break  # req preempted itself: it was the last running request
            scheduled.append(self._scheduled(req, n))
            budget -= n
            i += 1
        if not preempted:  # admitting now would only take blocks the preempted need back
            budget = self._admit_waiting(budget, scheduled)
        out = SchedulerOutput(scheduled, preempted, self._finished_ids)
        self._finished_ids = []
        self._pending = out
        return out

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int],
                           stopped: Collection[str] = ()) -> list[Request]:
        """Apply a step: advance every scheduled request's computed tokens, append the token sampled
        for each request whose chunk reached its end (`samples`), and finish those in `stopped` (reason
        stop) or at max_tokens (reason length); a prefill-only request finishes (reason stop) once all
        its tokens are computed. Requests aborted meanwhile are skipped. Returns the requests finished
        by this step."""
        if output is not self._pending:
            raise ValueError("update_from_output() takes the output of the latest schedule()")
        live = [s for s in output.scheduled if self._is_running(s.request_id)]
        self._check_sampled(output, live, sampled_token_ids, stopped)
        self._pending = None
        finished: list[Request] = []
        for s in live:
            req = self.requests[s.request_id]
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(req.request_id, req.token_ids,
                                      min(req.num_computed_tokens, req.num_cacheable_tokens), req.image_spans)
            if req.prefill_only and req.num_computed_tokens == req.num_tokens:
                finished.append(self._finish(req, FinishReason.STOP))
                continue
            if not s.samples:
                continue
            req.token_ids.append(int(sampled_token_ids[s.request_id]))
            if s.request_id in stopped:
                finished.append(self._finish(req, FinishReason.STOP))
            elif req.num_output_tokens >= req.max_tokens:
                finished.append(self._finish(req, FinishReason.LENGTH))
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return finished

    def make_room(self, num_blocks: int) -> list[str]:
        """Free pool blocks for work outside the schedule (a prefill computed alone, between steps): preempt
        the newest running requests until `num_blocks` blocks are free. Returns the preempted ids; raises
        CapacityError if the pool cannot hold that many blocks at all."""
        if self._pending is not None:
            raise RuntimeError("make_room() runs between steps, not while one is scheduled")
        if num_blocks > self.kv.num_blocks:
            raise CapacityError(f"{num_blocks} KV blocks are needed but the pool holds {self.kv.num_blocks}")
        preempted = []
        while self.kv.num_free_blocks < num_blocks and self.running:
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
        return preempted

    def discard_pending(self) -> list[str]:
        """Forget the latest schedule() whose step failed: its requests are aborted (their work is lost with
        the step; the caller fails them). Returns their ids."""
        if self._pending is None:
            return []
        ids = [s.request_id for s in self._pending.scheduled]
        self._pending = None
        for rid in ids:
            self.abort(rid)
        return ids

    def abort(self, request_id: str) -> bool:
        """Finish a waiting or running request with reason abort, freeing its blocks. Returns False if
        the request is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
        self._finish(req, FinishReason.ABORT)
        return True

    # --------------------------------------------------------------------------------------------

    def _is_running(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        return req is not None and req.status is RequestStatus.RUNNING

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        n = req.num_tokens - req.num_computed_tokens
        if n > 1 and self.long_prefill_chunk is not None:
            n = min(n, self.long_prefill_chunk)
        return min(n, budget)

    def _allocate_or_preempt(self, req: Request, n: int, preempted: list[str]) -> bool:
        """Get blocks for req's next n tokens, preempting the newest running requests as needed.
        Returns False if req itself had to be preempted."""
        while not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)  # ahead of newer requests: it was admitted before them

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        """Move waiting requests to running in order while they fit; returns the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            # A request always needs at least one fresh block: prefix hits hold only full blocks
            # before its last token, which is always computed.
            if self.kv.num_free_blocks == 0:
                break
            req = self.waiting[0]
            limit = min(req.num_tokens - 1, req.num_cacheable_tokens)  # the last token is always computed
            hit = self.kv.lookup_prefix(req.request_id, req.token_ids, limit, req.image_spans)
            req.num_computed_tokens = hit
            n = self._num_new_tokens(req, budget)
            if not self.kv.allocate_slots(req.request_id, hit + n):
                self.kv.free(req.request_id)  # give the prefix hits back; try again next step
                req.num_computed_tokens = 0
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._scheduled(req, n))
            budget -= n
        return budget

    def _scheduled(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(
            request_id=req.request_id, num_computed_tokens=start, num_new_tokens=n,
            new_token_ids=req.token_ids[start:start + n], block_table=list(self.kv.block_table(req.request_id)),
            is_prefill=n > 1 or start < req.num_prompt_tokens,
            samples=start + n == req.num_tokens and not req.prefill_only)

    @staticmethod
    def _check_sampled(output: SchedulerOutput, live: list[ScheduledRequest],
                       sampled_token_ids: Mapping[str, int], stopped: Collection[str]) -> None:
        """Reject an inconsistent output before changing anything. Tokens and stops of requests
        aborted since the step was scheduled are allowed (and ignored)."""
        sampling = {s.request_id for s in live if s.samples}
        missing = sampling - set(sampled_token_ids)
        if missing:
            raise ValueError(f"no sampled token for requests {sorted(missing)}")
        aborted = {s.request_id for s in output.scheduled} - {s.request_id for s in live}
        unexpected = (set(sampled_token_ids) | set(stopped)) - sampling - aborted
        if unexpected:
            raise ValueError(f"tokens or stops given for requests that did not sample this step: {sorted(unexpected)}")

    def _finish(self, req: Request, reason: FinishReason) -> Request:
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
        return req
