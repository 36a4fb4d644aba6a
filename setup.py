"""Build script. Project metadata lives in pyproject.toml; this file adds the two things pyproject
cannot say on its own:

- the package layout: `blip3o_engine` comes from `python/blip3o_engine/`, and the subpackages of
  `blip3o_engine.kernels` (`triton`, `cuda`) from the top-level `kernels/` (device code kept in one
  place). `kernels/` itself has no `__init__.py`, so that from the repository root it never becomes a
  top-level package `kernels` hiding PyPI's (see python/blip3o_engine/kernels/__init__.py);
- the native module `blip3o_engine._C`, built by CMake (CMakeLists.txt) for the running Python.

`pip install .` and `pip install -e .` both go through `CMakeBuild.build_extension`, which writes
the module where setuptools expects it; in editable mode setuptools then copies it into
`python/blip3o_engine/`. After editing C++ sources, rerun `pip install -e .` (add
`--no-build-isolation` to reuse the CMake build directory and rebuild only what changed).
Set BLIP3O_DEBUG=1 for an unoptimized build with debug info.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt, not by setuptools."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _find_tool(name: str) -> str | None:
    """A build tool on PATH, else next to this interpreter (a venv used without activating it)."""
    found = shutil.which(name)
    if found:
        return found
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.is_file() and os.access(sibling, os.X_OK) else None


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing `_C` at the path setuptools asks for."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11  # a build requirement (pyproject.toml), so importable only while building

        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError("building blip3o_engine._C needs CMake >= 3.18 (pip install cmake)")
        ninja = _find_tool("ninja")
        config = "Debug" if (self.debug or os.environ.get("BLIP3O_DEBUG")) else "Release"
        # The exact file name setuptools expects, e.g. .../blip3o_engine/_C.cpython-311-x86_64-linux-gnu.so
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        suffix = target.name[len(ext.name.rsplit(".", 1)[-1]):]

        configure = [
            cmake, "-S", str(ROOT),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DBLIP3O_OUTPUT_DIR={target.parent}",
            f"-DBLIP3O_EXT_SUFFIX={suffix}",
        ]
        if ninja and "CMAKE_GENERATOR" not in os.environ:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        build_dir = Path(self.build_temp).resolve() / "cmake"
        _reset_if_configured_differently(build_dir, configure)
        subprocess.run([*configure, "-B", str(build_dir)], check=True)
        jobs = self.parallel or os.cpu_count() or 1
        subprocess.run([cmake, "--build", str(build_dir), "--config", config, "-j", str(jobs)],
                       check=True)
        if not target.is_file():
            raise RuntimeError(f"CMake finished but did not produce {target}")


def _reset_if_configured_differently(build_dir: Path, configure: list[str]) -> None:
    """Empties `build_dir` if its CMake cache came from another configure command line.

    CMake refuses to switch generator or cmake binary in an existing build directory, and pip's
    isolated builds bring cmake, ninja and pybind11 from a fresh temporary environment each time.
    A stamp of the configure command line tells a reusable directory from a stale one.
    """
    stamp = build_dir / "blip3o-configure.json"
    wanted = json.dumps(configure)
    if build_dir.exists() and (not stamp.is_file() or stamp.read_text() != wanted):
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)


def _kernel_package_dirs() -> dict[str, str]:
    """`blip3o_engine.kernels.<p>` -> `kernels/<p>` for every package under the top-level kernels/ folder."""
    return {f"blip3o_engine.kernels.{p}": f"kernels/{p.replace('.', '/')}" for p in find_packages("kernels")}


def _packages() -> list[str]:
    """`blip3o_engine` and its subpackages (`blip3o_engine.kernels` among them), then the kernel folders."""
    core = find_packages("python/blip3o_engine")
    return ["blip3o_engine"] + [f"blip3o_engine.{p}" for p in core] + list(_kernel_package_dirs())


setup(
    packages=_packages(),
    package_dir={"blip3o_engine": "python/blip3o_engine", **_kernel_package_dirs()},
    # CUDA sources are compiled at first use by NVRTC, so they ship as data next to their launchers.
    # The server's web playground (plain HTML/JS/CSS) and the trained `demo` preset (a checkpoint
    # directory) ship inside the package.
    package_data={"blip3o_engine.kernels.cuda": ["*.cu", "*.cuh", "*.h"],
                  "blip3o_engine.serve": ["static/*.html", "static/*.js", "static/*.css"],
                  "blip3o_engine": ["presets/*/*.json", "presets/*/*.txt", "presets/*/*.safetensors",
                                    "presets/*/diffusion-decoder/*.json", "presets/*/diffusion-decoder/*/*"]},
    ext_modules=[CMakeExtension("blip3o_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
