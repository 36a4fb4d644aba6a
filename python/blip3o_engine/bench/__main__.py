"""`python -m blip3o_engine.bench MODE ...`: the `bench` command without the main CLI."""

import sys

from .cli import main

sys.exit(main())
