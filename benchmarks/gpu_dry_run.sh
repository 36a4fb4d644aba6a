#!/usr/bin/env bash
# CPU dry run of benchmarks/gpu_check.sh in a venv that mimics the lent GPU machine's packages
# (benchmarks/gpu_machine.txt: transformers 5.17, huggingface_hub 1.33, triton 3.6, onnx 1.23,
# onnxruntime 1.30, NO diffusers), so that the one prepared GPU run does not fail on plumbing.
#
#   bash benchmarks/gpu_dry_run.sh          # from anywhere; ~3 min the first time (venv), then ~2 min
#
# Steps: (1) .gpu-dry-venv/ (git-ignored; GPU_DRY_VENV overrides) from gpu_machine.txt's versions, without
# diffusers, plus the build tools the machine has; (2) checks diffusers is absent and that the whole suite
# collects there (`pytest --collect-only`: a module that cannot even be imported without diffusers fails
# here); (3) benchmarks/prepare_gpu_wheels.sh (.whl/); (4) gpu_check.sh with GPU_CHECK_DEVICE=cpu on the
# `tiny` preset: carried wheels, offline install, `pytest -m gpu` (every test skips: no CUDA), the bench
# steps, the summary table. Its output goes to gpu_check_out/ (git-ignored).
#
# Differences from the machine that remain: Python 3.11 here (3.12 there); torch 2.13.0 CPU here (2.11.0
# +cu130 there: PyPI has no CPU build of 2.11); numpy 2.4.6 (2.5.2 there: no Python 3.11 wheel); no GPU,
# so the `gpu` tests skip instead of running.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_DRY_VENV:-.gpu-dry-venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== venv $VENV (the GPU machine's packages, benchmarks/gpu_machine.txt)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -c benchmarks/gpu_machine.txt \
    torch triton transformers huggingface-hub tokenizers safetensors numpy pillow tqdm jinja2 accelerate \
    onnx onnxruntime onnxscript cuda-bindings 'nvidia-cuda-nvrtc==13.0.*' pytest pytest-xdist hypothesis \
    matplotlib pybind11 cmake ninja setuptools wheel
fi
"$VENV/bin/python" - <<'EOF'
import importlib.util
import sys

import torch
import transformers

assert importlib.util.find_spec("diffusers") is None, "the dry-run venv must not have diffusers"
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "diffusers absent")
EOF

echo "== collect the whole suite without diffusers"
# Before gpu_check.sh installs anything: the project's sources on sys.path (python/ for blip3o_engine; the
# kernels subpackages are found through setup.py's mapping only once installed, so install it first).
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . > /dev/null
"$VENV/bin/python" -m pytest --collect-only -q -p no:cacheprovider tests > gpu_dry_collect.log 2>&1 \
  || { tail -30 gpu_dry_collect.log; echo "COLLECTION FAILED without diffusers (gpu_dry_collect.log)"; exit 1; }
tail -1 gpu_dry_collect.log
rm -f gpu_dry_collect.log

echo "== prepare .whl"
PYTHON="$VENV/bin/python" bash benchmarks/prepare_gpu_wheels.sh

echo "== gpu_check.sh, CPU dry run"
rm -rf gpu_check_out
# Few steps and repetitions: this checks the script's plumbing (every bench mode, the CSV, the plot, the
# summary), not speed, and must fit gpu_check.sh's time plan on a loaded 2-core machine.
OUT=$PWD/gpu_check_out GPU_CHECK_DEVICE=cpu GPU_CHECK_MODELS=${GPU_CHECK_MODELS:-tiny} \
  GPU_CHECK_BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-"--threads 1 --steps 3 --dit-steps 3 --gen-tokens 4 --reps 3 --min-reps 1 --budget-s 1"} \
  PYTHON="$VENV/bin/python" bash benchmarks/gpu_check.sh
