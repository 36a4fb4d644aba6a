"""What each benchmark mode times, with the cost each measurement is judged against.

Modes:
- chat: time to first token (`chat_ttft`) and the inter-token latency (`decode_step`; tokens/s in
  the notes) at each `--batch` (concurrency), per backend, plus transformers' `generate` when the
  "transformers" backend is asked for (see `run_chat` for the methods).
- t2i: the AR prefill of a T2I prompt (`ar_prefill`), the DiT sampling loop (`dit_loop`), the pixel
  decoder loop with its VAE decode (`decoder_loop`) and the whole `generate_image` (`t2i_e2e`).
- stages: micro rows, each timing exactly the call its backend's step loop makes (`module_stages`):
  `dit_step` = the engine's DiT stage advancing a run by one engine step's worth of Euler steps (per
  step), `unet_step` = ONE decoder step over an admitted batch, `unet_self_attn` = the UNet's first
  self-attention as the backend runs it, `vae_decode` = the decoder's latents-to-pixels.
- kernels: one row per Triton / CUDA kernel against its torch twin (`bench/kernels.py`), CUDA only.
- mixed: chat and image clients through one engine, step loop against the serial baseline
  (`bench/mixed.py`; not part of `all`).
Every run first measures the ceilings (copy bandwidth, GEMM rate, convolution rate), reported as rows too.

Loops and end-to-end rows drive the public `Engine` API; micro rows call the engine's own stage objects
(`engines.engine_parts`). Inputs are random (never zeros) and made once, outside the timed region, then
shared by every backend. Every backend's run of a stage directly follows the previous backend's, so
drift (clocks, temperature, the host's load) hits both alike.
"""

from __future__ import annotations

import contextlib
import string
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine import Engine
from ..ops.dispatch import reference_ops
from ..params import ImageParams, SamplingParams
from . import costs
from .ceilings import Ceilings, Rate, measure_ceilings
from .costs import Cost
from .engines import TransformersChat, engine_parts
from .timing import Timer, Timing, TimingPolicy

MODES = ("chat", "t2i", "stages", "kernels", "export", "mixed")
# `all` runs the cheap modes first, so a run cut short by a time limit keeps the most per second.
ALL_ORDER = ("kernels", "stages", "t2i", "chat")
REFERENCE = "reference"
# The baseline backend of a (stage, batch) group, which `ratio_to_reference` divides by: the reference
# engine, a kernel's torch twin (`bench kernels`), the serial step-loop policy (`bench mixed`).
BASELINES = (REFERENCE, "torch", "serial")
STAGE_NAMES = {
    "chat": ("chat_ttft", "decode_step"),
    "t2i": ("ar_prefill", "dit_loop", "decoder_loop", "t2i_e2e"),
    "stages": ("dit_step", "unet_step", "unet_self_attn", "vae_decode"),
    "kernels": ("rms_norm", "fused_add_rms_norm", "swiglu", "mrope_rotary", "write_kv_cache",
                "paged_decode_attention", "paged_prefill_attention", "rms_norm_modulate", "gated_rms_residual",
                "layer_norm_rope", "prepare_logits"),
    "mixed": ("mixed_chat_ttft", "mixed_chat_itl", "mixed_chat_stall", "mixed_image_latency"),
    # `export` (bench/export_bench.py; not part of `all`: it exports first, minutes per graph at real sizes)
    "export": ("export_llm_prefill", "export_llm_decode", "export_dit_caption", "export_dit", "export_unet",
               "export_vae"),
}


@dataclass(frozen=True)
class BenchSettings:
    batches: tuple[int, ...] = (1, 8)  # chat batch sizes / concurrencies (cli: 1,16 on CPU, 1,8,32,64 on CUDA)
    dit_steps: int = 30
    decoder_steps: int = 50
    gen_tokens: int = 32  # decode steps timed per chat request
    prompt_tokens: int = 128  # length of the random chat message, in tokens
    t2i_tokens: int = 98  # target AR length of the T2I prefill, [IMG] and queries included (docs/model_spec.md §4)
    image_batches: tuple[int, ...] = (1, 4)  # text-to-image batch sizes of the t2i_e2e stage
    seed: int = 0
    only: tuple[str, ...] = ()  # stage names to run (empty = all of the mode)
    export_dir: str | None = None  # `export` mode: where the exports live (reused), None = a temporary directory
    policy: TimingPolicy = field(default_factory=TimingPolicy)


@dataclass(frozen=True)
class StageResult:
    stage: str
    backend: str
    batch: int
    timing: Timing | None  # None: not timed (`skipped` says why)
    cost: Cost | None  # None: no floor applies (the ceilings themselves, mixed-workload latencies)
    compile_ms: float | None = None  # an explicit compile/capture step's time; None: the engine has none
    notes: tuple[str, ...] = ()
    skipped: str | None = None  # why the row was not timed (e.g. a kernel row on CPU)
    gb_per_s: float | None = None  # achieved rates when not cost / median (the ceilings: from the fastest run)
    tflop_per_s: float | None = None


# What `Stage.prepare` returns: the closure to time, or a context manager that yields it and cleans up after
# the timing (a decoder batch admitted for the row is released).
Prepared = Callable[[], object] | contextlib.AbstractContextManager


@dataclass(frozen=True)
class Stage:
    """A timed callable per backend: `prepare(engine)` returns the closure to time (see `Prepared`)."""

    name: str
    batch: int
    prepare: Callable[[Engine], Prepared]
    cost: Cost | None
    notes: tuple[str, ...] = ()
    rate: tuple[str, int] | None = None  # (name, items per call): a note "name=items/s" from the median
    # Units of work per call, or a function of the engine giving it: samples are divided by it (a row per
    # DiT step, timed by chunks of the engine's `dit_steps_per_iteration`).
    per_call: int | Callable[[Engine], int] = 1
    describe: Callable[[Engine], str] | None = None  # a note naming what the backend runs


Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Random inputs


def random_text(tokenizer, n_tokens: int, rng: np.random.Generator) -> str:
    """Random lowercase words, added one at a time until the text is at least `n_tokens` tokens."""
    letters = list(string.ascii_lowercase)
    words: list[str] = []
    while True:
        words.append("".join(rng.choice(letters, size=int(rng.integers(3, 9)))))
        text = " ".join(words)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text


class Workload:
    """Inputs shared by all backends, made once from the settings' seed."""

    def __init__(self, engine: Engine, settings: BenchSettings):
        self.settings = settings
        self.cfg = engine.cfg
        self.device = engine.device
        self.dtype = engine.model.dtype
        self.bpp = torch.empty((), dtype=self.dtype).element_size()  # bytes per parameter
        self.engine_config = engine.config
        rng = np.random.default_rng(settings.seed)
        self.gen = torch.Generator(self.device).manual_seed(settings.seed)
        self.chat_text = random_text(engine.tokenizer, settings.prompt_tokens, rng)
        self._chat_count = 0
        self.chat_messages = self.fresh_chats(1)[0]
        self.chat_prompt_len = len(engine.prompts.chat(self.chat_messages).token_ids)
        if self.cfg.can_generate_images:
            fixed = len(engine.prompts.t2i("a").token_ids) - 1 + self.cfg.n_query  # template + [IMG] + queries
            self.caption = random_text(engine.tokenizer, max(8, settings.t2i_tokens - fixed), rng)
            self.t2i_len = len(engine.prompts.t2i(self.caption).token_ids) + self.cfg.n_query
            self._caption_count = 0
            one, two = (engine.prompts.t2i(c).token_ids for c in self.fresh_captions(2))
            self._caption_count = 0
            self.fresh_len = len(one) + self.cfg.n_query
            # The template prefix every fresh caption shares: the prefix cache may hold it from an earlier request.
            self.fresh_shared = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
            self.image_params = ImageParams(dit_steps=settings.dit_steps, decoder_steps=settings.decoder_steps,
                                            seed=settings.seed)
            self.height, self.width = engine.image_size(self.image_params)
            f = self.cfg.vae.scale_factor
            self.latent_hw = (self.height // f, self.width // f)

    def fresh_chats(self, n: int) -> list[list[dict[str, str]]]:
        """`n` conversations never used before: the random message behind a 6-digit serial number
        (one token per digit, so every prompt has the same length). Without it the optimized
        backend's prefix cache would answer every repeated prompt's prefill from the previous run,
        and its TTFT would time only the last partial KV block. Only the shared system prompt (a
        realistic shared prefix) can still hit the cache."""
        first, self._chat_count = self._chat_count, self._chat_count + n
        return [[{"role": "user", "content": f"{k % 10**6:06d} {self.chat_text}"}] for k in range(first, first + n)]

    def fresh_captions(self, n: int) -> list[str]:
        """`n` captions never used before (a 6-digit serial number, one token per digit, before the caption), for
        the end-to-end rows: repeating one caption would let the prefix cache answer most of every timed run's
        prefill from the warm-up's."""
        first, self._caption_count = self._caption_count, self._caption_count + n
        return [f"{k % 10**6:06d} {self.caption}" for k in range(first, first + n)]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)


# ------------------------------------------------------------------------------------------------
# Stage lists per mode


def t2i_stages(w: Workload) -> list[Stage]:
    cfg, s = w.cfg, w.settings
    bpp, (lh, lw) = w.bpp, w.latent_hw
    q, clip = cfg.n_query, cfg.dit.in_channels
    prefill = costs.llm_prefill(cfg.text, w.t2i_len, bytes_per_param=bpp)
    # Floor of the DiT loop: CFG batch 2 per step; the caption work hoisted out of the loop, once per image
    # for its own row only (the null caption's is the same for every image: FlowSampler caches it).
    dit_loop = (s.dit_steps * costs.dit_step(cfg.dit, 2, hoisted=True, bytes_per_param=bpp)
                + costs.dit_caption_once(cfg.dit, 1, bytes_per_param=bpp))
    vae = costs.vae_decode(cfg.vae, 1, lh, lw, bytes_per_param=bpp)
    # Floor of the decoder loop: CFG batch 2 per step; cross-attention K/V, added and time embeddings once per
    # image (as PixelDecoder admits it), charged for the image's own row only (the null row's can be shared).
    decoder_loop = (s.decoder_steps * costs.unet_step(cfg.unet, 2, lh, lw, q, hoisted=True, bytes_per_param=bpp)
                    + costs.unet_once(cfg.unet, 1, lh, lw, q, bytes_per_param=bpp) + vae)
    feats, uncond = w.randn(1, q, clip), w.randn(1, q, clip)
    # Fresh captions: only their shared template prefix can come from the prefix cache; the rest is prefilled.
    e2e_prefill = costs.llm_prefill(cfg.text, w.fresh_len - w.fresh_shared, past=w.fresh_shared, bytes_per_param=bpp)

    def dit(engine: Engine):
        cond = engine.encode_prompt(w.caption)[None]  # [1, Q, H] the prompt's real query states
        return lambda: engine.sample_clip_features(cond, w.image_params)

    def e2e(batch: int):
        # Every run a new request: distinct captions of one length never used before (`Workload.fresh_captions`),
        # so neither a repeated batch nor the previous run's prefix cache flatters the time.
        def prepare(engine: Engine):
            # the null prompt's stage 1 is cached per process (docs/model_spec.md §1.6)
            engine.uncond_features(w.image_params)
            if batch == 1:
                return lambda: engine.generate_image(w.fresh_captions(1)[0], w.image_params)
            return lambda: engine.generate_images(w.fresh_captions(batch), w.image_params)
        return prepare

    hoist = "floor: DiT caption/cross-KV and UNet cross-KV/embeddings once per image"
    stages = [
        Stage("ar_prefill", 1, lambda e: lambda: e.encode_prompt(w.caption), prefill, (f"tokens={w.t2i_len}",)),
        Stage("dit_loop", 1, dit, dit_loop, (f"steps={s.dit_steps}", "cfg_batch=2", hoist)),
        Stage("decoder_loop", 1, lambda e: lambda: e.decode_pixels(feats, w.image_params, uncond=uncond),
              decoder_loop, (f"steps={s.decoder_steps}", "cfg_batch=2", f"image={w.height}x{w.width}", "incl. VAE")),
    ]
    for b in s.image_batches:  # a batch's floor is b images' work (every stage's cost grows with its rows)
        stages.append(Stage("t2i_e2e", b, e2e(b), (e2e_prefill + dit_loop + decoder_loop) * b,
                            (f"dit_steps={s.dit_steps}", f"decoder_steps={s.decoder_steps}",
                             f"image={w.height}x{w.width}", "uncond cached", hoist), rate=("images/s", b)))
    return stages


def module_stages(w: Workload) -> list[Stage]:
    """Micro rows: each times the very call its backend's step loop makes (`engines.engine_parts`), on random
    inputs at the model's shapes, CFG on (2 model rows per image). Per backend that is:

    - dit_step: `flow.advance(run, k)` on a run begun by `flow.begin` (FlowSampler: fused projections, the
      hoisted caption work, one CUDA graph per chunk; ReferenceFlow: the whole DiT per step under the torch
      twins), k = the DiT steps one engine step runs (`dit_steps_per_iteration`: 3 on CPU, the whole
      loop on CUDA); the row is per step (each call's time / k).
    - unet_step: ONE `decoder.step()` over `batch` admitted images (PixelDecoder: one UNet call over the
      continuous batch, compiled and graphed on CUDA; ReferenceDecoder: the reference Euler step per image).
    - unet_self_attn: the UNet's first self-attention module, compiled alone when the backend's decoder
      compiles its step (inside the engine it is part of that one compiled graph), eager otherwise; the
      reference under the torch twins.
    - vae_decode: `decoder.latents_to_pixels` of one image (the compiled VAE tail on CUDA).
    Floors: the hoisted per-step work (caption / cross-K/V / embeddings once per image, as the optimized
    samplers do), the same for both backends: the floor is the job's, not an implementation's."""
    cfg, s, bpp, (lh, lw) = w.cfg, w.settings, w.bpp, w.latent_hw
    q, clip, grid, hidden = cfg.n_query, cfg.dit.in_channels, cfg.dit.input_size, cfg.text.hidden_size
    p = w.image_params
    calls = s.policy.warmup + s.policy.reps  # the most calls `Timer.measure` makes
    batches = [b for b in s.image_batches if b <= w.engine_config.scheduler.max_image_batch]  # decoder capacity
    stages = []
    for b in batches:
        cond, noise = w.randn(b, q, hidden), w.randn(b, clip, grid, grid).float()
        rows = 2 * b if p.dit_guidance > 1.0 else b

        def dit(engine: Engine, cond=cond, noise=noise) -> Prepared:
            parts = engine_parts(engine)
            k = min(parts.dit_chunk, s.dit_steps)
            run = parts.flow.begin(cond, noise, k * calls, p.dit_guidance)  # never finishes while timed

            def advance() -> None:
                if run.finished:
                    raise RuntimeError("dit_step: the benchmark's DiT run is exhausted (more calls than planned)")
                parts.flow.advance(run, k)
            return advance

        stages.append(Stage("dit_step", b, dit, costs.dit_step(cfg.dit, rows, hoisted=True, bytes_per_param=bpp),
                            (f"cfg_rows={rows}", "per step"), per_call=_dit_chunk(s),
                            describe=lambda e: f"{type(engine_parts(e).flow).__name__}.advance(run, "
                                               f"{min(engine_parts(e).dit_chunk, s.dit_steps)})"))
    for b in batches:
        feats, uncond, noise = w.randn(b, q, clip), w.randn(1, q, clip), w.randn(b, cfg.unet.in_channels, lh, lw)
        steps = max(s.decoder_steps, calls)  # a schedule longer than the timed calls: the images never finish
        stages.append(Stage(
            "unet_step", b, lambda e, f=feats, u=uncond, n=noise: _decoder_batch(e, f, u, n, steps, p.decoder_guidance),
            costs.unet_step(cfg.unet, 2 * b, lh, lw, q, hoisted=True, bytes_per_param=bpp),
            (f"cfg_rows={2 * b}", f"latent={lh}x{lw}"),
            describe=lambda e: f"{type(engine_parts(e).decoder).__name__}.step()"))
    stages.append(_self_attention_stage(w))
    latents = w.randn(1, cfg.vae.latent_channels, lh, lw)
    stages.append(Stage("vae_decode", 1, lambda e: lambda: engine_parts(e).decoder.latents_to_pixels(latents),
                        costs.vae_decode(cfg.vae, 1, lh, lw, bytes_per_param=bpp), (f"latent={lh}x{lw}",),
                        describe=lambda e: f"{type(engine_parts(e).decoder).__name__}.latents_to_pixels"))
    return stages


def _dit_chunk(s: BenchSettings) -> Callable[[Engine], int]:
    """Per-engine k of the dit_step row (resolved in `run_stage`: the chunk depends on the engine's device)."""
    return lambda engine: min(engine_parts(engine).dit_chunk, s.dit_steps)


@contextlib.contextmanager
def _decoder_batch(engine: Engine, feats: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int,
                   guidance: float) -> Iterator[Callable[[], object]]:
    """Admit feats [B, Q, C] into the engine's decoder (schedules of `steps` steps, more than the timed calls),
    yield its `step`, release the images afterwards."""
    decoder = engine_parts(engine).decoder
    keys = [("bench", uuid.uuid4().hex, i) for i in range(feats.shape[0])]
    try:
        for key, f, n in zip(keys, feats, noise):
            decoder.admit(key, f, uncond[0], n, steps, guidance)
        yield decoder.step
    finally:
        for key in keys:
            decoder.release(key)


def _self_attention_stage(w: Workload) -> Stage:
    cfg, bpp = w.cfg, w.bpp
    level = next(i for i, k in enumerate(cfg.unet.down_block_types) if k.startswith("CrossAttn"))
    lh, lw = w.latent_hw
    for _ in range(level):
        lh, lw = (lh + 1) // 2, (lw + 1) // 2
    c = cfg.unet.block_out_channels[level]
    x = w.randn(2, lh * lw, c)

    def module(engine: Engine) -> torch.nn.Module:
        return engine.model.unet.down_blocks[level].attentions[0].transformer_blocks[0].attn1

    def prepare(engine: Engine) -> Prepared:
        attn = module(engine)
        if _compiles(engine):
            attn = torch.compile(attn, dynamic=False, fullgraph=True)
            return lambda: attn(x)
        if engine.backend == REFERENCE:
            return lambda: _under_reference_ops(attn, x)
        return lambda: attn(x)

    return Stage("unet_self_attn", 1, prepare, costs.self_attention(lh * lw, c, batch=2, bytes_per_param=bpp),
                 ("cfg_rows=2", f"tokens={lh * lw}", f"width={c}", f"down_blocks.{level}.attn1"),
                 describe=lambda e: "compiled alone (torch.compile)" if _compiles(e) else "eager")


def _compiles(engine: Engine) -> bool:
    return bool(getattr(engine_parts(engine).decoder, "compile", False))


def _under_reference_ops(fn: Callable, *args: object) -> object:
    with reference_ops():
        return fn(*args)


def build_stages(mode: str, w: Workload) -> list[Stage]:
    if mode == "t2i":
        return t2i_stages(w) if w.cfg.can_generate_images else []
    if mode == "stages":
        return module_stages(w) if w.cfg.can_generate_images else []
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------------------------
# Running


def run_stage(stage: Stage, engines: dict[str, Engine], timer: Timer, policy: TimingPolicy,
              log: Log = _stderr) -> list[StageResult]:
    out = []
    for backend, engine in engines.items():
        prepared = stage.prepare(engine)
        context = prepared if isinstance(prepared, contextlib.AbstractContextManager) else \
            contextlib.nullcontext(prepared)
        with torch.inference_mode(), context as fn:  # module calls must not record autograd state
            timing = timer.measure(fn, policy)
        per = stage.per_call(engine) if callable(stage.per_call) else stage.per_call
        if per != 1:
            timing = Timing(tuple(t / per for t in timing.samples_ms),
                            None if timing.cold_ms is None else timing.cold_ms / per)
        notes = stage.notes
        if stage.describe is not None:
            notes = (*notes, stage.describe(engine))
        if stage.rate is not None:
            name, items = stage.rate
            notes = (f"{name}={items * 1e3 / timing.median_ms:.3g}", *notes)
        out.append(StageResult(stage.name, backend, stage.batch, timing, stage.cost, None, notes))
        log(f"  {stage.name:<16} {backend:<10} batch {stage.batch:<3} median {timing.median_ms:10.3f} ms "
            f"({len(timing.samples_ms)} runs)")
    return out


ChatBackend = Engine | TransformersChat


def _chat_closure(backend: ChatBackend, w: Workload, batch: int, n_tokens: int) -> Callable[[], object]:
    """A call that answers `batch` fresh conversations with exactly `n_tokens` greedy tokens each."""
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    if isinstance(backend, TransformersChat):
        return lambda: backend.generate(w.fresh_chats(batch), n_tokens)
    if batch == 1:
        return lambda: backend.chat(w.fresh_chats(1)[0], params)
    return lambda: backend.chat_batch(w.fresh_chats(batch), params)


def _stepped_run(engine: Engine, w: Workload, batch: int, n_tokens: int, gaps: list[list[float]]) -> Callable[[], None]:
    """A call that submits `batch` fresh requests through `add_request` and steps the engine until
    all finish, appending that run's per-token gaps (ms between a request's consecutive tokens;
    `step()` returns after the sampled ids reached the host, so the host clock is exact) to `gaps`."""
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)

    def run() -> None:
        last: dict[str, float] = {}
        mine: list[float] = []
        for k, conv in enumerate(w.fresh_chats(batch)):
            engine.add_request(f"bench-{k}", conv, params)
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                if out.request_id in last:
                    mine.append((now - last[out.request_id]) * 1e3)
                last[out.request_id] = now
        gaps.append(mine)

    return run


def run_chat(w: Workload, engines: dict[str, ChatBackend], timer: Timer, log: Log = _stderr,
             emit: Callable[[list[StageResult]], None] | None = None) -> list[StageResult]:
    """TTFT, inter-token latency (ITL) and tokens/s at each batch size (concurrency).

    Every call answers `batch` conversations never seen before (`Workload.fresh_chats`), so no
    backend's prefill is served from a prefix cache filled by an earlier run.
    - chat_ttft: a call with max_tokens=1 for the whole batch (template, prefill, LM head, first
      sample): the time until every request has its first token. Same method for every backend.
    - decode_step (ITL): the time between two tokens of one request, after the first.
      optimized: measured, not derived: the batch runs through `add_request`/`step`, every token's
      host arrival time is taken, and a run's sample is the median gap between consecutive tokens of
      the same request over all its requests and steps (a concurrency above the engine's
      max_num_seqs shows up in TTFT and tokens/s, not in the ITL of the requests that run).
      reference / transformers (no per-token hook): (time of a run with N+1 tokens − median TTFT) / N,
      i.e. the mean time for every request of the batch to get one more token. The reference
      backend answers a batch one request at a time; transformers' `generate` runs it as one
      left-padded batch.
    - tok/s (notes): generated tokens / wall time of the N+1-token run (end to end, prefill included);
      decode tok/s: batch·N / (that time − median TTFT).
    """
    s, cfg = w.settings, w.cfg
    n = s.gen_tokens
    context = w.chat_prompt_len + (n + 1) // 2  # mean cached length over the N decode steps
    results: list[StageResult] = []
    for batch in s.batches:
        batch_results: list[StageResult] = []
        ttft_cost = costs.llm_prefill(cfg.text, w.chat_prompt_len, batch=batch, logits_tokens=1, bytes_per_param=w.bpp)
        step_cost = costs.llm_decode_step(cfg.text, batch, context, bytes_per_param=w.bpp)
        for backend, engine in engines.items():
            ttft = timer.measure(_chat_closure(engine, w, batch, 1), s.policy)
            if isinstance(engine, Engine) and engine.backend == "optimized":
                gaps: list[list[float]] = []
                total = timer.measure(_stepped_run(engine, w, batch, n + 1, gaps), s.policy)
                kept = gaps[len(gaps) - len(total.samples_ms):]  # drop the warm-up runs' gaps
                step = Timing(tuple(float(np.median(g)) for g in kept))
                api, method = "engine.add_request+step", "itl=median per-token gap"
            else:
                total = timer.measure(_chat_closure(engine, w, batch, n + 1), s.policy)
                step = Timing(tuple((t - ttft.median_ms) / n for t in total.samples_ms))
                api = "transformers.generate" if isinstance(engine, TransformersChat) else \
                    "engine.chat" if batch == 1 else "engine.chat_batch"
                method = "itl=(total-ttft)/N"
            tps = batch * (n + 1) * 1e3 / total.median_ms
            decode_ms = total.median_ms - ttft.median_ms
            decode_tps = batch * n * 1e3 / decode_ms if decode_ms > 0 else float("nan")
            batch_results.append(StageResult("chat_ttft", backend, batch, ttft, ttft_cost, None,
                                             (f"prompt_tokens={w.chat_prompt_len}", "max_tokens=1", api)))
            batch_results.append(StageResult("decode_step", backend, batch, step, step_cost, None,
                                             (f"tok/s={tps:.1f}", f"decode_tok/s={decode_tps:.1f}",
                                              f"total_ms={total.median_ms:.1f}", f"gen_tokens={n + 1}",
                                              f"context~{context}", method, api)))
            log(f"  chat batch {batch:<3} {backend:<12} ttft {ttft.median_ms:10.3f} ms, itl {step.median_ms:8.3f} ms, "
                f"{tps:.1f} tok/s ({decode_tps:.1f} decode)")
        if emit is not None:
            emit(batch_results)
        results += batch_results
    return results


def ceiling_results(ceil: Ceilings) -> list[StageResult]:
    """The ceilings as rows (no floor: they are the floor's denominators): `ceiling_copy`, `ceiling_matmul` (the
    fastest GEMM shape, every shape's rate in the notes) and `ceiling_conv` (likewise). Their timings are
    the fastest shape's runs; the rate columns hold the ceiling (from its fastest run)."""
    def shapes(rates: tuple[Rate, ...]) -> str:
        return "shapes=" + ",".join(f"{r.shape}:{r.per_s / 1e12:.3g}" for r in rates)  # TFLOP/s per shape

    copy, gemm = ceil.copy, ceil.best_gemm
    rows = [
        StageResult("ceiling_copy", "torch", 1, copy.timing, None, None,
                    (f"GB/s={copy.per_s / 1e9:.3g}", f"bytes={copy.work:.0f}", "read+write", "rate of the fastest run"),
                    gb_per_s=copy.per_s / 1e9),
        StageResult("ceiling_matmul", "torch", 1, gemm.timing, None, None,
                    (f"TFLOP/s={gemm.per_s / 1e12:.3g}", f"dtype={ceil.dtype}", f"best={gemm.shape}", shapes(ceil.gemm),
                     "rate of the fastest run"), tflop_per_s=gemm.per_s / 1e12),
    ]
    conv = ceil.best_conv
    if conv is not None:
        rows.append(StageResult("ceiling_conv", "torch", 1, conv.timing, None, None,
                                (f"TFLOP/s={conv.per_s / 1e12:.3g}", f"dtype={ceil.dtype}", f"best={conv.shape}",
                                 shapes(ceil.conv), "3x3, padding 1", "rate of the fastest run"),
                                tflop_per_s=conv.per_s / 1e12))
    return rows


def run_modes(modes: list[str], engines: dict[str, ChatBackend], settings: BenchSettings, log: Log = _stderr,
              on_results: Callable[[list[StageResult], Ceilings | None], None] | None = None,
              ) -> tuple[list[StageResult], Ceilings | None]:
    """Measure the ceilings, then every stage of `modes`, every backend.

    `on_results` gets each stage's results (all backends) as soon as they exist, so a run cut short
    (a time limit on a lent GPU) still leaves what it measured.
    """
    chat_engines = engines
    engines = {b: e for b, e in engines.items() if isinstance(e, Engine)}  # the others time chat only
    first = next(iter(engines.values()))
    device = first.device
    timer = Timer(device)
    results: list[StageResult] = []

    def emit(new: list[StageResult]) -> None:
        results.extend(new)
        if on_results is not None and new:
            on_results(new, ceil)

    w = Workload(first, settings)
    log("measuring ceilings (device copy; GEMM and convolution shapes of the model)")
    ceil = measure_ceilings(device, first.model.dtype, w.cfg, w.latent_hw if w.cfg.can_generate_images else None)
    log(f"  {ceil.describe()}")
    emit(ceiling_results(ceil))
    wanted = set(settings.only)
    for mode in modes:
        if mode == "chat":
            if not wanted or wanted & set(STAGE_NAMES["chat"]):
                log("mode chat")
                run_chat(w, chat_engines, timer, log, emit)
            continue
        if mode == "kernels":
            if not wanted or wanted & set(STAGE_NAMES["kernels"]):
                from .kernels import run_kernels

                log("mode kernels")
                run_kernels(w, timer, settings.policy, log, emit, wanted)
            continue
        if mode == "export":
            if not w.cfg.can_generate_images:
                log("mode export: skipped, the model has no image generator")
                continue
            from .export_bench import run_export

            log("mode export")
            results_export = run_export(w, first, timer, settings.export_dir, log, emit)
            if wanted:
                log(f"  (--only does not apply to export: ran {len(results_export)} rows)")
            continue
        if mode in ("t2i", "stages") and not w.cfg.can_generate_images:
            log(f"mode {mode}: skipped, the model has no image generator")
        stages = [st for st in build_stages(mode, w) if not wanted or st.name in wanted]
        if stages:
            log(f"mode {mode}")
        for stage in stages:
            emit(run_stage(stage, engines, timer, settings.policy, log))
    return results, ceil
