"""Train-biencoder job entrypoint: ``python -m jobs.train_biencoder --config FILE [--force]``.

Fine-tunes the bi-encoder on the configured training judgments (in-batch and hard negatives mined
from passages) and saves a sentence-transformers folder; runs on the machine it lands on (under
``ray job submit``, the head node unless ``--entrypoint-num-gpus`` places it). To use the model,
set ``embed.model`` to that folder and index into a new table.
"""

import sys

from pipelines.runs import job_main

if __name__ == "__main__":
    sys.exit(job_main("train-biencoder"))
