"""CI compile gate: every Triton kernel in kernels/triton builds real cubins for sm_80 and sm_90.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline down to
Triton's bundled ptxas, with no GPU. It runs in a subprocess because this process has TRITON_INTERPRET=1
(tests/kernels/conftest.py), under which `@triton.jit` yields interpreted functions that cannot compile;
the subprocess also gets an empty Triton cache, so every kernel is really compiled each run.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from blip3o_engine.kernels.triton import GATE_CAPABILITIES, KernelSpec, module_specs

GATE_SCRIPT = """
import json, time
start = time.perf_counter()
from blip3o_engine.kernels.triton import compile_all
rows = compile_all()
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))
"""

# The kernels that exist today; the gate must cover at least these (an empty registry would pass vacuously).
EXPECTED_KERNELS = {"rms_norm_modulate_kernel", "gated_rms_residual_kernel", "layer_norm_rope_kernel",
                    "swiglu_kernel", "paged_decode_kernel", "paged_prefill_kernel", "write_kv_cache_kernel",
                    "rms_norm_kernel", "mrope_kernel"}


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", GATE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"compile gate failed:\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    compiled = {(name, cap) for name, cap, _ in result["rows"]}
    names = {name for name, _ in compiled}
    assert {name.split("[")[0] for name in names} >= EXPECTED_KERNELS
    assert compiled == {(name, cap) for name in names for cap in GATE_CAPABILITIES}
    # Budget: the gate must stay cheap for CI (0.1-2 s per compile on 2 cores, ~50 s for 48 compiles when
    # the machine is idle). Counted, not timed: a timed assertion fails on a loaded machine, not on a change.
    assert len(result["rows"]) <= 60, f"{len(result['rows'])} compiles: keep the gate's specs few"


def test_a_kernel_without_spec_fails_the_gate():
    """A `*_kernel` JIT function that its module's COMPILE_SPECS does not list is an error, so new
    kernels cannot skip the gate; helpers (not named `*_kernel`) need no spec."""
    from triton.runtime.jit import JITFunction

    def new_kernel(x_ptr):  # a stand-in body; never compiled here
        pass

    def _helper(x):
        return x

    module = types.ModuleType("fake_kernels")
    module.new_kernel, module._helper = JITFunction(new_kernel), JITFunction(_helper)
    with pytest.raises(RuntimeError, match="new_kernel"):
        module_specs(module)
    module.COMPILE_SPECS = [KernelSpec(module.new_kernel, {"x_ptr": "*fp32"})]
    assert module_specs(module) == module.COMPILE_SPECS



# ------------------------------------------------------------------------------------------------
# The gate compiles what the engine launches: every launch's tensor dtypes (and int ranges) match a spec.

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                 torch.int64: "i64"}


class _RecordingKernel:
    """Stands in for a `@triton.jit` kernel and records, per launch, the Triton type of each argument that
    its COMPILE_SPECS gives a type to: `*<dtype>` for tensors, i32/i64 for ints (by value, as Triton
    specializes them), fp32 for floats."""

    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches
        self.names = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.names, args), **kwargs)
            self.launches.append((self.kernel.__name__, {n: _triton_type(v) for n, v in bound.items()}))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _triton_type(value) -> str | None:
    if isinstance(value, torch.Tensor):
        return f"*{_TRITON_TYPES[value.dtype]}"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32" if isinstance(value, float) else None


_FLOAT_POINTERS = {"*fp32", "*bf16", "*fp16"}


def _matches(spec: KernelSpec, types: dict[str, str | None]) -> bool:
    """The launch's index/position pointers and scalars have the spec's types (constexprs aside). Float
    tensors only need to be float tensors: this test runs the engine in fp32 on CPU, a GPU runs it in bf16,
    and which float dtypes each kernel is compiled for is its module's choice (each has bf16, see below)."""
    for name, kind in spec.signature.items():
        got = types.get(name)
        if kind == "constexpr" or got is None:
            continue
        if got in _FLOAT_POINTERS and kind in _FLOAT_POINTERS:
            continue
        if got != kind and not (got == "i32" and kind == "i64"):  # a small int also fits an i64 argument
            return False
    return True


@pytest.mark.usefixtures("interpreted")
def test_the_gate_compiles_what_the_engine_launches(tiny_dir, monkeypatch):
    """Chat and text-to-image through the optimized engine with every op forced onto its Triton kernel (in
    the interpreter): each launch must match one of its kernel's COMPILE_SPECS, argument by argument, so the
    cubins CI builds are the ones a GPU runs (e.g. M-RoPE positions are the runner's int32, not int64).
    Seconds: the tiny model, 3 tokens, one DiT and one decoder step."""
    from blip3o_engine import Engine, ImageParams, SamplingParams
    from blip3o_engine.kernels.triton import kernel_modules
    from blip3o_engine.ops import force_triton

    launches: list = []
    specs: dict[str, list[KernelSpec]] = {}
    for module in kernel_modules():
        for spec in module_specs(module):
            specs.setdefault(spec.kernel.__name__, []).append(spec)
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _RecordingKernel(getattr(module, name), launches))
    eng = Engine.from_pretrained(str(tiny_dir), device="cpu", dtype="float32", backend="optimized")
    with force_triton():
        eng.chat([{"role": "user", "content": "Hello there"}], SamplingParams(max_tokens=3, temperature=0.0))
        eng.generate_image("a red apple", ImageParams(seed=0, dit_steps=1, decoder_steps=1))
    launched = {name for name, _ in launches}
    assert {"paged_prefill_kernel", "paged_decode_kernel", "mrope_kernel", "write_kv_cache_kernel",
            "rms_norm_kernel", "swiglu_kernel", "rms_norm_modulate_kernel"} <= launched, launched
    unmatched = {(name, tuple(sorted((k, v) for k, v in types.items() if v)))
                 for name, types in launches if not any(_matches(s, types) for s in specs[name])}
    assert not unmatched, f"launches no COMPILE_SPECS entry covers: {sorted(unmatched)}"
    no_bf16 = {name for name in launched if not any("*bf16" in s.signature.values() for s in specs[name])}
    assert not no_bf16, f"kernels the gate never compiles for bf16, the GPU dtype: {sorted(no_bf16)}"
