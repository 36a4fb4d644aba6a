"""Benchmark harness: per-stage timings of the engine, each against a floor computed from the model
config (`costs`) and ceilings measured in the same run (`ceilings`).

Entry points: `blip3o_engine.bench.cli.add_bench_parser` / `run_bench` (the `bench` command) and
`python -m blip3o_engine.bench`. Modules import torch and the engine lazily through these.
"""
