"""Table upkeep after a commit: compaction, indexes brought up to date, run tags expired, old versions cleaned up.

Reads top to bottom::

    upkeep(name)           → compact → ensure_indexes (passages) → retag the run → expire_tags → cleanup
    compact(table)         → merge small data files once a table has more than ``maintenance.max_fragments``
    expire_tags(table)     → drop batchrank's own run tags and read leases once they are old
    cleanup(table)         → delete old versions, except the latest and every tagged one
    ensure_indexes(cfg)    → ANN (built, extended, or retrained), id B-tree and full-text indexes of passages
    optimize(name)         → a small table's own compaction and cleanup (the scheduler's runs table)

``Store`` exposes these as its methods (``store.upkeep(...)``, ``Store.expire_tags(...)``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines import schema as S
from pipelines.store.names import LEASE_PREFIX, run_tag_time
from pipelines.store.search import ann_config

ANN_MERGED = "batchrank.ann_rows_merged"  # table config: rows added to the ANN index since it was trained


def upkeep(store, name: str, *, maint, index_cfg=None, tag: str | None = None,
           now: datetime | None = None, build_ann=None, here: str = "driver") -> dict[str, Any]:
    """After a commit: compact small files, bring indexes up to date (passages: ``index_cfg``; ``build_ann``: where
    an ANN training runs, see ``ensure_indexes``; ``here``: this process, as reports name it), move the run's
    ``tag`` to the result (the same data, indexes current: what readers get), drop expired run tags and leases,
    clean up old versions. Returns what was done."""
    table = store.open(name)
    if table is None:
        return {}
    done: dict[str, Any] = {"compaction": compact(table, maint.max_fragments)}
    if index_cfg is not None:
        done["indexes"] = store.ensure_indexes(index_cfg, build_ann=build_ann, here=here)
        table = store.open(name)  # at the version the index updates made: cleanup keeps the latest
        if done["indexes"].get("ann", {}).get("built"):  # compaction keeps apart fragments of different index
            done["compaction_after_training"] = compact(table, maint.max_fragments)  # segments: one now
    if tag is not None:
        store.retag(name, tag)
    done["tags_expired"] = expire_tags(table, maint, now)
    done["cleanup"] = cleanup(table, maint.version_retention_days)
    return done


def compact(table, max_fragments: int) -> dict[str, Any]:
    """Merge small data files once a table has more than ``max_fragments`` of them (each commit adds some)."""
    before = table.stats()["fragment_stats"]["num_fragments"]
    if before <= max_fragments:
        return {"compacted": False, "fragments": before}
    metrics = table.compact_files()
    return {"compacted": True, "fragments_before": before,
            "fragments": table.stats()["fragment_stats"]["num_fragments"],
            "files_removed": getattr(metrics, "files_removed", None)}


def expire_tags(table, maint, now: datetime | None = None) -> list[str]:
    """Drop batchrank's own run tags older than ``run_tag_retention_days`` and read leases older than
    ``lease_hours`` (a killed run's). Tags that do not look like a batchrank run id are never touched."""
    now = now or datetime.now(UTC)
    dropped = []
    for tag in sorted(table.tags.list()):
        made = run_tag_time(tag)
        if made is None:
            continue
        age_h = (now - made).total_seconds() / 3600
        limit = maint.lease_hours if tag.startswith(LEASE_PREFIX) else (
            None if maint.run_tag_retention_days is None else maint.run_tag_retention_days * 24)
        if limit is not None and age_h > limit:
            table.tags.delete(tag)
            dropped.append(tag)
    return dropped


def cleanup(table, retention_days: float) -> dict[str, Any]:
    """Delete versions older than ``retention_days``, except the latest and every tagged one (run tags,
    leases of runs in progress, your own tags)."""
    stats = table.to_lance().cleanup_old_versions(older_than=timedelta(days=retention_days),
                                                  error_if_tagged_old_versions=False)
    return {"versions_removed": stats.old_versions, "bytes_removed": stats.bytes_removed}


def optimize(store, name: str, *, cleanup_older_than: timedelta) -> None:
    """LanceDB's own upkeep of table ``name`` (compaction, index updates, versions older than
    ``cleanup_older_than`` removed), for small tables written often; nothing when the table does not exist."""
    table = store.open(name)
    if table is not None:
        table.optimize(cleanup_older_than=cleanup_older_than)


def ensure_indexes(store, index_cfg, build_ann=None, here: str = "driver") -> dict[str, Any]:
    """Bring passages' indexes up to date, the cheap way when possible.

    ANN: built once the table reaches ``ann.min_rows``; after that, new and changed rows are added to the
    trained index (its partitions stay) as a segment of their own, until ``ann.max_segments`` segments or the rows added or changed since training pass
    ``ann.retrain_fraction`` of the table: then it is trained again, on at most num_partitions x
    ``ann.sample_rate`` sampled vectors. A training runs in ``build_ann(config)`` when given (the index job's Ray
    task on a worker, ``pipelines/index/table_work.py``), else here. Full-text and id indexes take new rows
    incrementally. Returns what was done."""
    table = store.passages()
    n = table.count_rows()
    existing = {ix.name: ix for ix in table.list_indices()}
    done: dict[str, Any] = {"rows": n}
    ann = index_cfg.ann
    kind = ann.type if ann.type != "auto" else "ivf_hnsw_sq"
    vec_ix = existing.get(f"{S.VECTOR}_idx")
    increments: list[str] = []
    if ann.type == "none" or n < max(ann.min_rows, 256):
        why = ("index.ann.type=none" if ann.type == "none"
               else f"{n} rows < {max(ann.min_rows, 256)} (index.ann.min_rows, and an index needs 256 rows)")
        done["ann"] = {"type": "exact", "reason": why}
        if vec_ix is not None:
            table.drop_index(vec_ix.name)
    else:
        stats = table.index_stats(vec_ix.name) if vec_ix is not None else None
        merged = int(table.to_lance().config().get(ANN_MERGED, 0)) if stats is not None else 0
        changed = merged + (stats.num_unindexed_rows if stats is not None else n)
        if stats is None or not same_index(stats, kind, index_cfg.metric) \
                or changed > ann.retrain_fraction * n \
                or (stats.num_unindexed_rows and stats.num_indices >= ann.max_segments):
            reason = ("no index yet" if stats is None else
                      "index type or metric changed" if not same_index(stats, kind, index_cfg.metric) else
                      f"{changed:,} of {n:,} rows added or changed since training > ann.retrain_fraction "
                      f"{ann.retrain_fraction}" if changed > ann.retrain_fraction * n else
                      f"{stats.num_indices} segments = ann.max_segments {ann.max_segments}")
            config, params = ann_config(kind, index_cfg.metric, ann, n, table.schema.field(S.VECTOR).type.list_size)
            if build_ann is None:
                where = {"built_on": here, "accelerator": "cpu", "build_seconds": train_ann(table, config)}
            else:
                where = build_ann(config)
                table.checkout_latest()
            table.to_lance().update_config({ANN_MERGED: "0"})
            done["ann"] = {"type": kind, "built": True, "reason": reason, **params, **where}
        elif stats.num_unindexed_rows:
            # the new rows as a segment of their own: 0.15 s for 1,000 rows added to 100k, where merging them into
            # the graph took 35 s (and merging segments 44 s: more than training anew, which max_segments does)
            table.to_lance().optimize.optimize_indices(index_names=[vec_ix.name], num_indices_to_merge=0)
            table.checkout_latest()
            done["ann"] = {"type": kind, "built": False, "rows_added_to_index": stats.num_unindexed_rows,
                           "changed_since_training": changed, "segments": stats.num_indices + 1}
            table.to_lance().update_config({ANN_MERGED: str(changed)})
        else:
            done["ann"] = {"type": kind, "built": False, "reason": "up to date"}
    for key in (S.ID, S.PASSAGE_ID):  # lookups join passages by id; commits merge by passage id
        if key not in table.schema.names:
            continue
        key_ix = existing.get(f"{key}_idx")
        if key_ix is None:
            from lancedb.index import BTree

            table.create_index(key, config=BTree(), replace=True)
        elif unindexed(table, key_ix.name):
            increments.append(key_ix.name)
    if index_cfg.fts.enabled:
        from lancedb.index import FTS

        done["fts"] = {}
        for col in index_cfg.fts.columns:  # one BM25 index per field; queries match them all
            fts_ix = existing.get(f"{col}_idx")
            if fts_ix is None:
                table.create_index(col, config=FTS(), replace=True)
                done["fts"][col] = {"built": True}
            elif unindexed(table, fts_ix.name):
                increments.append(fts_ix.name)
                done["fts"][col] = {"built": False, "rows_added_to_index": True}
            else:
                done["fts"][col] = {"built": False, "reason": "up to date"}
    if increments:  # one pass adds the new rows to every stale index
        table.to_lance().optimize.optimize_indices(index_names=increments)
        table.checkout_latest()
    done["version"] = table.version
    return done


def train_ann(table, config) -> float:
    """Train and write the vector index of ``table`` (replacing any); its seconds. Where it runs is the caller's
    choice: the upkeep's own process, or a Ray task on a worker (``pipelines/index/table_work.py``)."""
    started = time.monotonic()
    table.create_index(S.VECTOR, config=config, replace=True)
    return round(time.monotonic() - started, 3)


def same_index(stats, kind: str, metric: str) -> bool:
    same_kind = stats.index_type.replace("_", "").lower() == kind.replace("_", "").lower()
    return same_kind and str(stats.distance_type).lower() == metric


def unindexed(table, index_name: str) -> bool:
    stats = table.index_stats(index_name)
    return stats is None or stats.num_unindexed_rows > 0
