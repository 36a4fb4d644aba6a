"""The suite without diffusers, as on the lent GPU machine (benchmarks/gpu_machine.txt).

diffusers is only the oracle of some tests, never a dependency of the engine. In a fresh interpreter that
cannot import it (`sys.modules["diffusers"] = None`, so `import diffusers` raises ModuleNotFoundError and
`importlib.util.find_spec` says it is absent), `pytest -m gpu tests` — what benchmarks/gpu_check.sh runs
there — must collect every module and finish, and in the modules that use diffusers only the tests that
reach for it may skip, with that reason; the others must still run and pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_WITHOUT_DIFFUSERS = ("import sys\n"
                         "sys.modules['diffusers'] = None  # as if not installed\n"
                         "import pytest\n"
                         "sys.exit(pytest.main(sys.argv[1:]))\n")
ORACLE_MODULES = ["tests/unit/test_config.py", "tests/unit/test_euler_discrete.py", "tests/unit/test_flow_match.py",
                  "tests/parity/test_dit.py", "tests/parity/test_unet_vae.py",
                  "tests/parity/test_t2i_vs_official_pipeline.py"]


def _pytest_without_diffusers(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT_DIFFUSERS, "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def _counts(output: str) -> dict[str, int]:
    summary = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run every gpu test a second time")
def test_gpu_selection_collects_and_runs_without_diffusers():
    proc = _pytest_without_diffusers("-m", "gpu", "tests")
    counts = _counts(proc.stdout)
    assert proc.returncode == 0 and "error" not in counts and "errors" not in counts, proc.stdout[-5000:]
    assert counts.get("passed", 0) + counts.get("skipped", 0) >= 40, counts  # the gpu tests were selected


def test_only_the_tests_that_need_diffusers_skip():
    proc = _pytest_without_diffusers("-rs", *ORACLE_MODULES)
    counts = _counts(proc.stdout)
    assert proc.returncode == 0 and not {"failed", "error", "errors"} & set(counts), proc.stdout[-5000:]
    assert counts.get("passed", 0) >= 40, counts  # config, schedule and model tests that need no oracle
    assert counts.get("skipped", 0) >= 40, counts
    reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    # Every skip is for the missing oracle (or, as anywhere without a GPU, a `gpu`-marked test).
    assert reasons and all("diffusers (the oracle) is not installed" in r or "needs a CUDA device" in r
                           for r in reasons), reasons[:5]
