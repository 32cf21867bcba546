"""Train-reranker job entrypoint: ``python -m jobs.train_reranker --config FILE [--force]``.

Fine-tunes a cross-encoder on the configured training judgments (hard negatives mined from
passages) and saves a sentence-transformers CrossEncoder folder; runs on the machine it lands
on (under ``ray job submit``, the head node unless ``--entrypoint-num-gpus`` places it).
"""

import sys

from pipelines.runs import job_main

if __name__ == "__main__":
    sys.exit(job_main("train-reranker"))
