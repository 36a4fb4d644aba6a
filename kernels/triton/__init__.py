"""Triton kernels of blip3o_engine (`blip3o_engine.kernels.triton`) and the CI compile gate's registry.

Each module here holds `@triton.jit` kernels, their launchers (torch tensors in, torch tensors out) and a
`COMPILE_SPECS` list: one `KernelSpec` (argument types + constexpr values) per kernel variant that the
engine launches. `compile_all()` imports every module of this package, checks that each kernel (a
JIT function whose name ends in `_kernel`; `@triton.jit` helpers must not end so) has a spec, and compiles
every spec for sm_80 and sm_90 with `triton.compile(ASTSource(...), target=GPUTarget(...))` — real cubins
through Triton's bundled ptxas, no GPU needed. tests/kernels/test_compile_gate.py runs it.

Importing this package imports no kernel module, so it never freezes the interpreter choice: `@triton.jit`
reads TRITON_INTERPRET when a kernel module is imported, and the CPU tests set it before that.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any

# The sm targets CI builds for: A100 (sm_80) and H100/H200 (sm_90).
GATE_CAPABILITIES = (80, 90)


@dataclass(frozen=True)
class KernelSpec:
    """One compile example of a `@triton.jit` kernel, in the form `triton.compile(ASTSource(...))` takes.

    `signature` maps every argument to its Triton type ("*bf16", "i32", "fp32", ...) or "constexpr";
    `constexprs` gives the constexpr values (realistic ones: the shapes the engine launches).
    """

    kernel: Any  # a triton JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4

    @property
    def name(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        ptrs = sorted({t for t in self.signature.values() if t.startswith("*")})
        return f"{self.kernel.__name__}[{'/'.join(ptrs)}; {consts}]"


def kernel_modules() -> list[Any]:
    """Every module of this package, imported (this decides interpreted vs compiled kernels)."""
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]


def module_specs(module: Any) -> list[KernelSpec]:
    """`module.COMPILE_SPECS`; raises if one of its `*_kernel` JIT functions has no spec there."""
    from triton.runtime.jit import JITFunction

    specs = list(getattr(module, "COMPILE_SPECS", []))
    covered = {id(s.kernel) for s in specs}
    missing = [name for name, obj in vars(module).items()
               if isinstance(obj, JITFunction) and name.endswith("_kernel") and id(obj) not in covered]
    if missing:
        raise RuntimeError(f"{module.__name__}: kernels without a COMPILE_SPECS entry: {missing}")
    return specs


def compile_specs() -> list[KernelSpec]:
    """The specs of every module of this package (see `module_specs`)."""
    return [spec for module in kernel_modules() for spec in module_specs(module)]


def compile_all(capabilities: tuple[int, ...] = GATE_CAPABILITIES) -> list[tuple[str, int, float]]:
    """Compiles every spec for each `sm_<capability>`; returns (spec name, capability, seconds) rows.

    Collects every failure before raising, so one run names all broken kernels. Must run without
    TRITON_INTERPRET (interpreted kernels cannot be compiled).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset")
    rows, failures = [], []
    for spec in compile_specs():
        for cap in capabilities:
            start = time.perf_counter()
            try:
                src = ASTSource(spec.kernel, spec.signature, spec.constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                          options={"num_warps": spec.num_warps})
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as exc:  # noqa: BLE001 - reported all together below
                failures.append(f"{spec.name} sm_{cap}: {type(exc).__name__}: {exc}")
                continue
            rows.append((spec.name, cap, time.perf_counter() - start))
    if failures:
        raise RuntimeError("Triton kernels failed to compile:\n" + "\n".join(failures))
    return rows
