"""CLI: `python -m training.stage1 --manifest cohort/manifest.csv --out work/stage1` (see `run.main`)."""

import sys

from training.stage1.run import main

if __name__ == "__main__":
    sys.exit(main())
