"""Pair-score cache: cross-encoder scores of (query, document text) pairs, reused by later rerank runs.

Most of a night's pairs were scored the night before: the same frequent queries, the same documents.
The ``pair_scores`` table keeps each score under a key that covers everything the score depends on:

    pair_key = blake2b-128(cross-encoder id, normalised query, text the cross-encoder reads)

so a document whose text changed, a retrained or different cross-encoder, another ``max_length`` or
precision simply misses; nothing is ever invalidated by hand. Scores are float32 on both paths, so
a ranking made from cached scores is the ranking the model would have made.

* ``cross_encoder_id``: the identity of the scoring function (folder contents, not its path).
* ``PairCache``: the read side, opened inside each Scorer actor at the version read at run start.
* ``write``: the driver adds newly scored pairs (``Store.upsert`` on ``pair_key``, first write wins, index kept
  current).
* ``evict``: table upkeep drops entries older than ``maintenance.pair_cache_days``.

Example::

    ce_id = cross_encoder_id("models/reranker", 256)
    cache = PairCache.open(cfg.storage, version)
    known = cache.lookup([pair_key(ce_id, "vitamin d", "Vitamin D and bone density ...")])
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S

# pair_scores columns and schema: pipelines/schema.py (named here too, for the Scorer and tests)
PAIR_KEY, DOC_ID, DOC_HASH, SCORE, SCORED_AT = S.PAIR_KEY, S.DOC_ID, S.DOC_HASH, S.SCORE, S.SCORED_AT

# in flight, Scorer → rerank sink (never stored in rankings): per query, the pairs the model scored in this call
NEW_KEYS = "_new_pair_keys"
NEW_DOC_IDS = "_new_doc_ids"
NEW_DOC_HASHES = "_new_doc_hashes"
NEW_SCORES = "_new_scores"
SCORED_AS = "_scored_as"  # the cross-encoder id the scorer keyed its pairs with (its precision, where it ran)
PAIRS_SCORED = "_pairs_scored"  # pairs of the query that the model scored in this call
PAIRS_CACHED = "_pairs_cached"  # the others: from the cache, or shared with an identical pair of the same call

LOOKUP_CHUNK = 2000  # keys per `IN (...)` filter: 400 keys cost ~11 ms, 2,000 ~23 ms on a 200k-row table
_WEIGHTS = (".safetensors", ".bin")
_DEFINITION = ("config.json", "config_sentence_transformers.json", "sentence_bert_config.json", "modules.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
               "merges.txt", "sentencepiece.bpe.model", "spiece.model")
_STACK = ("torch", "transformers", "sentence-transformers")


def _digest(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).hexdigest()


def doc_hash(text: str) -> str:
    """32-hex digest of the text the cross-encoder reads for a document (stored with each cached score)."""
    return _digest(text)


def pair_key(ce_id: str, query: str, doc_text: str) -> str:
    """The cache key of one pair: 32 hex over the cross-encoder id, the normalised query and the document text."""
    return _digest(f"{ce_id}\x1f{query}\x1f{doc_text}")


def cross_encoder_id(model: str, max_length: int | None, *, precision: str = "") -> str:
    """``<name>@<16 hex>``: equal ids score equal pairs equally, so their cached scores can stand in for the model.

    A local folder (or a packaged model) is identified by the contents of its weight files (``*.safetensors``,
    ``*.bin``) and the files that define the model and its tokenizer (``config.json``, ``tokenizer.json``, ...),
    not by its path: ``batchrank train-reranker`` retrains into the same folder, and a job submitted to Ray sees
    its folder under a new temporary path each time (the name is the folder's last part). A hub name counts with the
    commit of its snapshot when the local hub cache holds one (an unpinned name that the hub updates is not
    noticed otherwise: use a folder to be sure). Both include ``max_length`` (truncation changes scores),
    ``precision`` (the actors' device and dtype, e.g. ``cpu/auto``) and the versions of torch, transformers and
    sentence-transformers (an upgrade may move the last bits of a score; the cache then starts over).
    """
    from importlib.metadata import PackageNotFoundError, version

    from pipelines.models import resolve_model

    h = hashlib.blake2b(digest_size=8)
    h.update(f"max_length={max_length}\x1fprecision={precision}\x1f".encode())
    for package in _STACK:
        try:
            h.update(f"{package}={version(package)}\x1f".encode())
        except PackageNotFoundError:
            h.update(f"{package}=none\x1f".encode())
    path = resolve_model(model)
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir()
                       if p.is_file() and (p.suffix in _WEIGHTS or p.name in _DEFINITION))
        if not any(p.suffix in _WEIGHTS for p in files):
            raise ValueError(f"rerank.model folder {path!r} holds no weights (*.safetensors or *.bin); point it at a "
                             "saved sentence-transformers CrossEncoder")
        for p in files:
            h.update(f"{p.name}\x1f".encode())
            with p.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    else:
        h.update(f"hub={model}\x1f".encode())
        try:
            from huggingface_hub import snapshot_download

            commit = Path(snapshot_download(model, local_files_only=True)).name
        except Exception:  # noqa: BLE001 - not in the local hub cache (or no hub client): the name alone
            commit = "unknown"
        h.update(f"commit={commit}".encode())
    name = Path(model).name if os.path.isdir(model) else model
    return f"{name}@{h.hexdigest()}"


class PairCache:
    """Read side, used inside the Scorer actors: the scores of known pairs, from the table as it was at run start.

    Pinned to one version so that every actor of a run sees the same cache, whatever the driver writes meanwhile;
    with ``version=None`` (no table when the run started) every lookup misses.
    """

    def __init__(self, store, table):
        self.store, self.table = store, table

    @classmethod
    def open(cls, storage_cfg, version: int | None) -> PairCache:
        from pipelines.store import Store

        store = Store(storage_cfg)
        table = None if version is None else store.open(storage_cfg.pair_scores_table, version)
        return cls(store, table)

    def lookup(self, keys: list[str]) -> dict[str, float]:
        """{pair key: score} for the keys that are cached (the others are simply absent)."""
        if self.table is None or not keys:
            return {}
        rows = self.store.rows_by_id(self.table, keys, [PAIR_KEY, SCORE], key=PAIR_KEY, chunk=LOOKUP_CHUNK)
        return dict(zip(rows[PAIR_KEY].to_pylist(), rows[SCORE].to_pylist()))


def current_version(store) -> int | None:
    """The cache's version now (what a run pins at its start); None when the table does not exist yet."""
    table = store.open(store.cfg.pair_scores_table)
    return table.version if table is not None else None


def new_pairs(batch: pa.Table, ce_id: str, run_id: str, scored_at: datetime) -> pa.Table:
    """The pairs a Scorer call scored with the model, as cache rows (one per pair, with its query's text), under
    the id the scorer keyed them with (``ce_id`` for a batch that does not say)."""
    keys = batch[NEW_KEYS].combine_chunks()
    flat_keys = pc.list_flatten(keys)
    n = len(flat_keys)
    parents = pc.list_parent_indices(keys)
    queries = batch[S.QUERY].combine_chunks().take(parents)
    ids = batch[SCORED_AS].combine_chunks().take(parents) if SCORED_AS in batch.column_names else \
        pa.array([ce_id] * n, pa.string())
    return pa.table({
        PAIR_KEY: flat_keys, S.CROSS_ENCODER: ids, S.QUERY: queries,
        DOC_ID: pc.list_flatten(batch[NEW_DOC_IDS].combine_chunks()),
        DOC_HASH: pc.list_flatten(batch[NEW_DOC_HASHES].combine_chunks()),
        SCORE: pc.list_flatten(batch[NEW_SCORES].combine_chunks()).cast(pa.float32()),
        S.RUN_ID: pa.array([run_id] * n, pa.string()), SCORED_AT: pa.array([scored_at] * n, S.TIMESTAMP),
    }, schema=S.PAIR_SCORES_SCHEMA)


def write(store, rows: pa.Table) -> int:
    """Add scored pairs (rows of ``PAIR_SCORES_SCHEMA``) to the cache; return how many were new.

    Idempotent: a pair already cached is left as it is (``merge_insert`` on ``pair_key``), so a rerun of a killed
    run never duplicates. Creates the table and its BTree index on ``pair_key`` on first use, and folds new rows
    into the index after each write (~0.15 s at 260k rows): the next run's lookups stay index lookups.
    """
    if rows.num_rows == 0:
        return 0
    rows = rows.select(S.PAIR_SCORES_SCHEMA.names).cast(S.PAIR_SCORES_SCHEMA)
    first: dict[str, int] = {}
    for i, key in enumerate(rows[PAIR_KEY].to_pylist()):
        first.setdefault(key, i)
    if len(first) < rows.num_rows:  # a merge inserts every source row that is not in the table, repeats too
        rows = rows.take(pa.array(sorted(first.values()), pa.int64()))
    return store.upsert(store.cfg.pair_scores_table, rows, PAIR_KEY, schema=S.PAIR_SCORES_SCHEMA, update=False,
                        index=True).inserted


def evict(store, ce_id_current: str | None = None, older_than_days: float | None = None, *,
          now: datetime | None = None) -> int:
    """Delete cache entries that are not worth keeping; return how many rows were deleted.

    ``older_than_days`` (``maintenance.pair_cache_days``): entries scored longer ago than that, used since or
    not (a pair still in demand is scored again once, then cached anew). ``ce_id_current``: also every entry of
    another cross-encoder, dead after a retrain; leave it None when rerank configs with different cross-encoders
    share this storage. Neither given, or no table: nothing is deleted.
    """
    from pipelines.report import utcnow
    from pipelines.store import sql_strings

    where = []
    if older_than_days is not None:
        cutoff = (now or utcnow()) - timedelta(days=older_than_days)
        where.append(f"{SCORED_AT} < timestamp '{cutoff.isoformat()}'")
    if ce_id_current is not None:
        where.append(f"{S.CROSS_ENCODER} != {sql_strings([ce_id_current])}")
    if not where:
        return 0
    return store.delete_where(store.cfg.pair_scores_table, " OR ".join(f"({w})" for w in where))
