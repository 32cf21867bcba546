"""Index job entrypoint: ``python -m jobs.index --config FILE``.

Locally it starts Ray on this machine; under ``ray job submit --working-dir . -- python -m jobs.index
--config FILE`` it joins the cluster (``RAY_ADDRESS`` is set by Ray Jobs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", required=True, type=Path, help="YAML config of the index job")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    from pipelines.cli import run_index

    return run_index(args.config, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
