"""Run the CEM vs Llama comparison grid: see `python python/run_experiments.py --help` and python/README.md."""

import sys

from cem_lm.experiments import main

if __name__ == "__main__":
    sys.exit(main())
