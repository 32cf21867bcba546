"""Eval job entrypoint: ``python -m jobs.eval --config FILE``.

Runs a BEIR collection's judged queries through every candidate source and rerank depth and writes
eval.json, eval.md and eval.png to ``eval.output``. Locally it starts Ray only if passages must be
(re)indexed; under ``ray job submit --working-dir . -- python -m jobs.eval --config FILE`` it joins the
cluster, and encodes and scores on the driver's device (a GPU when the driver has one).
"""

import sys

from pipelines.runs import job_main

if __name__ == "__main__":
    sys.exit(job_main("eval"))
