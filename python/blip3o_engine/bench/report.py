"""Benchmark output: rows with floors and ratios, the stdout table, the CSV and the PNG.

CSV columns (`COLUMNS`), one row per (stage, backend, batch) of a run:
  date, device, commit, preset        the run (date = UTC start time, shared by all its rows)
  stage, backend, batch               what was timed; batch = requests / images, not the CFG batch
  median_ms, p10_ms, p90_ms           over the timed runs after warm-up (empty for a skipped row)
  floor_ms, ratio_to_floor            roofline floor from the ceilings measured in the same run
                                      (on a CPU too; empty where a stage has no cost model): matmul
                                      FLOPs at the GEMM ceiling + convolution FLOPs at the convolution
                                      ceiling, or bytes at the copy bandwidth, whichever is slower
  ratio_to_reference                  median / the baseline backend's median of the same stage and
                                      batch (`stages.BASELINES`: reference, a kernel's torch twin, the
                                      serial policy); empty for the baseline rows themselves
  compile_ms                          time of an explicit compile / graph-capture step; empty = the
                                      engine exposes none (work an engine does lazily on first use
                                      lands in the first warm-up run, reported as cold_ms in notes)
  gb_per_s, tflop_per_s               achieved rates: the cost model's bytes and FLOPs / median (for a
                                      kernel row, every byte it reads and writes; for a model stage,
                                      its weight bytes only); for the ceiling rows, the ceiling itself
  skipped                             why a row was not timed (e.g. kernel rows on a CPU); else empty
  notes                               `;`-separated key=value facts: dtype, host load, which bound sets
                                      the floor (gemm / conv / memory), tokens/s, cold (first warm-up)
                                      time, ...

Files written before gb_per_s / tflop_per_s / skipped existed (`OLD_COLUMNS`) are read with those columns
empty, and appending to one rewrites it with the current columns first (its values unchanged).
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
from .stages import BASELINES, StageResult

COLUMNS = ("date", "device", "commit", "preset", "stage", "backend", "batch", "median_ms", "p10_ms", "p90_ms",
           "floor_ms", "ratio_to_floor", "ratio_to_reference", "compile_ms", "gb_per_s", "tflop_per_s", "skipped",
           "notes")
OLD_COLUMNS = tuple(c for c in COLUMNS if c not in ("gb_per_s", "tflop_per_s", "skipped"))


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
    """CSV rows (`COLUMNS`) for `results`; ratios to the baseline use results of the same call."""
    baseline = {(r.stage, r.batch): r.timing.median_ms for r in results
                if r.backend in BASELINES and r.timing is not None}
    rows = []
    for r in results:
        notes = [f"dtype={info.dtype}"]
        if info.host_load is not None:
            notes.append(f"loadavg={info.host_load:.1f}")
        row = {c: "" for c in COLUMNS}
        row.update(date=info.date, device=info.device, commit=info.commit, preset=info.preset, stage=r.stage,
                   backend=r.backend, batch=str(r.batch), skipped=r.skipped or "")
        floor = None
        if ceil is not None and r.cost is not None:
            rates = (ceil.matmul_flops_per_s, ceil.copy_bytes_per_s, ceil.conv_flops_per_s)
            floor = r.cost.floor_s(*rates) * 1e3
            notes.append(f"bound={r.cost.bound(*rates)}")
            row["floor_ms"] = fmt(floor)
        notes += list(r.notes)
        if r.timing is not None:
            median = r.timing.median_ms
            gbps, tflops = r.gb_per_s, r.tflop_per_s
            if r.cost is not None:
                gbps = gbps if gbps is not None else (r.cost.bytes / median / 1e6 if r.cost.bytes else None)
                tflops = tflops if tflops is not None else (r.cost.flops / median / 1e9 if r.cost.flops else None)
            if r.timing.cold_ms is not None:
                notes.append(f"cold_ms={fmt(r.timing.cold_ms)}")
            notes.append(f"runs={len(r.timing.samples_ms)}")
            ref = baseline.get((r.stage, r.batch)) if r.backend not in BASELINES else None
            row.update(median_ms=fmt(median), p10_ms=fmt(r.timing.p10_ms), p90_ms=fmt(r.timing.p90_ms),
                       ratio_to_floor=fmt(median / floor if floor else None, 3),
                       ratio_to_reference=fmt(median / ref if ref else None, 3), compile_ms=fmt(r.compile_ms),
                       gb_per_s=fmt(gbps, 3), tflop_per_s=fmt(tflops, 3))
        row["notes"] = "; ".join(notes)
        rows.append(row)
    return rows


def _header(path: Path) -> tuple[str, ...] | None:
    """The header of a CSV with our columns (current or old), None if absent or empty; ValueError otherwise."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        header = tuple(next(csv.reader(f), []))
    if header not in (COLUMNS, OLD_COLUMNS):
        raise ValueError(f"{path} has columns {list(header)}, expected {list(COLUMNS)}; write to a new file")
    return header


def check_csv(path: str | Path) -> bool:
    """True if `path` already holds rows with our columns (current or old), False if it is absent or empty;
    ValueError if it has other columns (checked before a run, so no timing is lost to it)."""
    return _header(Path(path)) is not None


def append_csv(path: str | Path, rows: list[dict[str, str]]) -> None:
    """Append rows; write the header for a new or empty file; a file with the old columns is rewritten with
    the current ones first (values unchanged, the new columns empty); refuse a file with other columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header(path)
    if header == OLD_COLUMNS:
        old = read_csv(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(old)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if header is None:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows with every column of `COLUMNS` (those an old file lacks are empty)."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) not in (COLUMNS, OLD_COLUMNS):
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(COLUMNS)}")
        return [{c: row.get(c) or "" for c in COLUMNS} for row in reader]


def format_table(rows: list[dict[str, str]], info: RunInfo, ceil: Ceilings | None, load_s: float | None = None) -> str:
    weights = "random weights" if info.random_weights else "checkpoint weights"
    lines = [f"blip3o-engine bench: {info.device} | preset {info.preset} ({info.dtype}, {weights}) | "
             f"commit {info.commit} | {info.date}"]
    if info.host_load is not None:
        lines.append(f"host load average at start: {info.host_load:.1f} (timings of a busy host are noisy)")
    if load_s is not None:
        lines.append(f"model load: {load_s:.1f} s")
    if ceil is not None:
        lines.append(f"ceilings (measured in this run, fastest run of each): {ceil.describe()}; floor = "
                     f"max(matmul FLOPs / GEMM rate + conv FLOPs / conv rate, bytes / copy bandwidth)")
    else:
        lines.append("no measured ceiling, so the floor and x-floor columns are left empty")
    lines.append("compile/capture: no separate step exists (compile_ms empty); what a backend compiles or "
                 "captures on first use is in its first warm-up run, cold_ms in the CSV notes")
    head = ("stage", "backend", "batch", "median ms", "p10 ms", "p90 ms", "floor ms", "x floor", "x ref", "notes")
    table = [head] + [(r["stage"], r["backend"], r["batch"], r["median_ms"] or "-", r["p10_ms"] or "-",
                       r["p90_ms"] or "-", r["floor_ms"] or "-", r["ratio_to_floor"] or "-",
                       r["ratio_to_reference"] or "-", _short_notes(r)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i in (0, 1, 9) else c.rjust(widths[i]) for i, c in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if any(r["floor_ms"] for r in rows):
        lines.append(floor_check(rows))
    if any(r["stage"] in MIXED_STAGES for r in rows):
        lines += ["", *format_mixed(rows)]
    return "\n".join(lines)


def beaten_floors(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Timed rows whose median is below their floor. A floor is a lower bound by construction (the cost
    model never counts more work than runs; each ceiling is the fastest run of the fastest shape of its
    kind), so any row here means a cost model or a ceiling is wrong, not that the code is fast."""
    return [r for r in rows if r["floor_ms"] and r["median_ms"] and float(r["median_ms"]) < float(r["floor_ms"])]


def floor_check(rows: list[dict[str, str]]) -> str:
    """One line: every timed row at or above its floor (with the closest one), or the rows that beat it."""
    judged = [r for r in rows if r["floor_ms"] and r["median_ms"]]
    beaten = beaten_floors(rows)
    if beaten:
        return (f"FLOOR CHECK FAILED: {len(beaten)} of {len(judged)} rows beat their floor (a cost model or "
                f"ceiling is wrong): " + ", ".join(f"{r['stage']}/{r['backend']}/b{r['batch']} "
                                                   f"{r['ratio_to_floor']}x" for r in beaten))
    if not judged:
        return "floor check: no timed row has a floor"
    closest = min(judged, key=lambda r: float(r["median_ms"]) / float(r["floor_ms"]))
    return (f"floor check: all {len(judged)} timed rows are at or above their floor (closest: {closest['stage']}/"
            f"{closest['backend']}/b{closest['batch']} at {float(closest['median_ms']) / float(closest['floor_ms']):.3g}x)")


MIXED_STAGES = ("mixed_chat_ttft", "mixed_chat_itl", "mixed_chat_stall", "mixed_image_latency")


def _note(row: dict[str, str] | None, key: str) -> str:
    if row is None:
        return ""
    return next((n.split("=", 1)[1] for n in row["notes"].split("; ") if n.startswith(key + "=")), "")


def mixed_summary(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """`bench mixed` per policy, what issue-style reports ask for: chat TTFT and ITL p50/p99, image latency
    p50/p99, images/s and tokens/s, the worst chat stall during image work against its limit."""
    out = []
    for policy in dict.fromkeys(r["backend"] for r in rows if r["stage"] in MIXED_STAGES):
        by = {r["stage"]: r for r in rows if r["backend"] == policy and r["stage"] in MIXED_STAGES}
        ttft, itl, stall, image = (by.get(s) for s in MIXED_STAGES)

        def p50(row):
            return row["median_ms"] if row is not None and row["median_ms"] else "-"

        def p99(row):
            return _note(row, "p99_ms") or "-"

        out.append({"policy": policy, "clients": _note(ttft or image, "clients"),
                    "ttft_p50": p50(ttft), "ttft_p99": p99(ttft), "itl_p50": p50(itl), "itl_p99": p99(itl),
                    "image_p50": p50(image), "image_p99": p99(image),
                    "images_s": _note(image, "images/s") or "-", "images": _note(image, "images") or "0",
                    "tok_s": _note(itl, "tok/s") or "-", "stall": p50(stall), "limit": _note(stall, "limit_ms") or "-",
                    "makespan_s": _note(ttft or image, "makespan_s")})
    return out


def format_mixed(rows: list[dict[str, str]]) -> list[str]:
    """The `bench mixed` summary as text lines, one per policy (`mixed_summary`)."""
    head = ("policy", "TTFT p50/p99 ms", "ITL p50/p99 ms", "image p50/p99 ms", "images/s", "tok/s",
            "chat stall ms (limit)", "makespan s")
    table = [head] + [(m["policy"], f"{m['ttft_p50']}/{m['ttft_p99']}", f"{m['itl_p50']}/{m['itl_p99']}",
                       f"{m['image_p50']}/{m['image_p99']}", f"{m['images_s']} ({m['images']})", m["tok_s"],
                       f"{m['stall']} ({m['limit']})", m["makespan_s"]) for m in mixed_summary(rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["mixed workload per policy (stall limit = one decoder step + one decode step, p90 of each measured alone):"]
    for k, row in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _short_notes(row: dict[str, str]) -> str:
    """What is worth a glance in the table (skipped reason, bound, rates, tokens/s); the CSV keeps it all."""
    if row["skipped"]:
        return f"skipped: {row['skipped']}"
    keep = [n for n in row["notes"].split("; ")
            if n.startswith(("bound=", "tok/s=", "images/s=", "p99_ms=", "limit_ms=", "best="))]
    rate = achieved(row)
    return " ".join(keep + ([rate] if rate else []))


def achieved(row: dict[str, str]) -> str:
    """The achieved rate worth showing: GB/s for a memory-bound row (and the copy ceiling), TFLOP/s for a
    compute-bound one (a model stage's GB/s counts its weights only, so it is not shown for those)."""
    bound = next((n.split("=", 1)[1] for n in row["notes"].split("; ") if n.startswith("bound=")), None)
    if row["gb_per_s"] and (bound == "memory" or not row["tflop_per_s"]):
        return f"{row['gb_per_s']} GB/s"
    if row["tflop_per_s"]:
        return f"{row['tflop_per_s']} TFLOP/s"
    return ""


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

    rows = [r for r in rows if not r["stage"].startswith("ceiling_") and r["median_ms"]]  # timed rows only
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
