"""Table and column names, and the Arrow schemas of every table batchrank writes.

Tables (in the LanceDB database at ``storage.uri``):

- ``passages``: one row per passage of a document (a document that fits the bi-encoder is one passage):
  ``id, passage_id, passage, passage_start, passage_end, title, text, <metadata>, vector, content_hash, model,
  passage_settings, embedded_at, run_id``. ``id`` is the document's id (as in the corpus and the judgments),
  ``passage`` the passage's number in it (0, 1, ...), ``passage_id`` = ``<id>#<passage>`` the row's key,
  ``passage_start``/``passage_end`` its character offsets into the document's text, ``text`` the passage's text
  and ``content_hash`` the document's. Upserted by ``passage_id``; a changed document replaces all its passages.
- ``rankings``: one row per query of the query log: ``query_id, query, count, last_seen, doc_ids,
  scores, retrieval_scores, retrieval_ranks, passage_ids, passage_starts, passage_ends, candidates, run_id,
  bi_encoder, cross_encoder, passages_version, normalizer, ranked_at``; ``passage_ids`` (and offsets) are the
  passage of each ranked document that earned its score. Each rerank run replaces the whole set in one
  commit (a new table version, tagged with the run id); lookups go by ``query_id``.
- ``quarantine``: one row per rejected input row: ``run_id, job, source, row, id,
  reason_code, reason, raw, quarantined_at``. Append-only log.
- ``pair_scores``: the rerank job's cache, one cross-encoder score per (cross-encoder, query,
  document text): ``pair_key, cross_encoder, query, doc_id, doc_hash, score, run_id, scored_at``.
  Upserted by ``pair_key`` (first write wins); see ``pipelines/rerank/pair_cache.py``.
- ``runs`` (in the scheduler's own database, ``runs.uri``): one row per scheduled occurrence,
  upserted by ``key``; see ``pipelines/cluster/schedule.py``.

Between reading and writing, rows travel through Ray Data as Arrow tables with the
"validated" columns below: good rows have ``reason_code = null``; bad rows keep the
reason and the raw input so that the sink can quarantine them.
"""

from __future__ import annotations

import pyarrow as pa

# passages
ID = "id"
TITLE = "title"
TEXT = "text"
VECTOR = "vector"
CONTENT_HASH = "content_hash"
MODEL = "model"
EMBEDDED_AT = "embedded_at"
RUN_ID = "run_id"
PASSAGE_ID = "passage_id"  # <document id>#<passage number>: the row's key
PASSAGE = "passage"  # the passage's number within its document, from 0
PASSAGE_START = "passage_start"  # character offsets of the passage into the document's text
PASSAGE_END = "passage_end"
PASSAGE_SETTINGS = "passage_settings"  # JSON: how documents became passages (chunking, document prompt)

# provenance and quarantine
SOURCE = "source"
ROW = "row"
REASON_CODE = "reason_code"
REASON = "reason"
RAW = "raw"
JOB = "job"
QUARANTINED_AT = "quarantined_at"

# rankings
QUERY_ID = "query_id"
QUERY = "query"
COUNT = "count"
LAST_SEEN = "last_seen"
DOC_IDS = "doc_ids"
SCORES = "scores"  # final scores, best first: the cross-encoder's, or its blend with the first stage's
CROSS_ENCODER_SCORES = "cross_encoder_scores"  # the cross-encoder's own score of each kept document
FUSION_WEIGHT = "fusion_weight"  # w in w * z(cross-encoder) + (1 - w) * z(first stage); null: cross-encoder alone
RETRIEVAL_SCORES = "retrieval_scores"
RETRIEVAL_RANKS = "retrieval_ranks"  # 1-based rank of each kept document in the candidate list
CANDIDATES = "candidates"  # how many candidates the cross-encoder scored for the query
BI_ENCODER = "bi_encoder"
CROSS_ENCODER = "cross_encoder"
PASSAGES_VERSION = "passages_version"
NORMALIZER = "normalizer"  # JSON of the query normalisation rules, applied again at lookup
RANKED_AT = "ranked_at"
PASSAGE_IDS = "passage_ids"  # the passage of each ranked document that earned its score
PASSAGE_STARTS = "passage_starts"
PASSAGE_ENDS = "passage_ends"
SETTINGS = "settings"  # digest of everything a ranking depends on besides the query and passages (models, k, ...)

# pair_scores (query, cross_encoder and run_id are named as in rankings)
PAIR_KEY = "pair_key"  # blake2b of (cross-encoder id, normalised query, the document text it reads)
DOC_ID = "doc_id"
DOC_HASH = "doc_hash"
SCORE = "score"
SCORED_AT = "scored_at"

# in-flight only (never stored)
EMBED_INPUT = "_embed_input"
SECONDS = "_seconds"  # per-row share of the stage time, summed by the sink for the report
DELETED = "_deleted"  # a change feed's delete marker for its id (corpus.mode: changes)
ID_KEY = "_id_key"  # the id's 64-bit hash (ids.id_hash), computed by the readers: the id state is keyed by it
CONTENT_KEY = "_content_key"  # the content hash's 64-bit hash: what the id state compares with passages
CAND_IDS = "_cand_ids"  # retrieve → score: the candidates of each query, best retrieval first
CAND_TEXTS = "_cand_texts"
CAND_SCORES = "_cand_scores"
CAND_PASSAGES = "_cand_passages"  # the passage id of each candidate (its best passage at document level)
CAND_STARTS = "_cand_starts"
CAND_ENDS = "_cand_ends"
SPANS_START = "_spans_start"  # embed → sink: each document's passages as character offsets (one vector each)
SPANS_END = "_spans_end"
RETRIEVE_SECONDS = "_retrieve_seconds"
SCORE_SECONDS = "_score_seconds"
NODE = "_node"  # the Ray node that embedded a row (``<ip>/<node id prefix>``), counted per node in reports
RETRIEVE_NODE = "_retrieve_node"
SCORE_NODE = "_score_node"

TIMESTAMP = pa.timestamp("us", tz="UTC")

_META_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


# Columns batchrank itself writes or carries with a corpus row: a metadata field may not take one of these names
# (it would collide after embedding); names starting with "_" are batchrank's in-flight columns.
RESERVED_COLUMNS = frozenset({ID, TITLE, TEXT, VECTOR, CONTENT_HASH, MODEL, EMBEDDED_AT, RUN_ID, SOURCE, ROW,
                              REASON_CODE, REASON, RAW, JOB, QUARANTINED_AT, PASSAGE_ID, PASSAGE, PASSAGE_START,
                              PASSAGE_END, PASSAGE_SETTINGS})


def metadata_fields(metadata: dict[str, str]) -> list[pa.Field]:
    return [pa.field(name, _META_TYPES[kind]) for name, kind in metadata.items()]


def validated_schema(metadata: dict[str, str]) -> pa.Schema:
    """Columns that leave the reader/validator, for good and bad rows alike."""
    return pa.schema(
        [
            pa.field(ID, pa.string()),
            pa.field(TITLE, pa.string()),
            pa.field(TEXT, pa.string()),
            *metadata_fields(metadata),
            pa.field(CONTENT_HASH, pa.string()),
            pa.field(EMBED_INPUT, pa.string()),
            pa.field(SOURCE, pa.string()),
            pa.field(ROW, pa.int64()),
            pa.field(REASON_CODE, pa.string()),
            pa.field(REASON, pa.string()),
            pa.field(RAW, pa.string()),
            pa.field(DELETED, pa.bool_()),
            pa.field(SECONDS, pa.float64()),
            pa.field(ID_KEY, pa.int64()),
            pa.field(CONTENT_KEY, pa.int64()),
        ]
    )


def passages_schema(metadata: dict[str, str], dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(PASSAGE_ID, pa.string(), nullable=False),
            pa.field(PASSAGE, pa.int32()),
            pa.field(PASSAGE_START, pa.int64()),
            pa.field(PASSAGE_END, pa.int64()),
            pa.field(TITLE, pa.string()),
            pa.field(TEXT, pa.string()),
            *metadata_fields(metadata),
            pa.field(VECTOR, pa.list_(pa.float32(), dim)),
            pa.field(CONTENT_HASH, pa.string()),
            pa.field(MODEL, pa.string()),
            pa.field(PASSAGE_SETTINGS, pa.string()),
            pa.field(EMBEDDED_AT, TIMESTAMP),
            pa.field(RUN_ID, pa.string()),
        ]
    )


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field(RUN_ID, pa.string()),
        pa.field(JOB, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(ROW, pa.int64()),
        pa.field(ID, pa.string()),
        pa.field(REASON_CODE, pa.string()),
        pa.field(REASON, pa.string()),
        pa.field(RAW, pa.string()),
        pa.field(QUARANTINED_AT, TIMESTAMP),
    ]
)


def quarantine_rows(rows: pa.Table | list[dict] | None, run_id: str, job: str) -> pa.Table:
    """Rejected rows (``source, row, id, reason_code, reason, raw``) with the run's columns added, as the
    quarantine table stores them; an empty quarantine table when there are none."""
    from datetime import UTC, datetime

    if rows is None or len(rows) == 0:
        return QUARANTINE_SCHEMA.empty_table()
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    n, now = table.num_rows, datetime.now(UTC)
    return (table.append_column(RUN_ID, pa.array([run_id] * n))
            .append_column(JOB, pa.array([job] * n))
            .append_column(QUARANTINED_AT, pa.array([now] * n, TIMESTAMP)))


RANKINGS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(QUERY, pa.string()),
        pa.field(COUNT, pa.int64()),
        pa.field(LAST_SEEN, TIMESTAMP),
        pa.field(DOC_IDS, pa.list_(pa.string())),
        pa.field(SCORES, pa.list_(pa.float32())),
        pa.field(RETRIEVAL_SCORES, pa.list_(pa.float32())),
        pa.field(RETRIEVAL_RANKS, pa.list_(pa.int32())),
        pa.field(CROSS_ENCODER_SCORES, pa.list_(pa.float32())),
        pa.field(PASSAGE_IDS, pa.list_(pa.string())),
        pa.field(PASSAGE_STARTS, pa.list_(pa.int64())),
        pa.field(PASSAGE_ENDS, pa.list_(pa.int64())),
        pa.field(FUSION_WEIGHT, pa.float32()),
        pa.field(CANDIDATES, pa.int32()),
        pa.field(RUN_ID, pa.string()),
        pa.field(BI_ENCODER, pa.string()),
        pa.field(CROSS_ENCODER, pa.string()),
        pa.field(PASSAGES_VERSION, pa.int64()),
        pa.field(NORMALIZER, pa.string()),
        pa.field(RANKED_AT, TIMESTAMP),
        pa.field(SETTINGS, pa.string()),
    ]
)


PAIR_SCORES_SCHEMA = pa.schema(
    [
        pa.field(PAIR_KEY, pa.string(), nullable=False),
        pa.field(CROSS_ENCODER, pa.string()),
        pa.field(QUERY, pa.string()),
        pa.field(DOC_ID, pa.string()),
        pa.field(DOC_HASH, pa.string()),
        pa.field(SCORE, pa.float32()),
        pa.field(RUN_ID, pa.string()),
        pa.field(SCORED_AT, TIMESTAMP),
    ]
)


RUNS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # <schedule>@<scheduled time, UTC ISO>
        pa.field("schedule", pa.string()),
        pa.field("job", pa.string()),
        pa.field("config", pa.string()),
        pa.field("scheduled_for", TIMESTAMP),
        pa.field("timezone", pa.string()),
        pa.field("submission_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("status", pa.string()),  # SUBMITTED, PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, SKIPPED,
        #                                   NOT_SUBMITTED
        pa.field("message", pa.string()),
        pa.field("missed", pa.int64()),  # earlier occurrences not run because the scheduler was down (caught up once)
        pa.field("submitted_at", TIMESTAMP),
        pa.field("started_at", TIMESTAMP),
        pa.field("finished_at", TIMESTAMP),
        pa.field("duration_s", pa.float64()),
        pa.field("report", pa.string()),
    ]
)


def fingerprint_rows(rows: pa.Table) -> str:
    """A digest of (id, content hash) rows in any order (a document's passages repeat the pair: counted once):
    equal exactly when the documents are equal."""
    import hashlib

    import pyarrow.compute as pc

    rows = rows.select([ID, CONTENT_HASH]).group_by([ID, CONTENT_HASH]).aggregate([])
    rows = rows.take(pc.sort_indices(rows, [(ID, "ascending")]))
    h = hashlib.blake2b(digest_size=16)
    for batch in rows.to_batches(65536):
        h.update("\x1e".join(f"{a}\x1f{b}" for a, b in zip(batch[ID].to_pylist(),
                                                        batch[CONTENT_HASH].to_pylist())).encode())
    return h.hexdigest()
