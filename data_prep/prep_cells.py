#!/usr/bin/env python
"""Single-cell prep as a script: `python data_prep/prep_cells.py --config configs/cells/pbmc3k.yaml [key=value ...]`.

The same as `biomask prep cells ...`; the logic lives in biomask.cells.prep.
"""

import sys

from biomask.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prep", "cells", *sys.argv[1:]]))
