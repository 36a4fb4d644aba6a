#!/usr/bin/env python
"""Chat benchmark (TTFT, inter-token latency, tokens/s per batch): the same code as
`blip3o-engine bench chat`, e.g.

    python benchmarks/bench_chat.py --model 8b --device cuda --batch 1,8 --csv benchmarks/results/h100.csv
"""

import sys

from blip3o_engine.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
