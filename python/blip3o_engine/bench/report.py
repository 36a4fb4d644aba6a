"""Benchmark output: rows with floors and ratios, the stdout table, the CSV and the PNG.

CSV columns (`COLUMNS`), one row per (stage, backend, batch) of a run:
  date, device, commit, preset        the run (date = UTC start time, shared by all its rows)
  stage, backend, batch               what was timed; batch = requests / images, not the CFG batch
  median_ms, p10_ms, p90_ms           over the timed runs after warm-up
  floor_ms, ratio_to_floor            roofline floor from the ceilings measured in the same run
                                      (on a CPU too; empty where a stage has no cost model)
  ratio_to_reference                  median / the reference backend's median of the same stage and
                                      batch (empty for the reference rows themselves)
  compile_ms                          time of an explicit compile / graph-capture step; empty = the
                                      engine exposes none (work an engine does lazily on first use
                                      lands in the first warm-up run, reported as cold_ms in notes)
  notes                               `;`-separated key=value facts: dtype, which bound sets the
                                      floor, tokens/s, cold (first warm-up) time, ...
"""

from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .ceilings import Ceilings
from .stages import REFERENCE, StageResult

COLUMNS = ("date", "device", "commit", "preset", "stage", "backend", "batch", "median_ms", "p10_ms", "p90_ms",
           "floor_ms", "ratio_to_floor", "ratio_to_reference", "compile_ms", "notes")


@dataclass(frozen=True)
class RunInfo:
    date: str
    device: str
    commit: str
    preset: str
    dtype: str
    random_weights: bool
    host_load: float | None = None  # 1-minute load average of the host at the start (busy hosts time badly)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {model} ({threads} thread{'s' if threads != 1 else ''})"


def git_commit() -> str:
    """Short commit of the source tree, "-dirty" when tracked files other than benchmark results
    differ (a run rewriting benchmarks/results/ is not a code change); $BLIP3O_BENCH_COMMIT wins
    (for copies of the tree without .git); "unknown" when neither is available."""
    if os.environ.get("BLIP3O_BENCH_COMMIT"):
        return os.environ["BLIP3O_BENCH_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True, timeout=10).stdout.splitlines()
        dirty = [line for line in status if "benchmarks/results/" not in line]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def fmt(x: float | None, digits: int = 4) -> str:
    """`digits` significant digits without scientific notation; "" for None / NaN."""
    if x is None or not math.isfinite(x):
        return ""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


def build_rows(results: list[StageResult], info: RunInfo, ceil: Ceilings | None) -> list[dict[str, str]]:
    """CSV rows (`COLUMNS`) for `results`; ratios to the reference use results of the same call."""
    reference = {(r.stage, r.batch): r.timing.median_ms for r in results if r.backend == REFERENCE}
    rows = []
    for r in results:
        median = r.timing.median_ms
        notes = [f"dtype={info.dtype}"]
        if info.host_load is not None:
            notes.append(f"loadavg={info.host_load:.1f}")
        floor = None
        if ceil is not None and r.cost is not None:
            floor = r.cost.floor_s(ceil.matmul_flops_per_s, ceil.copy_bytes_per_s) * 1e3
            notes.append(f"bound={r.cost.bound(ceil.matmul_flops_per_s, ceil.copy_bytes_per_s)}")
        notes += list(r.notes)
        if r.timing.cold_ms is not None:
            notes.append(f"cold_ms={fmt(r.timing.cold_ms)}")
        notes.append(f"runs={len(r.timing.samples_ms)}")
        ref = reference.get((r.stage, r.batch)) if r.backend != REFERENCE else None
        rows.append({
            "date": info.date, "device": info.device, "commit": info.commit, "preset": info.preset,
            "stage": r.stage, "backend": r.backend, "batch": str(r.batch),
            "median_ms": fmt(median), "p10_ms": fmt(r.timing.p10_ms), "p90_ms": fmt(r.timing.p90_ms),
            "floor_ms": fmt(floor), "ratio_to_floor": fmt(median / floor if floor else None, 3),
            "ratio_to_reference": fmt(median / ref if ref else None, 3),
            "compile_ms": fmt(r.compile_ms), "notes": "; ".join(notes),
        })
    return rows


def check_csv(path: str | Path) -> bool:
    """True if `path` already holds rows with our columns, False if it is absent or empty;
    ValueError if it has other columns (checked before a run, so no timing is lost to it)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    if tuple(header) != COLUMNS:
        raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)}; write to a new file")
    return True


def append_csv(path: str | Path, rows: list[dict[str, str]]) -> None:
    """Append rows; write the header for a new or empty file; refuse a file with other columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not check_csv(path)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(COLUMNS)}")
        return list(reader)


def format_table(rows: list[dict[str, str]], info: RunInfo, ceil: Ceilings | None, load_s: float | None = None) -> str:
    weights = "random weights" if info.random_weights else "checkpoint weights"
    lines = [f"blip3o-engine bench: {info.device} | preset {info.preset} ({info.dtype}, {weights}) | "
             f"commit {info.commit} | {info.date}"]
    if info.host_load is not None:
        lines.append(f"host load average at start: {info.host_load:.1f} (timings of a busy host are noisy)")
    if load_s is not None:
        lines.append(f"model load: {load_s:.1f} s")
    if ceil is not None:
        lines.append(f"ceilings (measured in this run): {ceil.describe()}; floor = max(FLOPs / GEMM rate, "
                     f"weight bytes / copy bandwidth)")
    else:
        lines.append("no measured ceiling, so the floor and x-floor columns are left empty")
    lines.append("compile/capture: no separate step exists (compile_ms empty); what a backend compiles or "
                 "captures on first use is in its first warm-up run, cold_ms in the CSV notes")
    head = ("stage", "backend", "batch", "median ms", "p10 ms", "p90 ms", "floor ms", "x floor", "x ref", "notes")
    table = [head] + [(r["stage"], r["backend"], r["batch"], r["median_ms"], r["p10_ms"], r["p90_ms"],
                       r["floor_ms"] or "-", r["ratio_to_floor"] or "-", r["ratio_to_reference"] or "-",
                       _short_notes(r["notes"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i in (0, 1, 9) else c.rjust(widths[i]) for i, c in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short_notes(notes: str) -> str:
    """The notes worth a glance in the table (bound, tokens/s); the CSV keeps them all."""
    keep = [n for n in notes.split("; ") if n.startswith(("bound=", "tok/s=", "GB/s=", "TFLOP/s="))]
    return " ".join(keep)


def check_plotting() -> None:
    """Raise RuntimeError with the fix if matplotlib is missing (checked before any timing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib, which is not installed: `pip install matplotlib` "
                           "(or the dev extra: pip install -e '.[dev]'), or drop --plot") from e


def plot(rows: list[dict[str, str]], info: RunInfo, path: str | Path) -> None:
    """Per-stage bars of the median (log scale), one bar per backend, the floor as a black tick."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r["stage"].startswith("ceiling_")]
    labels = list(dict.fromkeys(f"{r['stage']} b{r['batch']}" for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    height = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(labels) * max(1, len(backends)) + 1.5))
    for k, backend in enumerate(backends):
        mine = [r for r in rows if r["backend"] == backend]
        for j, r in enumerate(mine):
            if float(r["median_ms"]) <= 0:  # a derived time lost in noise; a log axis cannot show it
                continue
            y = labels.index(f"{r['stage']} b{r['batch']}") + k * height
            ax.barh(y, float(r["median_ms"]), height=height, color=f"C{k}", label=backend if j == 0 else None)
            if r["floor_ms"]:
                ax.plot([float(r["floor_ms"])] * 2, [y - height / 2, y + height / 2], color="black", lw=2)
    ax.set_yticks([i + height * (len(backends) - 1) / 2 for i in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log scale); black tick = floor from measured ceilings" if any(r["floor_ms"] for r in rows)
                  else "median ms (log scale); no floors in this run")
    ax.set_title(f"{info.device} | {info.preset} {info.dtype} | {info.commit} | {info.date}", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
