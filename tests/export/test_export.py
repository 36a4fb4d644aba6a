"""Exports (ONNX, AOTInductor, Triton repository) against the in-process modules and engine.

Tolerances: the exported graphs compute the same fp32 expressions as the modules, but onnxruntime and
inductor reorder floating-point sums (fused GEMM/conv blocking, fused norms) and fold constants, so
each output differs from the module's by accumulated rounding: ~1e-7..1e-5 relative to its largest
magnitude on these tiny random models. The per-stage checks allow 1e-4 of that magnitude (an error in
an op gives O(1) differences); whole images, 2 uint8 levels (the bar the project set; onnxruntime measured <= 1).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import blip3o_engine as b3
from blip3o_engine.errors import ExportError
from blip3o_engine.export.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, config_hash, sha256_file
from blip3o_engine.export.runtimes import load_stage
from blip3o_engine.export.stages import ExportSettings, build_graphs

from _export_util import RUN_SLOW, VIT_GRIDS  # tests/export is on sys.path under pytest

REL_TOL = 1e-4
ONNX_GRAPHS = ["vit_1x32x32", "vit_1x8x12", "llm_prefill", "llm_decode", "dit_caption", "dit", "unet", "vae"]
AOTI_GRAPHS = ["llm_prefill", "dit_caption", "dit", "unet", "vae"]
# Two batch sizes and two image sizes (latent sides; tiny's UNet needs multiples of 2) per graph.
CASES = {
    "unet": [{"batch": 2, "height": 8, "width": 8}, {"batch": 6, "height": 4, "width": 6}],
    "vae": [{"batch": 1, "height": 8, "width": 8}, {"batch": 3, "height": 4, "width": 6}],
    "dit_caption": [{"batch": 2}, {"batch": 6}],
    "dit": [{"batch": 2}, {"batch": 6}],
    "llm_prefill": [{"batch_size": 1, "sequence_length": 9}, {"batch_size": 3, "sequence_length": 17}],
    "llm_decode": [{"batch_size": 1, "sequence_length": 1, "past_sequence_length": 9},
                   {"batch_size": 3, "sequence_length": 2, "past_sequence_length": 17}],
}
FAST_IMAGE = dict(dit_steps=10, decoder_steps=12)  # the stages are what is tested, not the step count


@pytest.fixture(scope="module")
def graphs(tiny_engine):
    """The wrapper modules (in-process, on the engine's weights) by graph name."""
    settings = ExportSettings(vit_grids=tuple(VIT_GRIDS))
    stages = ["vit", "llm", "dit", "unet", "vae"]
    return {g.name: g for g in build_graphs(tiny_engine.model, stages, settings, torch.float32, torch.device("cpu"))}


def assert_stage_matches(graph, runner, cases):
    gen = torch.Generator().manual_seed(0)
    for values in cases:
        args = graph.make_inputs(values, gen)
        with torch.inference_mode():
            want = graph.module(*args)
        want = want if isinstance(want, tuple) else (want,)
        got = runner({s.name: a for s, a in zip(graph.inputs, args)})
        assert list(got) == [s.name for s in graph.outputs]
        for spec, w in zip(graph.outputs, want):
            g = got[spec.name]
            assert g.shape == w.shape, (graph.name, spec.name, values)
            scale = float(w.abs().max()) or 1.0
            torch.testing.assert_close(g, w, rtol=0, atol=REL_TOL * scale, msg=f"{graph.name}.{spec.name} at {values}")


def image_array(engine, prompt="a red apple on a wooden table", **kwargs):
    return np.asarray(engine.generate_image(prompt, b3.ImageParams(seed=7, **FAST_IMAGE), **kwargs).image).astype(int)


# ------------------------------------------------------------------------------------------------
# ONNX files and the manifest


def test_onnx_files_pass_the_checker_with_opset_18_and_named_axes(triton_repo):
    import onnx

    manifest = Manifest.read(triton_repo)
    assert sorted(manifest.graphs) == sorted(ONNX_GRAPHS)
    for name, entry in manifest.graphs.items():
        path = triton_repo / entry.artifacts["onnx"]
        onnx.checker.check_model(str(path), full_check=True)  # raises on an invalid model
        model = onnx.load(str(path), load_external_data=False)
        assert {o.domain: o.version for o in model.opset_import}[""] >= 18
        inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
        for spec in entry.inputs:
            assert inputs[spec.name] == [d.replace(" ", "") if isinstance(d, str) else d for d in spec.shape], name


def test_manifest_records_versions_hashes_io_and_profiles(triton_repo, tiny_engine):
    raw = json.loads((triton_repo / MANIFEST_NAME).read_text())
    assert raw["format_version"] == FORMAT_VERSION and raw["engine_version"] == b3.__version__
    assert raw["model"]["config_sha256"] == config_hash(tiny_engine.cfg)
    assert raw["opset"] == 18 and {"torch", "onnx", "onnxruntime"} <= set(raw["tools"])
    for rel, digest in raw["files"].items():
        assert sha256_file(triton_repo / rel) == digest
    unet = raw["graphs"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                   "time_ids"]
    assert unet["outputs"][0] == {"name": "latent", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}
    # sizes 64x64 (opt) and 32x48 px -> latent sides 8 and 4 x 6; CFG batch up to 2 x max_batch
    assert unet["dynamic_axes"] == {"batch": {"min": 1, "opt": 2, "max": 8, "multiple": 1},
                                    "height": {"min": 4, "opt": 8, "max": 8, "multiple": 2},
                                    "width": {"min": 6, "opt": 8, "max": 8, "multiple": 2}}
    decode = raw["graphs"]["llm_decode"]
    assert decode["inputs"][3]["name"] == "past_key_values.0.key"
    assert decode["outputs"][2]["shape"][2] == "past_sequence_length + sequence_length"
    assert raw["graphs"]["vit_1x8x12"]["grid_thw"] == [1, 8, 12]
    every_file = {f for g in raw["graphs"].values() for f in g["files"]}
    assert every_file <= set(raw["files"]) and "blip3o_t2i/1/weights.safetensors" in raw["files"]


def test_external_data_file_is_written_checked_and_loadable(graphs, tmp_path):
    # Real exports switch to external data past 2 GB; force it on a small graph to test that path.
    from blip3o_engine.export.manifest import GraphEntry
    from blip3o_engine.export.onnx import write_onnx
    from blip3o_engine.export.stages import trace

    graph = graphs["dit_caption"]
    files = write_onnx(graph, trace(graph), tmp_path / "dit_caption.onnx", external_data=True)
    assert [f.name for f in files] == ["dit_caption.onnx", "dit_caption.onnx.data"]
    assert files[1].stat().st_size > files[0].stat().st_size  # the weights are in the data file
    entry = GraphEntry.from_graph(graph, {"onnx": "dit_caption.onnx"}, [f.name for f in files])
    assert_stage_matches(graph, load_stage(tmp_path, entry, "onnxruntime", torch.device("cpu")), CASES["dit_caption"])


# ------------------------------------------------------------------------------------------------
# Stages under onnxruntime (CPU)


@pytest.mark.parametrize("name", ONNX_GRAPHS)
def test_onnxruntime_stage_matches_module(name, triton_repo, graphs):
    manifest = Manifest.read(triton_repo, verify=False)
    runner = load_stage(triton_repo, manifest.graphs[name], "onnxruntime", torch.device("cpu"))
    cases = CASES.get(name, [{}])  # a ViT graph has one grid; the two grids are the two image sizes
    assert_stage_matches(graphs[name], runner, cases)


@pytest.fixture(scope="module")
def reference_image(tiny_engine):
    """The in-process engine's image for the prompt and seed of `image_array` (shared by three tests)."""
    return image_array(tiny_engine)


@pytest.fixture(scope="module")
def ort_engine(triton_repo):
    return b3.Engine.from_exported(triton_repo, runtime="onnxruntime")


def test_from_exported_onnxruntime_image_matches_engine(ort_engine, reference_image):
    diff = np.abs(image_array(ort_engine) - reference_image).max()
    assert diff <= 2


def test_from_exported_onnxruntime_image_conditioned(ort_engine, tiny_engine, test_image):
    # Image-conditioned T2I resizes to 448x448: the ViT graph of grid 1x32x32.
    diff = np.abs(image_array(ort_engine, image=test_image) - image_array(tiny_engine, image=test_image)).max()
    assert diff <= 2


def test_from_exported_onnxruntime_greedy_chat_identical(ort_engine, tiny_engine):
    from PIL import Image

    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (112, 168, 3), dtype=np.uint8))  # grid 1x8x12
    params = b3.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for messages in ([{"role": "user", "content": "Hello, what is in the picture?"}],
                     [{"role": "user", "content": [{"type": "image", "image": picture},
                                                   {"type": "text", "text": "Describe it."}]}]):
        result = ort_engine.chat(messages, params)
        assert result.token_ids == tiny_engine.chat(messages, params).token_ids
    assert "".join(ort_engine.chat_stream(messages, params)) == result.text
    # The request-level interface runs the same step loop over the exported graphs.
    ort_engine.add_request("r1", messages, params)
    outs = []
    while ort_engine.has_unfinished():
        outs += ort_engine.step()
    assert outs[-1].finished and outs[-1].token_ids == result.token_ids


def test_vit_grid_that_was_not_exported_is_a_clear_error(ort_engine):
    from PIL import Image

    picture = Image.new("RGB", (280, 140), (200, 30, 30))
    with pytest.raises(ExportError, match="no ViT graph for image grid"):
        ort_engine.chat([{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "?"}]}],
                        b3.SamplingParams(max_tokens=2))


# ------------------------------------------------------------------------------------------------
# Tampering, versions, runtimes


@pytest.fixture
def repo_copy(triton_repo, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(triton_repo, dst)
    return dst


def test_modified_file_raises_naming_it(repo_copy):
    target = repo_copy / "unet" / "1" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"unet/1/model\.onnx does not match the manifest"):
        b3.Engine.from_exported(repo_copy)


@pytest.mark.parametrize("field,value,message", [
    ("format_version", FORMAT_VERSION + 1, "export format version"),
    ("engine_version", "0.0.1", "exported by blip3o-engine 0.0.1"),
    ("format", "other-engine", "is not a blip3o-engine-export manifest"),
])
def test_manifest_of_another_version_or_engine_raises(repo_copy, field, value, message):
    path = repo_copy / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(ExportError, match=message):
        b3.Engine.from_exported(repo_copy)


def test_runtime_without_artifacts_and_missing_stage_are_clear_errors(triton_repo, tiny_engine, tmp_path):
    with pytest.raises(ExportError, match="no aoti artifact"):
        b3.Engine.from_exported(triton_repo, runtime="aoti")
    with pytest.raises(ExportError, match="unknown runtime"):
        b3.Engine.from_exported(triton_repo, runtime="tvm")
    from blip3o_engine.export import export

    with pytest.raises(ExportError, match="unknown stage"):
        export(tiny_engine, tmp_path / "x", stages=["unet", "clip"], progress=False)
    with pytest.raises(ExportError, match="not empty"):
        export(tiny_engine, triton_repo, stages=["vae"], progress=False)


# ------------------------------------------------------------------------------------------------
# TensorRT (unverified here: not installable on these machines)


def test_tensorrt_without_the_package_is_a_clear_error(tiny_engine, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed; the GPU test below covers it")
    except ImportError:
        pass
    from blip3o_engine.export import export

    with pytest.raises(ExportError, match="'tensorrt' package"):
        export(tiny_engine, tmp_path / "trt", format="tensorrt", stages=["vae"], progress=False)
    assert not (tmp_path / "trt").exists()  # failed before writing anything


@pytest.mark.gpu
def test_tensorrt_plans_match_onnxruntime(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it cannot be installed on the CPU machines)")
    from blip3o_engine.export import export

    engine = b3.Engine.from_pretrained("tiny", device="cuda", dtype="float32")
    export(engine, tmp_path / "trt", format="tensorrt", stages=["llm_prefill", "dit", "unet", "vae"],
           dtype="float32", progress=False)
    trt_img = image_array(b3.Engine.from_exported(tmp_path / "trt", runtime="tensorrt", device="cuda"))
    ort_img = image_array(b3.Engine.from_exported(tmp_path / "trt", runtime="onnxruntime"))
    assert np.abs(trt_img - ort_img).max() <= 2


# ------------------------------------------------------------------------------------------------
# Triton repository


def test_triton_configs_parse_and_agree_with_the_onnx_files(triton_repo):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    manifest = Manifest.read(triton_repo, verify=False)
    types = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64}
    for name, entry in manifest.graphs.items():
        config = text_format.Parse((triton_repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert len(config.instance_group) == 1
        model = onnx.load(str(triton_repo / name / "1" / "model.onnx"), load_external_data=False)
        batching = config.max_batch_size > 0
        assert batching == (name in ("dit_caption", "dit", "unet", "vae"))
        assert config.HasField("dynamic_batching") == batching
        for ours, theirs in ((config.input, model.graph.input), (config.output, model.graph.output)):
            assert [t.name for t in ours] == [v.name for v in theirs]
            for t, v in zip(ours, theirs):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                want = (dims[1:] if batching else dims) or [1]  # a per-row scalar: dims [1] + reshape []
                assert list(t.dims) == want, (name, t.name)
                assert t.HasField("reshape") == (batching and len(dims) == 1)
                assert t.data_type == types[v.type.tensor_type.elem_type]
    assert text_format.Parse((triton_repo / "blip3o_t2i" / "config.pbtxt").read_text(), mc.ModelConfig()).backend == "python"
    assert "from blip3o_engine.export.triton_server import TritonPythonModel" in (
        triton_repo / "blip3o_t2i" / "1" / "model.py").read_text()


def test_triton_python_model_logic_over_onnxruntime_stages(triton_repo, reference_image):
    from blip3o_engine.export.api import load_stages
    from blip3o_engine.export.triton_server import T2IService

    manifest, fns = load_stages(triton_repo, "onnxruntime")
    service = T2IService(triton_repo, fns, manifest=manifest)
    image = service.generate("a red apple on a wooden table", seed=7, **FAST_IMAGE)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert np.abs(image.astype(int) - reference_image).max() <= 2
    with pytest.raises(b3.InputError):
        service.generate("")


# ------------------------------------------------------------------------------------------------
# AOTInductor


@pytest.mark.parametrize("name", AOTI_GRAPHS)
def test_aoti_stage_matches_module(name, aoti_export, graphs):
    manifest = Manifest.read(aoti_export, verify=False)
    runner = load_stage(aoti_export, manifest.graphs[name], "aoti", torch.device("cpu"))
    assert_stage_matches(graphs[name], runner, CASES[name])


def test_from_exported_aoti_image_matches_engine(aoti_export, reference_image):
    engine = b3.Engine.from_exported(aoti_export, runtime="aoti")
    assert np.abs(image_array(engine) - reference_image).max() <= 2
    with pytest.raises(ExportError, match="llm_decode"):  # only the prefill was exported: no chat
        engine.chat([{"role": "user", "content": "Hi"}], b3.SamplingParams(max_tokens=3))


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_export_flat_onnx_layout(tmp_path, tiny_dir, capsys):
    from blip3o_engine.cli import main

    out = tmp_path / "vae-only"
    assert main(["export", "--model", str(tiny_dir), "--format", "onnx", "--stages", "vae", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config", "manifest.json", "vae.onnx", "weights.safetensors"]
    engine = b3.Engine.from_exported(out)
    with pytest.raises(ExportError, match="'llm_prefill' is not in this export"):
        engine.generate_image("a cat", b3.ImageParams(seed=0, **FAST_IMAGE))
    assert main(["export", "--format", "onnx", "--stages", "vae,clip", "-o", str(tmp_path / "bad")]) == 2
    assert "error: unknown stage(s) clip" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The small preset (minutes: BLIP3O_RUN_SLOW=1 python -m pytest -m slow tests/export)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="exports the small preset (minutes); set BLIP3O_RUN_SLOW=1")
@pytest.mark.parametrize("fmt,runtime", [("onnx", "onnxruntime"), ("aoti", "aoti")])
def test_small_preset_image_matches_engine(fmt, runtime, tmp_path):
    from blip3o_engine.export import export

    engine = b3.Engine.from_pretrained("small")
    export(engine, tmp_path / fmt, format=fmt, stages=["llm_prefill", "dit", "unet", "vae"], progress=False)
    exported = b3.Engine.from_exported(tmp_path / fmt, runtime=runtime)
    params = b3.ImageParams(seed=3, dit_steps=10, decoder_steps=10)
    a = np.asarray(exported.generate_image("a small house in the mountains", params).image).astype(int)
    b = np.asarray(engine.generate_image("a small house in the mountains", params).image).astype(int)
    assert np.abs(a - b).max() <= 2
