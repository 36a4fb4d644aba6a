#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (docs: the shared GPU.md notes; benchmarks/results/README.md).
#
#   bash benchmarks/gpu_check.sh        # from the repository root, on the GPU machine
#
# 1. installs the project without network (pip --no-build-isolation --no-deps -e .); wheels for
#    missing packages (benchmarks/prepare_gpu_wheels.sh writes them to .whl/) are installed offline into
#    a folder put first on PYTHONPATH;
# 2. runs `pytest -m gpu` — any failure makes the script exit non-zero (after the benchmarks, so a
#    lent machine's minutes still give numbers), with a loud line at the end;
# 3. benchmarks `bench all` at the 8b shapes (random bf16 weights), optimized vs reference, floors
#    from ceilings measured in the same run; then 8b text-to-image at batch 4 (images/s) and 4b, each
#    if enough time is left;
# 4. writes everything to $OUT when set (else ./gpu_check_out): env.txt, pytest_gpu.log, bench.csv,
#    bench_8b.log, bench_4b.log, bench_8b.png / bench_4b.png (when matplotlib is there);
#    and prints a short table last.
#
# Time: sized to end within ~8 minutes on an H100 (each step has its own timeout; the CSV is
# appended stage by stage, so a step cut short keeps what it measured).
#
# Dry run on a CPU machine (checks the script's plumbing, not the GPU), in a venv that mimics the GPU
# machine's packages (benchmarks/gpu_machine.txt: transformers 5.17, no diffusers, ...):
#   bash benchmarks/gpu_dry_run.sh
# which runs, after building that venv and .whl/:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_MODELS=tiny GPU_CHECK_BENCH_ARGS="--steps 3 ..." \
#     PYTHON=.gpu-dry-venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DEST=${OUT:-$PWD/gpu_check_out}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export BLIP3O_ENGINE_CACHE=${BLIP3O_ENGINE_CACHE:-/tmp/blip3o_engine_cache}  # tiny checkpoint, built once
elapsed() { echo $(( $(date +%s) - START )); }
status=0
notes=()

echo "== environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1  # read-only query
  $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  $PY - <<'EOF'
import importlib.metadata as md
names = ("triton", "transformers", "huggingface-hub", "tokenizers", "safetensors", "diffusers", "kernels",
         "cuda-bindings", "nvidia-cuda-nvrtc", "onnx", "onnxruntime", "pytest", "hypothesis")
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print(" ".join(f"{n} {version(n)}" for n in names))
EOF
  git rev-parse --short=12 HEAD 2>/dev/null || echo "commit unknown (no .git)"
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"

# Carried wheels first (benchmarks/prepare_gpu_wheels.sh; the run carries .whl): offline, into a folder put
# first on PYTHONPATH, so the machine's own environment stays as it is (a dry run can repeat in one venv).
CARRIED=${GPU_CHECK_CARRIED:-/tmp/blip3o_carried}
if [ -f .whl/requirements.txt ]; then
  WHEELS=(-r .whl/requirements.txt)
elif compgen -G ".whl/*.whl" > /dev/null; then
  WHEELS=(.whl/*.whl)  # wheels put there by hand
else
  WHEELS=()
fi
if [ ${#WHEELS[@]} -gt 0 ]; then
  echo "== carried wheels"
  rm -rf "$CARRIED"
  $PY -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --target "$CARRIED" \
    "${WHEELS[@]}" && export PYTHONPATH=$CARRIED${PYTHONPATH:+:$PYTHONPATH} \
    || { echo "FAILED to install carried wheels"; exit 1; }
  ls "$CARRIED" | grep -E '\.dist-info$' | sed 's/\.dist-info$//' | tee -a "$DEST/env.txt"
fi

echo "== install ($(elapsed) s)"
if [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  echo "skipped (GPU_CHECK_SKIP_INSTALL)"
elif ! timeout 150 $PY -m pip install -q --no-build-isolation --no-deps -e . >> "$DEST/env.txt" 2>&1; then
  tail -30 "$DEST/env.txt"
  echo "INSTALL FAILED (log in env.txt)"
  exit 1
fi

echo "== pytest -m gpu ($(elapsed) s)"
# Whole suite collected: a module that cannot even be imported here fails the check too.
timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$DEST/pytest_gpu.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  status=1
  notes+=("GPU TESTS FAILED: pytest -m gpu exited $rc (5 = no test ran, 124 = timed out); see pytest_gpu.log")
fi

PLOT=()
if $PY -c "import matplotlib" 2>/dev/null; then PLOT=(--plot); else echo "matplotlib is not installed here: plots skipped"; fi
# Repetitions sized for the 8b shapes on an H100 from an estimate (no GPU run yet): the 50-step
# decoder loop and end-to-end T2I should take ~2-3 s a run in the eager reference; chat_batch at
# batch 8 decodes the 8 requests one after another. Check bench_8b.log's run counts after a run.
read -r -a MODELS <<< "${GPU_CHECK_MODELS:-8b 4b}"  # the first must run; the second if time allows
BENCH=(--device "${GPU_CHECK_DEVICE:-cuda}" --backend optimized,reference --batch 1,8 --gen-tokens 16 --warmup 1 --reps 5 --min-reps 3
       --budget-s 6 --csv "$DEST/bench.csv")
# Extra bench flags, last so they win (the CPU dry run shortens steps and repetitions: it checks plumbing).
read -r -a BENCH_EXTRA <<< "${GPU_CHECK_BENCH_ARGS:-}"
BENCH+=("${BENCH_EXTRA[@]}")

bench() {  # bench PRESET TIMEOUT_S [MODE EXTRA_ARGS...]
  local preset=$1 limit=$2 mode=${3:-all} plot=()
  shift 3 2>/dev/null || shift $#
  [ ${#PLOT[@]} -gt 0 ] && [ "$mode" = all ] && plot=(--plot "$DEST/bench_$preset.png")
  echo "== bench $mode --model $preset $* ($(elapsed) s, limit $limit s)"
  # `all` times text-to-image at batch 1 only; the batch-4 row (images/s) is its own later step, so
  # that its minute of eager reference never costs the chat rows.
  local extra=("$@")
  [ "$mode" = all ] && extra=(--image-batch 1 "${extra[@]}")
  timeout "$limit" $PY -m blip3o_engine.bench "$mode" --model "$preset" "${BENCH[@]}" "${extra[@]}" "${plot[@]}" 2>&1 \
    | tee -a "$DEST/bench_$preset.log"
  return "${PIPESTATUS[0]}"
}

bench "${MODELS[0]}" 240
rc=$?
if [ "$rc" -ne 0 ]; then
  status=1
  notes+=("${MODELS[0]} BENCH FAILED: exit $rc (124 = timed out; rows measured so far are in bench.csv); see bench_${MODELS[0]}.log")
fi

left=$(( 330 - $(elapsed) ))
if [ "$left" -ge 60 ]; then
  bench "${MODELS[0]}" "$left" t2i --only t2i_e2e --image-batch 4
  rc=$?
  [ "$rc" -ne 0 ] && notes+=("${MODELS[0]} batch-4 text-to-image bench: exit $rc (124 = time limit; partial rows in bench.csv)")
else
  notes+=("${MODELS[0]} batch-4 text-to-image bench skipped: only $left s left of the time plan")
fi

if [ ${#MODELS[@]} -gt 1 ]; then
  left=$(( 450 - $(elapsed) ))
  if [ "$left" -ge 150 ]; then
    bench "${MODELS[1]}" "$left"
    rc=$?
    if [ "$rc" -eq 124 ]; then
      notes+=("${MODELS[1]} bench stopped at its time limit: partial rows in bench.csv")
    elif [ "$rc" -ne 0 ]; then
      status=1
      notes+=("${MODELS[1]} BENCH FAILED: exit $rc; see bench_${MODELS[1]}.log")
    fi
  else
    notes+=("${MODELS[1]} bench skipped: only $left s left of the time plan")
  fi
fi

echo
echo "== summary ($(elapsed) s); full rows in bench.csv"
if [ -s "$DEST/bench.csv" ]; then
  $PY benchmarks/make_readme_table.py --csv "$DEST/bench.csv" --brief --all-runs
fi
for n in "${notes[@]}"; do echo "!! $n"; done
if [ "$status" -ne 0 ]; then
  echo "GPU CHECK FAILED"
else
  echo "GPU CHECK PASSED"
fi
exit "$status"
