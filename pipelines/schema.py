"""Table and column names, and the Arrow schemas of every table batchrank writes.

Tables (in the LanceDB database at ``storage.uri``):

- ``passages``: one row per document: ``id, title, text, <metadata>, vector, content_hash,
  model, embedded_at, run_id``. Upserted by ``id``.
- ``quarantine``: one row per rejected input row: ``run_id, job, source, row, id,
  reason_code, reason, raw, quarantined_at``. Append-only log.

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

# provenance and quarantine
SOURCE = "source"
ROW = "row"
REASON_CODE = "reason_code"
REASON = "reason"
RAW = "raw"
JOB = "job"
QUARANTINED_AT = "quarantined_at"

# in-flight only (never stored)
EMBED_INPUT = "_embed_input"
SECONDS = "_seconds"  # per-row share of the stage time, summed by the sink for the report

TIMESTAMP = pa.timestamp("us", tz="UTC")

_META_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


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
            pa.field(SECONDS, pa.float64()),
        ]
    )


def passages_schema(metadata: dict[str, str], dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(TITLE, pa.string()),
            pa.field(TEXT, pa.string()),
            *metadata_fields(metadata),
            pa.field(VECTOR, pa.list_(pa.float32(), dim)),
            pa.field(CONTENT_HASH, pa.string()),
            pa.field(MODEL, pa.string()),
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
