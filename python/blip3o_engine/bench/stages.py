"""What each benchmark mode times, with the cost each measurement is judged against.

Modes:
- chat: time to first token (`chat_ttft`) and the inter-token latency (`decode_step`; tokens/s in
  the notes) at each `--batch` (concurrency), per backend, plus transformers' `generate` when the
  "transformers" backend is asked for (see `run_chat` for the methods).
- t2i: the AR prefill of a T2I prompt (`ar_prefill`), the DiT sampling loop (`dit_loop`), the pixel
  decoder loop with its VAE decode (`decoder_loop`) and the whole `generate_image` (`t2i_e2e`).
- stages: single forwards of `engine.model.dit` / `.unet` on a CFG batch of 2 and of `.vae`.
- kernels: two hot ops at the model's shapes (the LLM's RMSNorm, a UNet self-attention).
Every run first measures the ceilings (copy bandwidth, GEMM rate), reported as rows too.

Only the public `Engine` API drives the loops; single steps call `engine.model.*` modules. Inputs
are random (never zeros) and made once, outside the timed region, then shared by every backend.
Every backend's run of a stage directly follows the previous backend's, so drift (clocks,
temperature) hits both alike.
"""

from __future__ import annotations

import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.unet import sdxl_time_ids
from ..params import ImageParams, SamplingParams
from ..engine import Engine
from . import costs
from .ceilings import Ceilings, measure_ceilings
from .costs import Cost
from .engines import TransformersChat
from .timing import Timer, Timing, TimingPolicy

MODES = ("chat", "t2i", "stages", "kernels", "export")
# `all` runs the cheap modes first, so a run cut short by a time limit keeps the most per second.
ALL_ORDER = ("kernels", "stages", "t2i", "chat")
REFERENCE = "reference"
STAGE_NAMES = {
    "chat": ("chat_ttft", "decode_step"),
    "t2i": ("ar_prefill", "dit_loop", "decoder_loop", "t2i_e2e"),
    "stages": ("dit_step", "unet_step", "vae_decode"),
    "kernels": ("rmsnorm", "unet_self_attn"),
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
    timing: Timing
    cost: Cost | None  # None: no floor applies (the ceilings themselves)
    compile_ms: float | None = None  # an explicit compile/capture step's time; None: the engine has none
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """A timed callable per backend: `prepare(engine)` returns the closure to time."""

    name: str
    batch: int
    prepare: Callable[[Engine], Callable[[], object]]
    cost: Cost | None
    notes: tuple[str, ...] = ()
    rate: tuple[str, int] | None = None  # (name, items per call): a note "name=items/s" from the median


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

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)


# ------------------------------------------------------------------------------------------------
# Stage lists per mode


def t2i_stages(w: Workload) -> list[Stage]:
    cfg, s = w.cfg, w.settings
    bpp, (lh, lw) = w.bpp, w.latent_hw
    q, clip = cfg.n_query, cfg.dit.in_channels
    prefill = costs.llm_prefill(cfg.text, w.t2i_len, bytes_per_param=bpp)
    # Floor of the DiT loop: caption work hoisted out of the loop (once per image), CFG batch 2.
    dit_loop = (s.dit_steps * costs.dit_step(cfg.dit, 2, hoisted=True, bytes_per_param=bpp)
                + costs.dit_caption_once(cfg.dit, 2, bytes_per_param=bpp))
    vae = costs.vae_decode(cfg.vae, 1, lh, lw, bytes_per_param=bpp)
    decoder_loop = s.decoder_steps * costs.unet_step(cfg.unet, 2, lh, lw, q, bytes_per_param=bpp) + vae
    feats, uncond = w.randn(1, q, clip), w.randn(1, q, clip)

    def dit(engine: Engine):
        cond = engine.encode_prompt(w.caption)[None]  # [1, Q, H] the prompt's real query states
        return lambda: engine.sample_clip_features(cond, w.image_params)

    def e2e(batch: int):
        # Distinct prompts of one length (a batch of one prompt repeated would let nothing differ).
        prompts = [w.caption] if batch == 1 else [f"{k} {w.caption}" for k in range(batch)]

        def prepare(engine: Engine):
            # the null prompt's stage 1 is cached per process (docs/model_spec.md §1.6)
            engine.uncond_features(w.image_params)
            if batch == 1:
                return lambda: engine.generate_image(prompts[0], w.image_params)
            return lambda: engine.generate_images(prompts, w.image_params)
        return prepare

    hoist = "floor: DiT caption/cross-KV work once per image"
    stages = [
        Stage("ar_prefill", 1, lambda e: lambda: e.encode_prompt(w.caption), prefill, (f"tokens={w.t2i_len}",)),
        Stage("dit_loop", 1, dit, dit_loop, (f"steps={s.dit_steps}", "cfg_batch=2", hoist)),
        Stage("decoder_loop", 1, lambda e: lambda: e.decode_pixels(feats, w.image_params, uncond=uncond),
              decoder_loop, (f"steps={s.decoder_steps}", "cfg_batch=2", f"image={w.height}x{w.width}", "incl. VAE")),
    ]
    for b in s.image_batches:  # a batch's floor is b images' work (every stage's cost grows with its rows)
        stages.append(Stage("t2i_e2e", b, e2e(b), (prefill + dit_loop + decoder_loop) * b,
                            (f"dit_steps={s.dit_steps}", f"decoder_steps={s.decoder_steps}",
                             f"image={w.height}x{w.width}", "uncond cached", hoist), rate=("images/s", b)))
    return stages


def module_stages(w: Workload) -> list[Stage]:
    """One forward of each diffusion module, as the samplers call them (CFG batch 2)."""
    cfg, bpp, (lh, lw) = w.cfg, w.bpp, w.latent_hw
    q, clip, grid = cfg.n_query, cfg.dit.in_channels, cfg.dit.input_size
    x, caption = w.randn(2, clip, grid, grid), w.randn(2, q, cfg.text.hidden_size)
    t_dit = torch.full((2,), 500, device=w.device)
    z, ctx = w.randn(2, cfg.unet.in_channels, lh, lw), w.randn(2, q, clip)
    pooled, time_ids = ctx.mean(1), sdxl_time_ids(w.height, w.width, 2, w.dtype, w.device)
    t_unet = torch.tensor(500.0, device=w.device)
    latents = w.randn(1, cfg.vae.latent_channels, lh, lw)

    module = "engine.model.{} (same module for every backend today)"
    return [
        Stage("dit_step", 1, lambda e: lambda: e.model.dit(x, t_dit, caption),
              costs.dit_step(cfg.dit, 2, hoisted=False, bytes_per_param=bpp), ("cfg_batch=2", module.format("dit"))),
        Stage("unet_step", 1,
              lambda e: lambda: e.model.unet(z, t_unet, encoder_hidden_states=ctx, text_embeds=pooled,
                                             time_ids=time_ids),
              costs.unet_step(cfg.unet, 2, lh, lw, q, bytes_per_param=bpp),
              ("cfg_batch=2", f"latent={lh}x{lw}", module.format("unet"))),
        Stage("vae_decode", 1, lambda e: lambda: e.model.vae(latents),
              costs.vae_decode(cfg.vae, 1, lh, lw, bytes_per_param=bpp), (f"latent={lh}x{lw}", module.format("vae"))),
    ]


def kernel_stages(w: Workload) -> list[Stage]:
    """Hot ops at the model's shapes: the LLM's RMSNorm over a prefill and the UNet's self-attention
    (projections + SDPA) at its first attention level. Both run the reference torch ops today."""
    cfg, bpp = w.cfg, w.bpp
    tokens = 4096
    x = w.randn(tokens, cfg.text.hidden_size)
    stages = [Stage("rmsnorm", 1, lambda e: lambda: e.model.text.norm(x),
                    costs.rmsnorm(tokens, cfg.text.hidden_size, bpp),
                    (f"[{tokens}, {cfg.text.hidden_size}]", "engine.model.text.norm"))]
    if cfg.can_generate_images:
        level = next(i for i, k in enumerate(cfg.unet.down_block_types) if k.startswith("CrossAttn"))
        lh, lw = w.latent_hw
        for _ in range(level):
            lh, lw = (lh + 1) // 2, (lw + 1) // 2
        c = cfg.unet.block_out_channels[level]
        attn = w.randn(2, lh * lw, c)

        def unet_attn(engine: Engine):
            module = engine.model.unet.down_blocks[level].attentions[0].transformer_blocks[0].attn1
            return lambda: module(attn)

        stages.append(Stage("unet_self_attn", 1, unet_attn,
                            costs.self_attention(lh * lw, c, batch=2, bytes_per_param=bpp),
                            ("cfg_batch=2", f"tokens={lh * lw}", f"width={c}", f"down_blocks.{level}.attn1")))
    return stages


def build_stages(mode: str, w: Workload) -> list[Stage]:
    if mode == "t2i":
        return t2i_stages(w) if w.cfg.can_generate_images else []
    if mode == "stages":
        return module_stages(w) if w.cfg.can_generate_images else []
    if mode == "kernels":
        return kernel_stages(w)
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------------------------
# Running


def run_stage(stage: Stage, engines: dict[str, Engine], timer: Timer, policy: TimingPolicy,
              log: Log = _stderr) -> list[StageResult]:
    out = []
    for backend, engine in engines.items():
        fn = stage.prepare(engine)

        def timed(fn: Callable[[], object] = fn) -> object:
            with torch.inference_mode():  # module calls must not record autograd state
                return fn()

        timing = timer.measure(timed, policy)
        notes = stage.notes
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
    """The ceilings as rows (no floor: they are the floor's denominators)."""
    return [
        StageResult("ceiling_copy", "torch", 1, ceil.copy, None, None,
                    (f"GB/s={ceil.copy_bytes_per_s / 1e9:.0f}", f"bytes={ceil.copy_bytes}", "read+write")),
        StageResult("ceiling_matmul", "torch", 1, ceil.matmul, None, None,
                    (f"TFLOP/s={ceil.matmul_flops_per_s / 1e12:.3g}", f"dtype={ceil.matmul_dtype}",
                     f"flops={ceil.matmul_flops:.3g}")),
    ]


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

    log("measuring ceilings (device copy, GEMM)")
    ceil = measure_ceilings(device, first.model.dtype)
    log(f"  {ceil.describe()}")
    emit(ceiling_results(ceil))
    w = Workload(first, settings)
    wanted = set(settings.only)
    for mode in modes:
        if mode == "chat":
            if not wanted or wanted & set(STAGE_NAMES["chat"]):
                log("mode chat")
                run_chat(w, chat_engines, timer, log, emit)
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
