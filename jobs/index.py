"""Index job entrypoint: ``python -m jobs.index --config FILE``.

Locally it starts Ray on this machine; under ``ray job submit --working-dir . -- python -m jobs.index
--config FILE`` it joins the cluster (``RAY_ADDRESS`` is set by Ray Jobs).
"""

import sys

from pipelines.runs import job_main

if __name__ == "__main__":
    sys.exit(job_main("index"))
