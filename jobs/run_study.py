"""Entry point for ``ray job submit``: run one study spec and print its comparison table.

    ray job submit --working-dir . -- python jobs/run_study.py jobs/studies/<name>.toml

Connects to the cluster the job runs on (``ray.init()`` with no address), validates the spec
before any actor starts, writes the Parquet store, prints the comparison table (Monte Carlo
E[M] vs exact vs full-batch prediction per config and probe) and the store's path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisemem.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
