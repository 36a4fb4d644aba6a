"""CI compile gate: every Triton kernel in kernels/triton builds real cubins for sm_80 and sm_90.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline down to
Triton's bundled ptxas, with no GPU. It runs in a subprocess because this process has TRITON_INTERPRET=1
(tests/kernels/conftest.py), under which `@triton.jit` yields interpreted functions that cannot compile;
the subprocess also gets an empty Triton cache, so every kernel is really compiled each run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

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

