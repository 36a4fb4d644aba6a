#!/usr/bin/env bash
# Prepares .whl/ (git-ignored): the wheels a GPU run needs that the lent GPU machine lacks, built for its
# Python 3.12 on manylinux x86-64, so that benchmarks/gpu_check.sh installs them there with no network.
#
#   bash benchmarks/prepare_gpu_wheels.sh     # here, with PyPI reachable; then the device run carries .whl
#
# What the machine lacks (benchmarks/gpu_machine.txt lists what it has), and why a GPU run wants it:
#   diffusers           the oracle of the parity tests (DiT vs Lumina, UNet/VAE and schedulers vs diffusers,
#                       the official pipeline). `pytest -m gpu` runs without it (those modules skip); with it
#                       the same suite can also run `pytest tests/parity` there. Version: constraints.txt's.
#   importlib-metadata  a dependency of diffusers that the machine does not have, and lazy-importer, its own.
# torch and everything else the engine imports are on the machine; never carry torch (GBs, and the
# machine's CUDA build is the one to test). The tree a device run copies is at most 64 MiB, so the wheels
# must stay well under that: the script fails above MAX_MB.
#
# It writes .whl/requirements.txt (name==version per wheel), which gpu_check.sh installs from .whl with
# `pip install --no-index --find-links .whl --no-deps -r .whl/requirements.txt`, and it checks that every
# dependency of every wheel is either carried or on the machine, so that offline install cannot miss one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
MAX_MB=${MAX_MB:-24}

pin() {  # the exact pin of $1 in constraints.txt
  grep -E "^$1==" constraints.txt || { echo "no pin for $1 in constraints.txt" >&2; exit 1; }
}
WANT=("$(pin diffusers)" "importlib-metadata==10.2.0" "lazy-importer==0.1.0")

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --disable-pip-version-check --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WANT[@]}"
printf '%s\n' "${WANT[@]}" > "$DEST/requirements.txt"

# Every Requires-Dist of every wheel (markers evaluated for the machine: CPython 3.12, Linux x86-64, no
# extras) must be carried or named in benchmarks/gpu_machine.txt.
"$PY" - "$DEST" benchmarks/gpu_machine.txt <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

dest, machine_file = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
on_machine = {norm(Requirement(line.split("#")[0].strip()).name)
              for line in machine_file.read_text().splitlines() if line.split("#")[0].strip()}
wheels = sorted(dest.glob("*.whl"))
carried = {norm(w.name.split("-")[0]) for w in wheels}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if norm(req.name) not in carried | on_machine:
                missing.append(f"{wheel.name} needs {req}")
if missing:
    sys.exit("dependencies neither carried nor on the GPU machine:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels; every dependency is carried or on the GPU machine")
EOF

size_mb=$(( ($(du -sk "$DEST" | cut -f1) + 1023) / 1024 ))
du -h "$DEST"/*.whl
echo "total ${size_mb} MiB in $DEST/ (install list: $DEST/requirements.txt)"
if [ "$size_mb" -gt "$MAX_MB" ]; then
  echo "too large for a device run (limit here ${MAX_MB} MiB of the 64 MiB the run copies)" >&2
  exit 1
fi
