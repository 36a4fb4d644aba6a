"""Checkpoint loading: typed errors for broken checkpoints, accepted layouts, dtype, memory, diffusers.

Every broken checkpoint here is the tiny checkpoint copied to a temporary directory with one thing
changed, so each test checks exactly one failure.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import blip3o_engine
from blip3o_engine.config import ModelConfig, preset_config
from blip3o_engine.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MissingKeyError,
    ShapeMismatchError,
    UnexpectedKeyError,
    UnsupportedDTypeError,
)
from blip3o_engine.loader import SafetensorsCheckpoint
from blip3o_engine.models.blip3o import load_model

INDEX = "model.safetensors.index.json"
DECODER_FILE = "diffusion_pytorch_model.bf16.safetensors"
Tensors = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Helpers


def _load(path: Path, dtype: torch.dtype = torch.float32):
    return load_model(path, ModelConfig.from_checkpoint(path), dtype, torch.device("cpu"))


def _read_file(path: Path) -> Tensors:
    # Cloned: safetensors maps the file, and the tests overwrite the file they read.
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def _rewrite_root(path: Path, edit: Callable[[Tensors], Tensors]) -> None:
    """Apply `edit` to the root checkpoint's tensors; keys keep their shard, new keys go to shard 1."""
    index = json.loads((path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    state: Tensors = {}
    for shard in shards:
        state.update(_read_file(path / shard))
    per_shard: dict[str, Tensors] = {shard: {} for shard in shards}
    for key, tensor in edit(state).items():
        per_shard[index["weight_map"].get(key, shards[0])][key] = tensor
    for shard, tensors in per_shard.items():
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
    index["weight_map"] = {key: shard for shard, tensors in per_shard.items() for key in tensors}
    (path / INDEX).write_text(json.dumps(index))


def _rewrite_decoder(path: Path, part: str, edit: Callable[[Tensors], Tensors]) -> None:
    file = path / "diffusion-decoder" / part / DECODER_FILE
    save_file(edit(_read_file(file)), str(file), metadata={"format": "pt"})


def _edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **fields}))


def _assert_same_weights(model, reference: Tensors) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, tensor in state.items():
        assert torch.equal(tensor, reference[key]), key


class _ReadSpy:
    """Records every key `SafetensorsCheckpoint.read` is asked for (the only way data is read)."""

    def __init__(self, monkeypatch) -> None:
        self.keys: list[str] = []
        original = SafetensorsCheckpoint.read

        def read(ckpt, key, dtype, device):
            self.keys.append(key)
            return original(ckpt, key, dtype, device)

        monkeypatch.setattr(SafetensorsCheckpoint, "read", read)


@pytest.fixture
def ckpt(tiny_dir, tmp_path) -> Path:
    """A private, writable copy of the tiny checkpoint."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    return out


@pytest.fixture(scope="module")
def reference(tiny_dir) -> Tensors:
    """The tiny checkpoint's weights as this engine loads them (fp32)."""
    return _load(tiny_dir).state_dict()


# ------------------------------------------------------------------------------------------------
# Files that are absent


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="absent"):
        ModelConfig.from_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointNotFoundError, match="absent"):
        load_model(tmp_path / "absent", preset_config("tiny", vocab_size=537), torch.float32, torch.device("cpu"))


def test_missing_config_json(ckpt) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        ModelConfig.from_checkpoint(ckpt)


def test_missing_shard(ckpt) -> None:
    cfg = ModelConfig.from_checkpoint(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(ckpt, cfg, torch.float32, torch.device("cpu"))


def test_missing_diffusion_decoder(ckpt) -> None:
    cfg = ModelConfig.from_checkpoint(ckpt)
    shutil.rmtree(ckpt / "diffusion-decoder")
    with pytest.raises(CheckpointNotFoundError, match="diffusion-decoder"):
        ModelConfig.from_checkpoint(ckpt)
    with pytest.raises(CheckpointNotFoundError, match="diffusion-decoder"):
        load_model(ckpt, cfg, torch.float32, torch.device("cpu"))


def test_missing_decoder_weights(ckpt) -> None:
    (ckpt / "diffusion-decoder" / "vae" / DECODER_FILE).unlink()
    with pytest.raises(CheckpointNotFoundError, match="diffusion_pytorch_model.safetensors"):
        _load(ckpt)


def test_pickle_checkpoints_are_refused_not_loaded(ckpt, monkeypatch) -> None:
    for f in [ckpt / INDEX, *ckpt.glob("model-*.safetensors")]:
        f.unlink()
    torch.save({"model.norm.weight": torch.ones(3)}, ckpt / "pytorch_model.bin")
    _forbid_unpickling(monkeypatch)
    with pytest.raises(CheckpointNotFoundError) as err:
        _load(ckpt)
    assert "pytorch_model.bin" in str(err.value) and "pickle" in str(err.value)


def test_pickle_decoder_weights_are_refused(ckpt, monkeypatch) -> None:
    unet = ckpt / "diffusion-decoder" / "unet"
    (unet / DECODER_FILE).rename(unet / "diffusion_pytorch_model.bin")
    _forbid_unpickling(monkeypatch)
    with pytest.raises(CheckpointNotFoundError, match=r"diffusion_pytorch_model\.bin.*pickle"):
        _load(ckpt)


def _forbid_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle load was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_good_checkpoint_loads_without_pickle(tiny_dir, monkeypatch, reference) -> None:
    _forbid_unpickling(monkeypatch)
    engine = blip3o_engine.Engine.from_pretrained(str(tiny_dir), device="cpu", dtype="float32")
    _assert_same_weights(engine.model, reference)


# ------------------------------------------------------------------------------------------------
# Files that are present but wrong


def test_missing_key(ckpt) -> None:
    _rewrite_root(ckpt, lambda s: {k: v for k, v in s.items() if k != "model.layers.1.mlp.down_proj.weight"})
    with pytest.raises(MissingKeyError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        _load(ckpt)


def test_key_listed_in_index_but_absent_from_shard(ckpt) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    shard = index["weight_map"]["model.norm.weight"]
    state = _read_file(ckpt / shard)
    del state["model.norm.weight"]
    save_file(state, str(ckpt / shard))
    with pytest.raises(CorruptCheckpointError, match=r"model\.norm\.weight"):
        _load(ckpt)


def test_unexpected_key(ckpt) -> None:
    _rewrite_root(ckpt, lambda s: {**s, "model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(UnexpectedKeyError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        _load(ckpt)


def test_unexpected_key_in_decoder(ckpt) -> None:
    _rewrite_decoder(ckpt, "unet", lambda s: {**s, "mid_block.extra.weight": torch.zeros(2)})
    with pytest.raises(UnexpectedKeyError, match=r"mid_block\.extra\.weight"):
        _load(ckpt)


def test_wrong_shape_names_key_and_both_shapes(ckpt, reference) -> None:
    key = "model.dit.model.patch_embedder.proj.weight"
    rows, cols = reference["dit.patch_embedder.proj.weight"].shape
    _rewrite_root(ckpt, lambda s: {**s, key: torch.zeros(rows, cols + 1)})
    with pytest.raises(ShapeMismatchError) as err:
        _load(ckpt)
    msg = str(err.value)
    assert key in msg and f"[{rows}, {cols + 1}]" in msg and f"[{rows}, {cols}]" in msg


def test_wrong_shape_in_decoder(ckpt) -> None:
    _rewrite_decoder(ckpt, "vae", lambda s: {**s, "decoder.conv_out.bias": torch.zeros(4)})
    with pytest.raises(ShapeMismatchError, match=r"decoder\.conv_out\.bias.*\[4\].*\[3\]"):
        _load(ckpt)


def test_truncated_shard(ckpt) -> None:
    shard = ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00002.safetensors"):
        _load(ckpt)


def test_garbage_file(ckpt) -> None:
    shard = ckpt / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"this is not a safetensors file at all\n" * 64)
    with pytest.raises(CorruptCheckpointError, match="model-00001-of-00002.safetensors"):
        _load(ckpt)


def test_integer_tensor_where_a_weight_is_expected(ckpt, reference) -> None:
    key = "model.norm.weight"
    _rewrite_root(ckpt, lambda s: {**s, key: torch.ones_like(s[key], dtype=torch.int8)})
    with pytest.raises(UnsupportedDTypeError) as err:
        _load(ckpt)
    assert key in str(err.value) and "I8" in str(err.value)


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": ["a"]}'])
def test_corrupt_index(ckpt, text: str) -> None:
    (ckpt / INDEX).write_text(text)
    with pytest.raises(CorruptCheckpointError, match=INDEX.replace(".", r"\.")):
        _load(ckpt)


def test_unknown_model_type(ckpt) -> None:
    _edit_config(ckpt, model_type="janus_pro")
    with pytest.raises(ConfigError, match="janus_pro"):
        blip3o_engine.Engine.from_pretrained(str(ckpt))


def test_every_checkpoint_error_is_a_checkpoint_error() -> None:
    for cls in (CheckpointNotFoundError, CorruptCheckpointError, MissingKeyError, ShapeMismatchError,
                UnexpectedKeyError, UnsupportedDTypeError):
        assert issubclass(cls, CheckpointError)


# ------------------------------------------------------------------------------------------------
# Layouts that must load, and keys that are skipped


def test_generation_vision_tower_is_skipped_and_never_read(ckpt, reference, monkeypatch) -> None:
    unused = {"model.gen_vision_tower.vision_tower.model.blocks.0.mlp.fc1.weight": torch.ones(2048, 1024),
              "model.gen_vision_tower.vision_tower.model.pos_embed": torch.ones(1, 257, 64),
              "model.down_projector.weight": torch.ones(64, 64)}
    _rewrite_root(ckpt, lambda s: {**s, **unused})
    spy = _ReadSpy(monkeypatch)
    model = _load(ckpt)
    _assert_same_weights(model, reference)
    assert not any(k.startswith(("model.gen_vision_tower.", "model.down_projector.")) for k in spy.keys)
    assert len(spy.keys) == len(reference)  # the spy saw every read: one per parameter


def test_tied_lm_head_copy_is_ignored(ckpt, monkeypatch, reference) -> None:
    """A tie_word_embeddings checkpoint may still store lm_head.weight; the embedding is the head."""
    _edit_config(ckpt, tie_word_embeddings=True)
    _rewrite_root(ckpt, lambda s: {**s, "lm_head.weight": torch.full_like(s["lm_head.weight"], 7.0)})
    spy = _ReadSpy(monkeypatch)
    model = _load(ckpt)
    assert "lm_head.weight" not in spy.keys
    assert "text.lm_head.weight" not in model.state_dict()
    embed = reference["text.embed_tokens.weight"]
    assert torch.equal(model.text.embed_tokens.weight, embed)
    hidden = torch.randn(3, model.cfg.text.hidden_size)
    assert torch.equal(model.text.compute_logits(hidden), torch.nn.functional.linear(hidden, embed))

    _rewrite_root(ckpt, lambda s: {k: v for k, v in s.items() if k != "lm_head.weight"})  # the usual case
    assert torch.equal(_load(ckpt).text.embed_tokens.weight, embed)


def test_untied_checkpoint_needs_its_lm_head(ckpt) -> None:
    _rewrite_root(ckpt, lambda s: {k: v for k, v in s.items() if k != "lm_head.weight"})
    with pytest.raises(MissingKeyError, match="lm_head.weight"):
        _load(ckpt)


def test_single_file_checkpoint_loads_like_the_sharded_one(ckpt, reference) -> None:
    state: Tensors = {}
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        state.update(_read_file(shard))
        shard.unlink()
    (ckpt / INDEX).unlink()
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_weights(_load(ckpt), reference)


def _transformers5_name(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.dit.", "model.latent_queries")):
        return "model.language_model." + key[len("model."):]
    return key


def test_transformers5_key_names_load_identically(ckpt, reference) -> None:
    _rewrite_root(ckpt, lambda s: {_transformers5_name(k): v for k, v in s.items()})
    keys = json.loads((ckpt / INDEX).read_text())["weight_map"]
    assert "model.language_model.embed_tokens.weight" in keys and "model.visual.merger.ln_q.weight" in keys
    _assert_same_weights(_load(ckpt), reference)


def test_plain_decoder_files_load_like_the_bf16_variant(ckpt, reference) -> None:
    for part in ("unet", "vae"):
        d = ckpt / "diffusion-decoder" / part
        (d / DECODER_FILE).rename(d / "diffusion_pytorch_model.safetensors")
    _assert_same_weights(_load(ckpt), reference)


def test_vae_encoder_keys_are_ignored_and_not_read(tiny_dir, monkeypatch, reference) -> None:
    in_file = _read_file(tiny_dir / "diffusion-decoder" / "vae" / DECODER_FILE).keys()
    assert any(k.startswith("encoder.") for k in in_file) and "quant_conv.weight" in in_file
    spy = _ReadSpy(monkeypatch)
    model = _load(tiny_dir)
    _assert_same_weights(model, reference)
    vae_reads = set(spy.keys) & set(in_file)
    assert vae_reads == set(model.vae.state_dict())  # decoder + post_quant_conv only


# ------------------------------------------------------------------------------------------------
# dtype and device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_loads_into_the_requested_dtype(tiny_dir, reference, dtype) -> None:
    model = _load(tiny_dir, dtype)
    params = dict(model.named_parameters())
    assert params.keys() == reference.keys()
    assert list(model.buffers()) == []
    for name, p in params.items():
        assert p.dtype == dtype and p.device.type == "cpu" and not p.is_meta and not p.requires_grad, name
        # Converted from the file straight to `dtype`: the fp32 weights rounded once.
        assert torch.equal(p, reference[name].to(dtype)), name


# ------------------------------------------------------------------------------------------------
# Host memory: load straight into the parameters, never two copies (spec: an 8B checkpoint loads in
# less than 2x its size). Measured in a fresh interpreter with the kernel's own peak-RSS counter of
# that process (VmHWM, reset just before the load). Not ru_maxrss: across fork/exec it inherits the
# parent's peak, i.e. pytest's, which hides the load.

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from blip3o_engine.config import ModelConfig
    from blip3o_engine.loader import build_on_meta
    from blip3o_engine.models.blip3o import Blip3oModel, load_model

    def status_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    cfg = ModelConfig.from_checkpoint(path)
    build_on_meta(lambda: Blip3oModel(cfg))  # first meta build imports sympy & co (~75 MB): not the load
    try:  # reset the peak to the current RSS (Linux >= 4.0); without it the peak includes the imports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status_kb("VmRSS")
    model = load_model(path, cfg, dtype, torch.device("cpu"))
    # Touch every weight: a parameter that still views the mapped file counts once it is paged in.
    checksum = sum(float(p.sum(dtype=torch.float32)) for p in model.parameters())
    peak = status_kb("VmHWM")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": (peak - before) * 1024, "param_bytes": nbytes, "checksum": checksum}))
""")


def _write_big_checkpoint(out: Path) -> tuple[int, int]:
    """~265 MB fp32 chat-only (plain Qwen2.5-VL) checkpoint in two shards.

    Returns (tensor bytes, tensor bytes of the largest shard)."""
    from blip3o_engine.config import TextConfig, VisionConfig
    from blip3o_engine.loader import build_on_meta
    from blip3o_engine.models.blip3o import Blip3oModel

    cfg = ModelConfig(
        text=TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                        num_attention_heads=4, num_key_value_heads=1, mrope_section=(16, 24, 24)),
        vision=VisionConfig(depth=2, hidden_size=256, intermediate_size=512, num_heads=4,
                            fullatt_block_indexes=(1,), out_hidden_size=512),
        dit=None, unet=None, vae=None, model_type="qwen2_5_vl")
    meta = build_on_meta(lambda: Blip3oModel(cfg))
    shapes = {f"visual.{k}": v.shape for k, v in meta.visual.state_dict().items()}
    shapes.update({k if k == "lm_head.weight" else f"model.{k}": v.shape for k, v in meta.text.state_dict().items()})
    out.mkdir()
    keys, weight_map, shard_bytes = list(shapes), {}, []
    for i, chunk in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        # Constant values: the content does not matter here, and filling is fast.
        save_file({k: torch.full(shapes[k], 0.25 * (i + 1)) for k in chunk}, str(out / name))
        weight_map.update(dict.fromkeys(chunk, name))
        shard_bytes.append(sum(4 * torch.Size(shapes[k]).numel() for k in chunk))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(shard_bytes)}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return sum(shard_bytes), max(shard_bytes)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, int, int]:
    path = tmp_path_factory.mktemp("big") / "ckpt"
    return (path, *_write_big_checkpoint(path))


# float32: the parameters view the mapped file (no copy). bfloat16: every tensor is converted; a
# loader that keeps every shard mapped until the end then holds file + model (1.5x here).
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_host_memory_during_load(big_checkpoint, dtype: str) -> None:
    path, ckpt_bytes, largest_shard = big_checkpoint
    assert 250e6 < ckpt_bytes < 350e6
    env_path = str(Path(blip3o_engine.__file__).parents[1])
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), dtype], capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    param_bytes = ckpt_bytes // (1 if dtype == "float32" else 2)
    assert report["param_bytes"] == param_bytes
    assert report["checksum"] > 0
    # Allowed: the loaded weights, plus the pages of the one shard being read (the map is dropped
    # after each shard), plus 5% slack for the allocator and one converted tensor in flight; and in
    # any case under 1.5x the checkpoint (spec: < 2x). A loader that materializes the model and
    # then copies the checkpoint in needs 2x; one that keeps every shard mapped while converting
    # needs file + model. Measured: 1.01x (float32), 1.06x (bfloat16).
    limit = min(param_bytes + largest_shard + 0.05 * ckpt_bytes, 1.5 * ckpt_bytes)
    assert report["growth"] < limit, (
        f"peak RSS grew {report['growth'] / ckpt_bytes:.2f}x the checkpoint (limit {limit / ckpt_bytes:.2f}x)")


# ------------------------------------------------------------------------------------------------
# The decoder files are diffusers-loadable and hold what we load


def test_tiny_decoder_loads_in_diffusers(tiny_dir, tiny_engine) -> None:
    diffusers = pytest.importorskip("diffusers")
    dec = tiny_dir / "diffusion-decoder"
    model = tiny_engine.model

    unet = diffusers.UNet2DConditionModel.from_pretrained(dec / "unet", variant="bf16", torch_dtype=torch.float32)
    ref, ours = unet.state_dict(), model.unet.state_dict()
    assert ref.keys() == ours.keys()
    for key in ref:
        assert torch.equal(ref[key], ours[key]), key

    vae = diffusers.AutoencoderKL.from_pretrained(dec / "vae", variant="bf16", torch_dtype=torch.float32)
    ref = {k: v for k, v in vae.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
    ours = model.vae.state_dict()
    assert ref.keys() == ours.keys()
    for key in ref:
        assert torch.equal(ref[key], ours[key]), key

    sched = diffusers.EulerDiscreteScheduler.from_pretrained(dec / "scheduler")
    ours_sched = model.cfg.decoder_scheduler
    for name, value in vars(ours_sched).items():
        assert sched.config[name] == value, name
