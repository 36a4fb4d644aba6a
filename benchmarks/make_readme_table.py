#!/usr/bin/env python
"""Make the README's performance section (markdown) from benchmark CSVs.

    python benchmarks/make_readme_table.py                      # print it (all benchmarks/results/*.csv)
    python benchmarks/make_readme_table.py --write README.md    # replace the block between the markers
    python benchmarks/make_readme_table.py --csv run.csv --brief  # a compact table (gpu_check.sh's last output)

One table per run (device x preset x commit x date); by default a run is left out when a newer run
on the same kind of device (CPU, or one GPU model) and preset timed all of its (stage, backend, batch)
rows, `--all-runs` shows every run. Each table's heading states the device, date, commit and dtype that every number in it comes
from, and the ceilings measured in that run (copy; GEMM and convolution, each the best of its shapes).
Rows a run did not time (kernel rows on a CPU) are one line per reason under the table. Only rows
that a real run wrote exist in these files (benchmarks/results/README.md): nothing here is estimated.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from blip3o_engine.bench.report import MIXED_STAGES, achieved, floor_check, mixed_summary, read_csv
from blip3o_engine.bench.stages import STAGE_NAMES

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
RESULTS = Path(__file__).resolve().parent / "results"


def _notes(row: dict[str, str]) -> dict[str, str]:
    out = {}
    for item in row["notes"].split("; "):
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


KNOWN_STAGES = {name for names in STAGE_NAMES.values() for name in names}


def _timed(group: list[dict[str, str]]) -> frozenset[tuple[str, str, str]]:
    """What a run timed: its (stage, backend, batch) rows (a chat run and a t2i run of one preset, or chat
    runs at different batch sizes, are all shown). Stages the harness no longer has (`rmsnorm`, retired for
    the kernel rows) do not keep an old run in the README."""
    return frozenset((r["stage"], r["backend"], r["batch"]) for r in group
                     if r["stage"] in KNOWN_STAGES and not r["skipped"])


def _kind(device: str) -> str:
    """CPU or the GPU's name: a newer CPU run replaces an older one on another development CPU."""
    return "CPU" if device.startswith("CPU") else device


def runs(rows: list[dict[str, str]], all_runs: bool) -> list[list[dict[str, str]]]:
    """Rows grouped by run, newest first; unless all_runs, a run is left out when a newer run on the same
    kind of device (a CPU, or one GPU model) and preset timed all of its (stage, backend, batch) rows."""
    groups: dict[tuple[str, str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["preset"], r["commit"], r["date"])].append(r)
    ordered = sorted(groups.items(), key=lambda kv: kv[0][3], reverse=True)
    seen, out = set(), []
    for (device, preset, _, _), group in ordered:
        timed = _timed(group)
        # Superseded: a newer run on this kind of device and preset timed every stage this one did.
        if not all_runs and any(d == _kind(device) and p == preset and timed <= t for d, p, t in seen):
            continue
        seen.add((_kind(device), preset, timed))
        out.append(group)
    return out


def _ceilings(group: list[dict[str, str]]) -> str:
    notes = {r["stage"]: _notes(r) for r in group if r["stage"].startswith("ceiling_")}
    if not notes:
        return "no measured ceiling in this run, so the floor columns are empty"
    copy, gemm, conv = (notes.get(f"ceiling_{k}", {}) for k in ("copy", "matmul", "conv"))
    text = (f"ceilings measured in the same run (fastest run of each): copy {copy.get('GB/s', '?')} GB/s "
            f"(read+write), {gemm.get('dtype', '?')} GEMM {gemm.get('TFLOP/s', '?')} TFLOP/s")
    if "best" in gemm:  # runs before the best-of-shapes ceilings measured one square GEMM
        text += f" (best of {len(gemm.get('shapes', '').split(','))} shapes: {gemm['best']})"
    if conv:
        text += (f", 3x3 conv {conv.get('TFLOP/s', '?')} TFLOP/s (best of {len(conv.get('shapes', '').split(','))} "
                 f"shapes: {conv.get('best', '?')})")
    return text


def _heading(group: list[dict[str, str]]) -> str:
    r = group[0]
    dtype = _notes(r).get("dtype", "?")
    return f"**{r['device']}**, preset `{r['preset']}` ({dtype}), commit `{r['commit']}`, {r['date']}"


def _skipped(rows: list[dict[str, str]]) -> list[str]:
    """One line per reason for the rows a run did not time (kernel rows on a CPU), instead of a table row each."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["skipped"] and r["stage"] not in by_reason[r["skipped"]]:
            by_reason[r["skipped"]].append(r["stage"])
    return [f"Not timed ({reason}): {', '.join(f'`{s}`' for s in stages)}.\n" for reason, stages in by_reason.items()]


def mixed_table(group: list[dict[str, str]]) -> list[str]:
    """A `bench mixed` run: one row per policy (the step loop against the serial baseline)."""
    summary = mixed_summary(group)
    first = next(r for r in group if r["stage"] in MIXED_STAGES)
    n = _notes(first)
    lines = [f"{_heading(group)} — `bench mixed`: {n.get('clients', '?')} clients, Poisson arrivals for "
             f"{n.get('duration_s', '?')} s (then the drain), one engine per policy", "",
             "| policy | chat TTFT p50 / p99 ms | chat ITL p50 / p99 ms | image latency p50 / p99 ms | images/s "
             "(images) | tok/s | worst chat stall during image work ms (limit) | makespan s |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {m['policy']} | {m['ttft_p50']} / {m['ttft_p99']} | {m['itl_p50']} / {m['itl_p99']} | "
              f"{m['image_p50']} / {m['image_p99']} | {m['images_s']} ({m['images']}) | {m['tok_s']} | "
              f"{m['stall']} ({m['limit']}) | {m['makespan_s']} |" for m in summary]
    lines.append("")  # the footnotes below are a paragraph of their own, not table rows
    stall = next((r for r in group if r["stage"] == "mixed_chat_stall" and r["median_ms"]), None)
    if stall is not None:
        s = _notes(stall)
        lines += [f"Step pieces measured alone before the runs (ms): decoder step {s.get('decoder_step_ms', '?')}, "
                      f"decode step {s.get('decode_step_ms', '?')}, DiT chunk {s.get('dit_chunk_ms', '?')}, "
                      f"VAE {s.get('vae_ms', '?')}; limit = p90 decoder step + p90 decode step "
                      f"(the medians' sum: {s.get('limit_median_ms', '?')})."]
    image = next((r for r in group if r["stage"] == "mixed_image_latency" and r["median_ms"]), None)
    if image is not None and "decoder_ms_per_image" in _notes(image):
        lines += [f"Decoder step per image: {_notes(image)['decoder_ms_per_image']} ms."]
    step_loop = next((r for r in group if r["stage"] == "mixed_chat_stall" and r["backend"] == "interleave"
                      and r["median_ms"]), None)
    if step_loop is not None and _notes(step_loop).get("worst_gap"):
        s = _notes(step_loop)
        lines += [f"interleave's worst chat gap: {s['worst_gap']}; within the limit: {s.get('within_limit', '?')}; "
                  f"image units in any chat gap: at most {s.get('max_units_per_gap', '?')}; its steps of LLM + "
                  f"decoder as they ran: {s.get('decoder_steps_in_run_ms', '?')}."]
    return lines


def table(group: list[dict[str, str]], brief: bool = False) -> list[str]:
    if all(r["stage"] in MIXED_STAGES for r in group) and not brief:
        return mixed_table(group)
    rows = [r for r in group if not r["stage"].startswith("ceiling_")]
    skipped, rows = _skipped(rows), [r for r in rows if not r["skipped"]]
    lines = [_heading(group) + " — " + _ceilings(group), ""]
    if brief:
        lines += ["| stage | backend | batch | median ms | × floor | × ref | rate |", "|---|---|--:|--:|--:|--:|--:|"]
        lines += [f"| {r['stage']} | {r['backend']} | {r['batch']} | {r['median_ms']} | "
                  f"{r['ratio_to_floor'] or '–'} | {r['ratio_to_reference'] or '–'} | {achieved(r) or '–'} |"
                  for r in rows]
        return lines + ([""] + skipped if skipped else [])
    if rows:
        lines += ["| stage | backend | batch | median ms | p10–p90 ms | floor ms | × floor | × reference | notes |",
                  "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        n = _notes(r)
        extra = [f"{k} {n[k]}" for k in ("bound", "tok/s", "images/s", "p99_ms", "limit_ms", "within_limit", "steps",
                                          "tokens", "axes") if k in n]
        if achieved(r):
            extra.append(achieved(r))
        if r.get("compile_ms") and r["stage"].startswith("export_"):  # bench export: the graph's export time
            extra.append(f"export {float(r['compile_ms']) / 1e3:.3g} s")
        lines.append(f"| {r['stage']} | {r['backend']} | {r['batch']} | {r['median_ms']} | "
                     f"{r['p10_ms']}–{r['p90_ms']} | {r['floor_ms'] or '–'} | {r['ratio_to_floor'] or '–'} | "
                     f"{r['ratio_to_reference'] or '–'} | {', '.join(extra)} |")
    if any(r["floor_ms"] and r["median_ms"] for r in rows):
        skipped = [floor_check(rows).replace("floor check:", "Floor check:") + ".\n", *skipped]
    return lines + ([""] + skipped if skipped else [])


def _shown(path: Path) -> str:
    """A CSV's path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return path.name


def render(csvs: list[Path], all_runs: bool = False, brief: bool = False) -> str:
    rows = [r for path in csvs for r in read_csv(path)]
    if not rows:
        return "No benchmark results yet.\n"
    out = [] if brief else [
        f"Generated by `benchmarks/make_readme_table.py` from {', '.join(f'`{_shown(p)}`' for p in csvs)}. "
        "Each table is one "
        "run; its heading gives the device, commit, date and dtype of every number in it. Medians over "
        "repeated runs after warm-up; floor = max(matmul FLOPs / GEMM ceiling + convolution FLOPs / convolution "
        "ceiling, bytes / copy bandwidth), with counts from the model config (`blip3o_engine/bench/costs.py`) "
        "and ceilings measured in the same run (runs before the per-kind ceilings used one square GEMM for all "
        "FLOPs). × reference divides by the reference backend, a kernel's torch twin, or the serial policy. "
        "Presets `4b`/`8b` are the real shapes with random weights.", ""]
    for group in runs(rows, all_runs):
        out += table(group, brief) + [""]
    return "\n".join(out)


def write_block(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise SystemExit(f"error: {readme} has no '{START}' ... '{END}' block to replace; add the markers first")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block.rstrip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", action="append", type=Path, help="CSV file(s) (default: benchmarks/results/*.csv)")
    p.add_argument("--write", type=Path, default=None, help="README to update between the perf markers")
    p.add_argument("--all-runs", action="store_true", help="every run, not only the latest per device and preset")
    p.add_argument("--brief", action="store_true", help="compact columns (stage, median, ratios)")
    args = p.parse_args(argv)
    csvs = args.csv or sorted(RESULTS.glob("*.csv"))
    block = render(csvs, args.all_runs, args.brief)
    if args.write:
        write_block(args.write, block)
        print(f"updated {args.write}", file=sys.stderr)
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
