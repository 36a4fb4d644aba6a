#!/usr/bin/env python
"""Text-to-image benchmark (AR prefill, DiT loop, decoder loop, end to end): the same code as
`blip3o-engine bench t2i`, e.g.

    python benchmarks/bench_t2i.py --model 8b --device cuda --steps 50 --plot t2i.png
"""

import sys

from blip3o_engine.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["t2i", *sys.argv[1:]]))
