#!/usr/bin/env python
"""Make the README's performance section (markdown) from benchmark CSVs.

    python benchmarks/make_readme_table.py                      # print it (all benchmarks/results/*.csv)
    python benchmarks/make_readme_table.py --write README.md    # replace the block between the markers
    python benchmarks/make_readme_table.py --csv run.csv --brief  # a compact table (gpu_check.sh's last output)

One table per run (device x preset x commit x date); by default a run is left out when a newer run
on the same device and preset timed all of its (stage, backend, batch) rows, `--all-runs` shows every run. Each table's heading states the device, date, commit and
dtype that every number in it comes from, and the ceilings measured in that run. Only rows that a
real run wrote exist in these files (benchmarks/results/README.md): nothing here is estimated.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from blip3o_engine.bench.report import read_csv

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
RESULTS = Path(__file__).resolve().parent / "results"


def _notes(row: dict[str, str]) -> dict[str, str]:
    out = {}
    for item in row["notes"].split("; "):
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


def _timed(group: list[dict[str, str]]) -> frozenset[tuple[str, str, str]]:
    """What a run timed: its (stage, backend, batch) rows (a chat run and a t2i run of one preset, or chat
    runs at different batch sizes, are all shown)."""
    return frozenset((r["stage"], r["backend"], r["batch"]) for r in group if not r["stage"].startswith("ceiling_"))


def runs(rows: list[dict[str, str]], all_runs: bool) -> list[list[dict[str, str]]]:
    """Rows grouped by run, newest first; unless all_runs, a run is left out when a newer run on the same
    device and preset timed all of its (stage, backend, batch) rows."""
    groups: dict[tuple[str, str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["preset"], r["commit"], r["date"])].append(r)
    ordered = sorted(groups.items(), key=lambda kv: kv[0][3], reverse=True)
    seen, out = set(), []
    for (device, preset, _, _), group in ordered:
        timed = _timed(group)
        # Superseded: a newer run on this device and preset timed every stage this one did.
        if not all_runs and any(d == device and p == preset and timed <= t for d, p, t in seen):
            continue
        seen.add((device, preset, timed))
        out.append(group)
    return out


def _ceilings(group: list[dict[str, str]]) -> str:
    notes = {r["stage"]: _notes(r) for r in group if r["stage"].startswith("ceiling_")}
    if not notes:
        return "no measured ceiling in this run, so the floor columns are empty"
    copy, gemm = notes.get("ceiling_copy", {}), notes.get("ceiling_matmul", {})
    return (f"ceilings measured in the same run: copy {copy.get('GB/s', '?')} GB/s (read+write), "
            f"{gemm.get('dtype', '?')} GEMM {gemm.get('TFLOP/s', '?')} TFLOP/s")


def _heading(group: list[dict[str, str]]) -> str:
    r = group[0]
    dtype = _notes(r).get("dtype", "?")
    return f"**{r['device']}**, preset `{r['preset']}` ({dtype}), commit `{r['commit']}`, {r['date']}"


def table(group: list[dict[str, str]], brief: bool = False) -> list[str]:
    rows = [r for r in group if not r["stage"].startswith("ceiling_")]
    lines = [_heading(group) + " — " + _ceilings(group), ""]
    if brief:
        lines += ["| stage | backend | batch | median ms | × floor | × ref |", "|---|---|--:|--:|--:|--:|"]
        lines += [f"| {r['stage']} | {r['backend']} | {r['batch']} | {r['median_ms']} | "
                  f"{r['ratio_to_floor'] or '–'} | {r['ratio_to_reference'] or '–'} |" for r in rows]
        return lines
    lines += ["| stage | backend | batch | median ms | p10–p90 ms | floor ms | × floor | × reference | notes |",
              "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        n = _notes(r)
        extra = ", ".join(f"{k} {n[k]}" for k in ("bound", "tok/s", "images/s", "steps", "tokens", "axes") if k in n)
        if r.get("compile_ms") and r["stage"].startswith("export_"):  # bench export: the graph's export time
            extra += f", export {float(r['compile_ms']) / 1e3:.3g} s"
        lines.append(f"| {r['stage']} | {r['backend']} | {r['batch']} | {r['median_ms']} | "
                     f"{r['p10_ms']}–{r['p90_ms']} | {r['floor_ms'] or '–'} | {r['ratio_to_floor'] or '–'} | "
                     f"{r['ratio_to_reference'] or '–'} | {extra} |")
    return lines


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
        "repeated runs after warm-up; floor = max(FLOPs / measured GEMM rate, weight bytes / measured copy "
        "bandwidth), with counts from the model config (`blip3o_engine/bench/costs.py`). Presets `4b`/`8b` "
        "are the real shapes with random weights.", ""]
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
