"""Storage: the only package that imports LanceDB. Every other module reaches the tables through ``Store``.

Writes are staged, then committed once: embedded batches are appended to a private
staging table as they arrive (durable, invisible to readers), and the run publishes them
to ``passages`` in a single ``merge_insert`` on ``id`` (one new table version, tagged with
the run id). A crash before that commit leaves the previous version untouched; a rerun
upserts, so it never duplicates rows, and rows whose content hash did not change are
left as they were.

Reads by concern::

    names.py     StoreError, sql_strings (the one quoting of values in filters), run tags and leases
    core.py      Store: connection, open / scan / rows_by_id, upsert / delete_where, quarantine, tags, leases
    staging.py   StagedTable, stage → commit_passages / commit_rankings, dead staging tables
    upkeep.py    after a commit: compaction, indexes, tag expiry, version cleanup
    search.py    vector, full-text and batched search; distance_to_score; the ANN index config

Column names and table schemas live in ``pipelines/schema.py``.

Example::

    store = Store(cfg.storage)
    hits = store.search(vector, k=10)
"""

from __future__ import annotations

import os

from pipelines.store.core import Store, Upserted
from pipelines.store.names import LEASE_PREFIX, StoreError, run_tag_time, sql_strings
from pipelines.store.search import ann_config, dataset, distance_to_score, has_vector_index
from pipelines.store.staging import StagedTable

# Before lance loads (inside the store's functions, never at import): it logs "no existing dataset" at WARN on
# every create.
for _var in ("LANCE_LOG", "LANCEDB_LOG"):
    os.environ.setdefault(_var, "error")

_ann_config = ann_config  # the name benchmarks/retrieval_crossover.py imports

__all__ = ["LEASE_PREFIX", "StagedTable", "Store", "StoreError", "Upserted", "ann_config", "dataset",
           "distance_to_score", "has_vector_index", "run_tag_time", "sql_strings"]
