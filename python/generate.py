"""Sample text from a trained checkpoint: see `python python/generate.py --help` and python/README.md."""

import sys

from cem_lm.generate import main

if __name__ == "__main__":
    sys.exit(main())
