"""`bench mixed`: chat and image clients through ONE engine, the step loop against the serial baseline.

Workload (seeded, the same for every policy): N chat clients and M image clients. Each client draws the
times of its requests from a Poisson process (exponential gaps with mean `chat_interval_s` /
`image_interval_s`, the first one too, so clients arrive at different times) and, like a real client,
has at most one request in flight: a request is sent at its Poisson time or when the client's previous
request finished, whichever is later. No request is sent after `duration_s`; the ones in flight then
finish (the drain). Chat requests are fresh random conversations (no prefix-cache hits beyond the system
prompt) answered with exactly `gen_tokens` greedy tokens; image requests are distinct captions with
`dit_steps` / `decoder_steps` steps, each with its own seed.

Driver: one thread calls the engine's request-level API — `add_request`, `add_image_request`, `step` —
submitting due arrivals between steps and sleeping when the engine is idle. A request that became due
during a long step is submitted after it, but its latencies count from its due time, so a stalled loop
shows in them.

Policies (`SchedulerConfig.policy`): "interleave" (the step loop: every step does LLM work and one unit of
image work — a few DiT steps, one decoder step over the continuous batch, or a piece of a VAE), "serial"
(the baseline, the behaviour before the step loop: once an image has its prefill, it runs alone to its end
inside one step while chat and the other images wait, as a server serialising `generate_image` calls did)
and, on request, "static" (static batching: every image prefilled so far runs to its end as one batch). Each
runs in its own engine over the same weights, one after the other in the same process, the baseline first
(so that each later row is written with its ratio to it).

Reported per policy (CSV rows, backend = policy, ratio_to_reference against "serial"):
- mixed_chat_ttft: arrival to first token, per chat request (median, p10/p90; p99 in the notes);
- mixed_chat_itl: the gaps between consecutive tokens of a request; tok/s = generated tokens / makespan;
- mixed_image_latency: arrival to the finished image; images/s = finished images / makespan; the notes give
  a decoder step's cost per image alone and at the largest batch (what continuous batching can save);
- mixed_chat_stall: the longest gap between consecutive chat tokens that overlaps image work (any step in
  which an image was past its prefill), next to `limit_ms` = one decoder step (at the run's largest image
  batch) + one decode step (at N chats), both measured in the same process before the runs at their 90th
  percentile (a maximum over hundreds of gaps against medians would fail on noise alone; the medians' sum
  is in the notes as `limit_median_ms`), and the DiT chunk and VAE times (notes).
makespan = the time from the start to the last finished request (drain included).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine import Engine
from ..engine_config import EngineConfig
from ..errors import ConfigError
from ..outputs import ImageOutput, RequestOutput
from ..params import ImageParams, SamplingParams
from ..runtime.step_loop import StepTrace
from .engines import engine_parts
from .report import host_load
from .stages import BenchSettings, StageResult, Workload, _decoder_batch, _stepped_run
from .timing import Timer, Timing, TimingPolicy

POLICIES = ("interleave", "static", "serial")


@dataclass(frozen=True)
class MixedSettings:
    chat_clients: int = 2
    image_clients: int = 2
    duration_s: float = 120.0
    chat_interval_s: float = 3.0  # mean gap between a chat client's requests (Poisson)
    image_interval_s: float = 40.0  # mean gap between an image client's requests (Poisson)
    policies: tuple[str, ...] = ("interleave", "serial")

    def __post_init__(self) -> None:
        if self.chat_clients < 0 or self.image_clients < 0 or self.chat_clients + self.image_clients == 0:
            raise ValueError("mixed: need chat_clients >= 0, image_clients >= 0, and at least one client")
        if self.duration_s <= 0 or self.chat_interval_s <= 0 or self.image_interval_s <= 0:
            raise ValueError("mixed: duration and mean intervals must be > 0 seconds")
        if not self.policies or set(self.policies) - set(POLICIES):
            raise ValueError(f"mixed: policies must be among {POLICIES}, got {self.policies}")


def poisson_times(rng: np.random.Generator, mean_gap_s: float, duration_s: float) -> list[float]:
    """Arrival times in [0, duration) of a Poisson process with mean gap `mean_gap_s` (seconds)."""
    times, t = [], float(rng.exponential(mean_gap_s))
    while t < duration_s:
        times.append(t)
        t += float(rng.exponential(mean_gap_s))
    return times


@dataclass(eq=False)
class Client:
    kind: str  # "chat" | "image"
    index: int
    due: list[float]  # Poisson times still to come
    busy: bool = False
    free_at: float = 0.0  # when its previous request finished

    def next_send(self, duration_s: float) -> float | None:
        """When this idle client sends its next request (None: it sends no more)."""
        while self.due:
            t = max(self.due[0], self.free_at)
            if t < duration_s:
                return t
            self.due.clear()
        return None


def make_clients(s: MixedSettings, seed: int) -> list[Client]:
    rng = np.random.default_rng(seed)
    clients = [Client("chat", i, poisson_times(rng, s.chat_interval_s, s.duration_s)) for i in range(s.chat_clients)]
    clients += [Client("image", i, poisson_times(rng, s.image_interval_s, s.duration_s))
                for i in range(s.image_clients)]
    return clients


@dataclass(eq=False)
class _Request:
    client: Client
    arrival: float  # seconds from the run's start
    tokens: list[float] = field(default_factory=list)  # host time of each token (chat)
    done: float | None = None


@dataclass(frozen=True)
class _Step:
    start: float
    end: float
    image_work: bool  # an image was past its prefill (DiT, decoder or VAE) when the step began
    trace: StepTrace | None = None  # what the step ran (the engine's own account)

    def describe(self) -> str:
        t = self.trace
        if t is None:
            return f"step {(self.end - self.start) * 1e3:.1f} ms"
        llm = f"LLM {t.llm_s * 1e3:.1f} ms{' (prompt tokens)' if t.prompt_tokens else ''}"
        if t.unit is None:
            return llm
        unit = f"decoder ({t.decoder_batch} images)" if t.unit == "decoder" else t.unit
        return f"{llm} + {unit} {t.unit_s * 1e3:.1f} ms"


@dataclass(frozen=True)
class PolicyRun:
    policy: str
    chats: list[_Request]
    images: list[_Request]
    steps: list[_Step]
    makespan_s: float
    load: float | None


def run_policy(engine: Engine, w: Workload, s: MixedSettings, policy: str, log: Callable[[str], None]) -> PolicyRun:
    """Drive `engine` through the seeded workload (module docstring)."""
    settings = w.settings
    chat_params = SamplingParams(max_tokens=settings.gen_tokens, temperature=0.0, ignore_eos=True)
    clients = make_clients(s, settings.seed)
    live: dict[str, _Request] = {}
    loop = engine_parts(engine).loop
    chats, images, steps = [], [], []
    count = 0
    load = host_load()
    start = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - start

    def submit(client: Client, at: float) -> None:
        nonlocal count
        client.due.pop(0)
        client.busy = True
        rid = f"{policy}-{client.kind}-{client.index}-{count}"
        request = _Request(client, at)
        if client.kind == "chat":
            engine.add_request(rid, w.fresh_chats(1)[0], chat_params)
            chats.append(request)
        else:
            params = ImageParams(dit_steps=settings.dit_steps, decoder_steps=settings.decoder_steps,
                                 seed=settings.seed + count)
            engine.add_image_request(rid, f"{count} {w.caption}", params)
            images.append(request)
        live[rid] = request
        count += 1

    while True:
        t = now()
        waits = []
        for c in clients:
            if c.busy:
                continue
            send = c.next_send(s.duration_s)
            if send is not None and send <= t:
                submit(c, send)
            elif send is not None:
                waits.append(send)
        if not engine.has_unfinished():
            if not waits:
                break
            time.sleep(max(0.0, min(waits) - now()))
            continue
        by_stage = engine.stats().images_by_stage
        image_work = by_stage["dit"] + by_stage["decoder"] + by_stage["vae"] > 0
        t0 = now()
        outputs = engine.step()
        t1 = now()
        steps.append(_Step(t0, t1, image_work, loop.trace))
        for out in outputs:
            _record(out, live, t1, log)
    makespan = max([r.done for r in chats + images if r.done is not None], default=now())
    return PolicyRun(policy, chats, images, steps, makespan, load)


def _record(out: RequestOutput | ImageOutput, live: dict[str, _Request], t: float, log) -> None:
    request = live.get(out.request_id)
    if request is None:
        return
    if isinstance(out, RequestOutput):
        request.tokens += [t] * len(out.new_token_ids)
    if out.finished:
        if out.error is not None:
            raise RuntimeError(f"mixed: request {out.request_id} failed: {out.error}")
        request.done = t
        request.client.busy = False
        request.client.free_at = t
        del live[out.request_id]


@dataclass(frozen=True)
class StepTimes:
    """The pieces an engine step is made of, measured alone on the engine before the runs (ms)."""

    decode_ms: float  # one decode step of `chats` requests (median inter-token gap)
    decoder_ms: float  # one decoder step over `images` images
    dit_chunk_ms: float  # one engine step's DiT work (dit_steps_per_iteration steps) for one image
    vae_ms: float  # one image's VAE decode
    chats: int
    images: int
    dit_chunk: int
    decoder_one_ms: float = float("nan")  # one decoder step over one image (what batching saves: vs decoder_ms)
    decode_p90_ms: float | None = None  # the 90th percentiles of the same samples (None: the medians)
    decoder_p90_ms: float | None = None

    @property
    def limit_ms(self) -> float:
        """The longest chat gap the step loop should ever show: one decoder step + one decode step, each at its
        90th percentile measured alone. The run's worst gap is the maximum of hundreds of such sums, so a
        limit from medians would be exceeded by timing noise alone."""
        decoder = self.decoder_ms if self.decoder_p90_ms is None else self.decoder_p90_ms
        decode = self.decode_ms if self.decode_p90_ms is None else self.decode_p90_ms
        return decoder + decode


def measure_step_times(engine: Engine, w: Workload, s: MixedSettings, log: Callable[[str], None]) -> StepTimes:
    timer = Timer(engine.device)
    policy = TimingPolicy(warmup=1, reps=5, min_reps=3, budget_s=5.0)
    chats = max(1, s.chat_clients)
    gaps: list[list[float]] = []
    timer.measure(_stepped_run(engine, w, chats, 9, gaps), TimingPolicy(warmup=1, reps=3, min_reps=2, budget_s=5.0))
    decode_gaps = [g for run in gaps[1:] for g in run]
    decode, decode_p90 = float(np.median(decode_gaps)), float(np.percentile(decode_gaps, 90))
    if not s.image_clients:
        nan = float("nan")
        log(f"  step pieces: decode step ({chats} chats) {decode:.1f} ms")
        return StepTimes(decode, nan, nan, nan, chats, 0, 0)
    parts = engine_parts(engine)
    images = min(s.image_clients, engine.config.scheduler.max_image_batch)
    cfg, (lh, lw) = w.cfg, w.latent_hw
    feats, noise = w.randn(images, cfg.n_query, cfg.dit.in_channels), w.randn(images, cfg.unet.in_channels, lh, lw)
    p = w.image_params
    with torch.inference_mode(), _decoder_batch(engine, feats, feats[:1], noise, 16, p.decoder_guidance) as step:
        decoder_timing = timer.measure(step, policy)
    decoder, decoder_one = decoder_timing.median_ms, decoder_timing.median_ms
    if images > 1:
        with torch.inference_mode(), _decoder_batch(engine, feats[:1], feats[:1], noise[:1], 16,
                                                    p.decoder_guidance) as step:
            decoder_one = timer.measure(step, policy).median_ms
    k = parts.dit_chunk if parts.dit_chunk < 1_000 else w.settings.dit_steps
    k = min(k, w.settings.dit_steps)
    cond = w.randn(1, cfg.n_query, cfg.text.hidden_size)
    dit_noise = w.randn(1, cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size).float()
    run = parts.flow.begin(cond, dit_noise, k * 8, p.dit_guidance)
    dit = timer.measure(lambda: parts.flow.advance(run, k), policy).median_ms
    latents = w.randn(1, cfg.vae.latent_channels, lh, lw)
    with torch.inference_mode():
        vae = timer.measure(lambda: parts.decoder.latents_to_pixels(latents), policy).median_ms
    times = StepTimes(decode, decoder, dit, vae, chats, images, k, decoder_one, decode_p90, decoder_timing.p90_ms)
    log(f"  step pieces: decode step ({chats} chats) {decode:.1f} ms, decoder step ({images} images) {decoder:.1f} ms "
        f"({decoder_one:.1f} ms for one), DiT chunk ({k} steps) {dit:.1f} ms, VAE {vae:.1f} ms")
    return times


@dataclass(frozen=True)
class Stall:
    """The chat gaps that overlap image work (steps in which an image was past its prefill)."""

    worst_ms: float | None  # the longest of them
    longest_ms: float | None  # the longest chat gap of the run, overlapping image work or not
    gaps: int  # how many gaps overlap image work
    max_units: int  # the most image units any of them spans (1: a chat token never waits for two units)
    worst_steps: tuple[_Step, ...] = ()  # the engine steps inside the worst gap
    worst_between_ms: float = 0.0  # the worst gap's time outside engine steps (the driver's submissions)

    def describe(self) -> str:
        steps = " / ".join(s.describe() for s in self.worst_steps)  # no ';': it separates the CSV's notes
        return f"{len(self.worst_steps)} step(s): {steps}, between steps {self.worst_between_ms:.1f} ms"


def stall(run: PolicyRun) -> Stall:
    """The chat gaps overlapping image work (see `Stall`), from the token times and the step records."""
    starts = np.array([st.start for st in run.steps])  # steps run one after another: both sorted
    ends = np.array([st.end for st in run.steps])
    work = np.concatenate([[0], np.cumsum([st.image_work for st in run.steps])])  # image-work steps before i
    units = np.concatenate([[0], np.cumsum([st.trace is not None and st.trace.unit is not None for st in run.steps])])
    worst, longest, n, max_units, worst_span = None, None, 0, 0, (0, 0)
    for r in run.chats:
        for a, b in zip(r.tokens, r.tokens[1:]):
            gap = (b - a) * 1e3
            longest = gap if longest is None else max(longest, gap)
            first, last = np.searchsorted(ends, a, "right"), np.searchsorted(ends, b, "right")  # steps in (a, b]
            if last > first and work[last] - work[first] > 0:
                n += 1
                max_units = max(max_units, int(units[last] - units[first]))
                if worst is None or gap > worst:
                    worst, worst_span = gap, (first, last)
    inside = tuple(run.steps[worst_span[0]:worst_span[1]])
    between = (worst - sum((s.end - s.start) * 1e3 for s in inside)) if worst is not None else 0.0
    return Stall(worst, longest, n, max_units, inside, between)


def decoder_steps_in_run(run: PolicyRun) -> tuple[int, list[float]]:
    """The engine steps of the run that were one LLM step + one decoder step at the run's largest decoder
    batch: (that batch, their durations in ms). What a chat gap is made of, timed as it ran (next to the
    same pieces measured alone: host noise and the caches both differ)."""
    decoder = [s for s in run.steps if s.trace is not None and s.trace.unit == "decoder"]
    if not decoder:
        return 0, []
    batch = max(s.trace.decoder_batch for s in decoder)
    return batch, [(s.end - s.start) * 1e3 for s in decoder if s.trace.decoder_batch == batch]


def policy_results(run: PolicyRun, times: StepTimes, s: MixedSettings) -> list[StageResult]:
    """The CSV rows of one policy's run (module docstring)."""
    pol, n, m = run.policy, s.chat_clients, s.image_clients
    load = f"loadavg_start={run.load:.1f}" if run.load is not None else "loadavg_start=?"
    common = (f"policy={pol}", f"clients={n} chat + {m} image", f"duration_s={s.duration_s:g}",
              f"makespan_s={run.makespan_s:.1f}", load)
    finished_chats = [r for r in run.chats if r.done is not None]
    tokens = sum(len(r.tokens) for r in run.chats)
    tok_s = tokens / run.makespan_s if run.makespan_s > 0 else 0.0
    done_images = [r for r in run.images if r.done is not None]
    img_s = len(done_images) / run.makespan_s if run.makespan_s > 0 else 0.0

    def row(stage: str, batch: int, samples_ms: list[float], extra: tuple[str, ...], empty: str) -> StageResult:
        if not samples_ms:
            return StageResult(stage, pol, batch, None, None, notes=(*extra, *common), skipped=empty)
        timing = Timing(tuple(samples_ms))
        return StageResult(stage, pol, batch, timing, None, notes=(f"p99_ms={timing.p99_ms:.4g}", *extra, *common))

    ttft = [(r.tokens[0] - r.arrival) * 1e3 for r in run.chats if r.tokens]
    itl = [(b - a) * 1e3 for r in run.chats for a, b in zip(r.tokens, r.tokens[1:])]
    latency = [(r.done - r.arrival) * 1e3 for r in done_images]
    st = stall(run)
    worst, longest = st.worst_ms, st.longest_ms
    # What continuous batching can save on this device: a decoder step's cost per image, alone vs batched.
    per_image = (f"decoder_ms_per_image={times.decoder_one_ms:.4g} (1 image) / "
                 f"{times.decoder_ms / max(times.images, 1):.4g} ({times.images} images)")
    limit = times.limit_ms
    batch, in_run = decoder_steps_in_run(run)
    in_run_note = (f"decoder_steps_in_run_ms=median {np.median(in_run):.4g} / max {max(in_run):.4g} "
                   f"({len(in_run)} steps of LLM + decoder at {batch} images)" if in_run else "decoder_steps_in_run_ms=")
    stall_notes = (f"limit_ms={limit:.4g}", f"limit_median_ms={times.decoder_ms + times.decode_ms:.4g}",
                   f"decoder_step_ms={times.decoder_ms:.4g} ({times.images} images)",
                   f"decode_step_ms={times.decode_ms:.4g} ({times.chats} chats)",
                   f"dit_chunk_ms={times.dit_chunk_ms:.4g} ({times.dit_chunk} steps)", f"vae_ms={times.vae_ms:.4g}",
                   f"within_limit={'yes' if worst is not None and worst <= limit else 'no'}",
                   in_run_note, f"max_units_per_gap={st.max_units}", f"worst_gap={st.describe()}" if st.worst_steps else "worst_gap=",
                   f"gaps_during_images={st.gaps}", f"max_gap_ms={longest:.4g}" if longest else "max_gap_ms=")
    return [
        row("mixed_chat_ttft", n, ttft, (f"requests={len(run.chats)}", f"finished={len(finished_chats)}"),
            "no chat request"),
        row("mixed_chat_itl", n, itl, (f"tok/s={tok_s:.3g}", f"tokens={tokens}"), "no chat token gap"),
        row("mixed_chat_stall", n, [worst] if worst is not None else [], stall_notes,
            "no chat tokens while images ran"),
        row("mixed_image_latency", m, latency, (f"images/s={img_s:.3g}", f"images={len(done_images)}",
                                                f"requests={len(run.images)}", per_image), "no image finished"),
    ]


def run_mixed(model: str, device: torch.device, dtype: torch.dtype, settings: BenchSettings, s: MixedSettings,
              compile: bool | None = None, log: Callable[[str], None] | None = None,
              emit: Callable[[list[StageResult]], None] | None = None) -> list[StageResult]:
    """Both policies, one after the other, over one model's weights (module docstring)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    results: list[StageResult] = []
    model_weights = None
    times = w = None
    for policy in sorted(s.policies, key=lambda name: name != "serial"):  # the baseline first: rows get their ratio
        config = EngineConfig().with_overrides(policy=policy)
        if model_weights is None:
            engine = Engine.from_pretrained(model, device=device, dtype=dtype, backend="optimized", config=config,
                                            compile=compile)
            model_weights = (engine.model, engine.tokenizer, engine.prompts.image_processor, engine.name)
        else:  # same weights; the previous engine (its KV pool, graphs) is gone first
            m, tok, proc, name = model_weights
            engine = Engine(m, tok, proc, backend="optimized", name=name, config=config, compile=compile)
        if s.image_clients and not engine.cfg.can_generate_images:
            raise ConfigError(f"bench mixed: model {model!r} cannot generate images; use --image-clients 0")
        if w is None:
            w = Workload(engine, settings)
        log(f"policy {policy}: warming up (null features, one chat)")
        if s.image_clients:  # the decoder's null features, once per engine (not any request's)
            engine.uncond_features(w.image_params)
        engine.chat(w.fresh_chats(1)[0], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        if times is None:
            times = measure_step_times(engine, w, s, log)
        log(f"policy {policy}: {s.chat_clients} chat + {s.image_clients} image clients for {s.duration_s:g} s")
        run = run_policy(engine, w, s, policy, log)
        rows = policy_results(run, times, s)
        for r in rows:
            shown = f"median {r.timing.median_ms:10.1f} ms, p99 {r.timing.p99_ms:10.1f} ms" if r.timing else r.skipped
            log(f"  {r.stage:<20} {policy:<10} {shown}")
        if emit is not None:
            emit(rows)
        results += rows
        del engine, run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


__all__ = ["MixedSettings", "POLICIES", "PolicyRun", "Stall", "StepTimes", "make_clients", "measure_step_times",
           "poisson_times", "policy_results", "run_mixed", "run_policy", "stall", "decoder_steps_in_run"]
