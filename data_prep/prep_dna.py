#!/usr/bin/env python
"""DNA prep as a script: `python data_prep/prep_dna.py --config configs/dna/splice.yaml [key=value ...]`.

The same as `biomask prep dna ...`; the logic lives in biomask.dna.prep.
"""

import sys

from biomask.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prep", "dna", *sys.argv[1:]]))
