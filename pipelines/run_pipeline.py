#!/usr/bin/env python
"""Pipelines as a script: `python pipelines/run_pipeline.py run|submit|status|templates ...`.

The same as `biomask pipeline ...`; the logic lives in biomask.pipelines. Examples:

    python pipelines/run_pipeline.py run configs/pipelines/dna-prep.yaml [--only STAGE | --from STAGE]
    python pipelines/run_pipeline.py submit configs/pipelines/dna-prep.yaml [--dry-run]
    python pipelines/run_pipeline.py status runs/pipelines/dna-prep
"""

import sys

from biomask.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pipeline", *sys.argv[1:]]))
