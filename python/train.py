"""Train and evaluate one language model: see `python python/train.py --help` and python/README.md."""

import sys

from cem_lm.train import main

if __name__ == "__main__":
    sys.exit(main())
