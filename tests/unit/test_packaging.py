"""Packaging: the repository's top-level `kernels/` folder must never pass for PyPI's `kernels`.

From the repository root Python puts the current directory first on sys.path (`python -c`, `python -m
pytest`, any script there), so a `kernels/__init__.py` there would make the folder a top-level package
`kernels` found before the installed package that transformers >= 5.25 imports. The folder's subpackages
are installed as `blip3o_engine.kernels.{triton,cuda}` and it has no `__init__.py` of its own. Each check
runs in a fresh interpreter started in the repository root, exactly as a user's command would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_in_repo_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after the current directory on sys.path, like site-packages
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_kernels_from_the_repo_root_does_not_find_the_repo_folder():
    """An installed `kernels` is the one imported; with none installed, the folder (no `__init__.py`) is
    at most a PEP 420 namespace portion: no `__file__`, which transformers reads as "not installed"."""
    proc = _run_in_repo_root(
        "import importlib.metadata\n"
        "try:\n"
        "    print(importlib.metadata.version('kernels'))\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    print('not installed')\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None))\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed, found = proc.stdout.strip().splitlines()[-2:]
    if installed == "not installed":
        assert found == "None", f"`import kernels` found a regular package: {found}"
    else:
        assert found != "None" and REPO_ROOT / "kernels" not in Path(found).resolve().parents, (
            f"`import kernels` found {found}, not the installed kernels {installed}")


def test_an_installed_kernels_package_wins_from_the_repo_root(tmp_path):
    """A stand-in for PyPI's `kernels` on sys.path after the repo root (where site-packages is) is the one
    `import kernels` returns, submodules included, while `blip3o_engine.kernels` keeps working beside it."""
    pkg = tmp_path / "kernels"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from kernels.utils import CUDAProperties\n")
    (pkg / "utils" / "__init__.py").write_text("class CUDAProperties:\n    pass\n")
    code = ("import kernels\n"
            "from kernels import CUDAProperties\n"
            "import kernels.utils\n"
            "from blip3o_engine.kernels import nvrtc\n"
            "import blip3o_engine.kernels.triton\n"
            "print(kernels.__file__)\n"
            "print(nvrtc.__name__)\n")
    proc = _run_in_repo_root(code, extra_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found, nvrtc_name = proc.stdout.strip().splitlines()[-2:]
    assert Path(found).resolve() == (pkg / "__init__.py").resolve()
    assert nvrtc_name == "blip3o_engine.kernels.nvrtc"


def test_transformers_image_processor_imports_from_the_repo_root():
    """transformers >= 5.25 does `from kernels import CUDAProperties` while importing its processors."""
    proc = _run_in_repo_root("from transformers import AutoImageProcessor, AutoTokenizer\n"
                             "import transformers; print(transformers.__version__)")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_built_package_ships_the_trained_demo_preset(tmp_path):
    """A non-editable install copies what setup.py's package_data lists (an editable one reads the source
    tree): every file of the packaged `demo` checkpoint must be in the build, or `pip install .` gives
    an engine whose default model is missing. `build_py` is the step of the wheel build that copies the
    Python files and package data (no C++ compile, so it takes a second)."""
    presets = REPO_ROOT / "python" / "blip3o_engine" / "presets"
    shipped = sorted(str(p.relative_to(presets)) for p in presets.rglob("*") if p.is_file())
    assert "demo/model.safetensors" in shipped and "demo/diffusion-decoder/unet/config.json" in shipped
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = tmp_path / "blip3o_engine" / "presets"
    assert sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file()) == shipped
    manifest = (REPO_ROOT / "MANIFEST.in").read_text()  # the sdist (pip's fallback route) carries it too
    assert "graft python/blip3o_engine/presets" in manifest
