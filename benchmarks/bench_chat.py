#!/usr/bin/env python
"""Chat benchmark (TTFT, inter-token latency, tokens/s per batch): the same code as
`blip3o-engine bench chat`, e.g.

    python benchmarks/bench_chat.py --model 8b --device cuda --csv benchmarks/results/h100.csv
    python benchmarks/bench_chat.py --model small --threads 1 --backend optimized,reference,transformers

--batch defaults to 1,8,32,64 on CUDA and 1,16 on CPU; the transformers baseline is opt-in.
"""

import sys

from blip3o_engine.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
