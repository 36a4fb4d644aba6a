"""Helpers shared by the paged-engine parity tests."""

from __future__ import annotations


class Recorder:
    """Keeps every SchedulerOutput of an AR stage (wraps its scheduler's `schedule`)."""

    def __init__(self, le) -> None:
        self.outputs = []
        schedule = le.scheduler.schedule

        def recording():
            out = schedule()
            self.outputs.append(out)
            return out

        le.scheduler.schedule = recording

    def chunks(self, request_id: str):
        """Every scheduled chunk of one request, in order."""
        return [s for o in self.outputs for s in o.scheduled if s.request_id == request_id]

    def first_chunk(self, request_id: str):
        return self.chunks(request_id)[0]


def ar_stage(tiny_engine, num_blocks: int, **options):
    """An optimized-backend AR stage over the tiny engine's weights: `num_blocks` KV blocks, engine options
    (block_size, max_num_seqs, max_num_batched_tokens, long_prefill_chunk, enable_prefix_caching, ...)."""
    from blip3o_engine.engine_config import EngineConfig
    from blip3o_engine.runtime.ar_stage import ARStage

    model = tiny_engine.model
    return ARStage(model, tiny_engine.tokenizer, tiny_engine.special, EngineConfig().with_overrides(**options),
                   num_blocks, model.cfg.text.max_position_embeddings)


def optimized_engine(tiny_engine, **options):
    """An optimized-backend Engine sharing the tiny reference engine's weights, with engine options
    (num_blocks, block_size, max_num_seqs, ...)."""
    from blip3o_engine import Engine, EngineConfig

    return Engine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.prompts.image_processor,
                  backend="optimized", config=EngineConfig().with_overrides(**options))
