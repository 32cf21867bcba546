"""Rerank job entrypoint: ``python -m jobs.rerank --config FILE``.

Reads the query log, retrieves candidates from passages, scores them with the cross-encoder and
publishes a new rankings version. Locally it starts Ray; under ``ray job submit --working-dir .
-- python -m jobs.rerank --config FILE`` it joins the cluster.
"""

import sys

from pipelines.runs import job_main

if __name__ == "__main__":
    sys.exit(job_main("rerank"))
