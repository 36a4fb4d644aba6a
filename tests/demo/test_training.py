"""The demo recipe's training loop, on a tiny budget: it runs end to end, writes a checkpoint the
engine loads unchanged, its losses are finite and fall, and a seed reproduces it exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from blip3o_engine import Engine, ImageParams, SamplingParams
from blip3o_engine.config import preset_config
from blip3o_engine.train.common import LossLog, stage_generator
from blip3o_engine.train.recipe import DemoRecipe, build_model, train_demo

# Even smaller than DemoRecipe.smoke(): the fixed costs (tokenizer, plot, files) dominate anyway.
TINY_RECIPE = DemoRecipe(vision_steps=2, vision_batch=2, understanding_steps=2, understanding_batch=2, vae_steps=2,
                         vae_batch=2, encoder_steps=2, encoder_batch=2, encoded_images=8, unet_steps=2, unet_batch=2,
                         dit_steps=2, dit_batch=2, ema_decay=0.9)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "ck"
    return out, train_demo(out, seed=5, recipe=TINY_RECIPE, progress=False, evaluate=False)


def test_smoke_run_writes_the_published_layout(smoke_run):
    out, summary = smoke_run
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors",
                 "diffusion-decoder/unet/diffusion_pytorch_model.bf16.safetensors",
                 "diffusion-decoder/vae/diffusion_pytorch_model.bf16.safetensors",
                 "diffusion-decoder/scheduler/scheduler_config.json", "loss_curves.png", "training.json"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
    assert json.loads((out / "training.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["final_losses"]) == {"a_vision", "a_understanding", "b_vae", "b_encoder", "b_unet",
                                            "c_generation"}
    for losses in summary["final_losses"].values():
        assert all(math.isfinite(v) for v in losses.values()), losses
    # The VAE's measured latent scale is what the checkpoint's VAE config says.
    vae_cfg = json.loads((out / "diffusion-decoder/vae/config.json").read_text())
    assert vae_cfg["scaling_factor"] == summary["vae_scaling_factor"] > 0


@pytest.mark.parametrize("backend", ["reference", "optimized"])
def test_smoke_checkpoint_runs_on_both_backends(smoke_run, backend):
    out, _ = smoke_run
    engine = Engine.from_pretrained(str(out), backend=backend)
    assert engine.cfg.name == "ck" and engine.cfg.default_image_size == 64
    img = engine.generate_image("a red circle", ImageParams(seed=0, dit_steps=2, decoder_steps=2)).image
    assert img.size == (64, 64)
    reply = engine.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3))
    assert 1 <= len(reply.token_ids) <= 3


def test_same_seed_same_checkpoint(smoke_run, tmp_path):
    out, summary = smoke_run
    again = train_demo(tmp_path / "again", seed=5, recipe=TINY_RECIPE, progress=False, evaluate=False)
    assert again["final_losses"] == summary["final_losses"]
    for name in ("model.safetensors", "diffusion-decoder/unet/diffusion_pytorch_model.bf16.safetensors",
                 "diffusion-decoder/vae/diffusion_pytorch_model.bf16.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_understanding_loss_falls(smoke_run):
    """A few steps of stage (a) on a small batch: the answer cross-entropy drops from about ln(vocab)."""
    from blip3o_engine.prompts import PromptBuilder
    from blip3o_engine.tokenization import SpecialTokens, load_image_processor, load_tokenizer
    from blip3o_engine.train.understanding import train_understanding

    out, _ = smoke_run
    tok = load_tokenizer(out)
    prompts = PromptBuilder(tok, load_image_processor(out), SpecialTokens.from_tokenizer(tok), 2)
    model = build_model(preset_config("demo", vocab_size=len(tok)), seed=0)
    log = LossLog()
    train_understanding(model, prompts, steps=12, batch_size=4, lr=3e-3, generator=stage_generator(0, 1), log=log,
                        progress=False)
    ce = [v for _, v in log.history["a_understanding"]["chat_ce"]]
    assert all(math.isfinite(v) for v in ce)
    assert ce[0] == pytest.approx(math.log(len(tok)), rel=0.1)
    assert sum(ce[-3:]) / 3 < 0.6 * ce[0], ce
    assert not any(p.requires_grad for p in model.parameters())  # left frozen for the next stage
    assert torch.isfinite(model.text.embed_tokens.weight).all()


def test_query_encoder_equals_the_inference_prefill(smoke_run):
    """Stage (c) computes the query states from a cached prompt prefix; they must be what the
    reference T2I prefill gives for each prompt (fp32; only the summation order differs)."""
    from blip3o_engine.prompts import PromptBuilder
    from blip3o_engine.runtime.reference import encode_t2i_prompt
    from blip3o_engine.tokenization import SpecialTokens, load_image_processor, load_tokenizer
    from blip3o_engine.train.generation import QueryEncoder, caption_prompts

    out, _ = smoke_run
    tok = load_tokenizer(out)
    special = SpecialTokens.from_tokenizer(tok)
    prompts = caption_prompts(PromptBuilder(tok, load_image_processor(out), special, 2))
    assert len({len(p.token_ids) for p in prompts}) > 1  # the left padding is exercised
    model = build_model(preset_config("demo", vocab_size=len(tok)), seed=1)
    with torch.no_grad():
        model.queries.weight.normal_()  # O(1) queries, so that they matter against the prompt
    model.queries.requires_grad_(True)
    got = QueryEncoder(model, prompts)()  # [P, Q, H]
    want = torch.stack([encode_t2i_prompt(model, p, special) for p in prompts])
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()  # differentiable in the queries, and only the queries are trained
    assert model.queries.weight.grad is not None and model.text.embed_tokens.weight.grad is None
