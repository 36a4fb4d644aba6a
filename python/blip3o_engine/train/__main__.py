"""`python -m blip3o_engine.train ...` = `blip3o-engine train-demo ...`."""

import sys

from ..cli import main

sys.exit(main(["train-demo", *sys.argv[1:]]))
