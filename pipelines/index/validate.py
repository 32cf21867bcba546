"""Row validation: pure functions from raw records to the "validated" Arrow columns.

Every input row comes out exactly once: good rows with their embedding input and
content hash, bad rows with a ``reason_code``, a human ``reason`` and the ``raw`` input,
so that the sink can quarantine them. No Ray, no LanceDB: unit tests call these directly.

Example::

    spec = RowSpec.from_config(cfg)
    table = validate_records([(1, {"_id": "a", "text": "hello"})], spec, source="x.jsonl")
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines import schema as S
from pipelines.index.keys import id_hash

RAW_LIMIT = 4096  # characters of a bad row kept in quarantine


@dataclass(frozen=True)
class Malformed:
    """A line that could not even be parsed into a record (bad JSON, bad UTF-8, bad CSV row)."""

    code: str
    reason: str
    raw: str


@dataclass(frozen=True)
class RowSpec:
    """What a good corpus row looks like, and how its embedding input is built."""

    id_field: str = "_id"
    text_field: str = "text"
    title_field: str | None = "title"
    metadata: dict[str, str] = field(default_factory=dict)
    max_text_chars: int = 100_000
    input_fields: tuple[str, ...] = ("title", "text")
    separator: str = " "
    model: str = ""
    deleted_field: str | None = None  # a change feed: a row whose field is true deletes its id

    @classmethod
    def from_config(cls, cfg) -> RowSpec:
        c, e = cfg.corpus, cfg.embed
        return cls(
            id_field=c.id_field,
            text_field=c.text_field,
            title_field=c.title_field,
            metadata=dict(c.metadata_fields),
            max_text_chars=c.max_text_chars,
            input_fields=tuple(e.input_fields),
            separator=e.separator,
            model=e.model,
            deleted_field=c.deleted_field if c.mode == "changes" else None,
        )

    @property
    def source_fields(self) -> list[str]:
        names = [self.id_field, self.text_field, *self.metadata]
        return names + ([self.title_field] if self.title_field else [])

    def embed_input(self, title: str, text: str) -> str:
        parts = {"title": title, "text": text}
        return self.separator.join(parts[f] for f in self.input_fields if parts[f])

    def content_hash(self, embed_input: str) -> str:
        """Hash of what the model reads, plus the model: equal hash means equal vector."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.model.encode())
        h.update(b"\x1f")
        h.update(embed_input.encode("utf-8", "surrogatepass"))
        return h.hexdigest()


class BadRow(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _typename(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_meta(name: str, kind: str, v: Any, coerce: bool) -> Any:
    if v is None:
        return None
    if coerce and isinstance(v, str):
        if v == "":
            return None
        try:
            v = {"string": str, "int": int, "float": float, "bool": _parse_bool}[kind](v)
        except ValueError:
            raise BadRow("bad_metadata", f"metadata field '{name}' must be {kind} (got {v!r})") from None
    ok = {
        "string": isinstance(v, str),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
    }[kind]
    if not ok:
        raise BadRow("bad_metadata", f"metadata field '{name}' must be {kind} (got {_typename(v)} {v!r:.60})")
    if kind == "int" and not -(1 << 63) <= v < 1 << 63:
        raise BadRow("bad_metadata", f"metadata field '{name}' must fit in 64 bits (got {v!r:.60})")
    if kind == "float":
        try:
            v = float(v)
        except OverflowError:  # an integer beyond the float range
            v = math.inf
        if not math.isfinite(v):
            raise BadRow("bad_metadata", f"metadata field '{name}' must be a finite number (got {v})")
    return v


def _parse_bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(v)


def _encodable(name: str, v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("bad_unicode", f"{name} holds an unpaired surrogate (invalid Unicode); fix the source encoding") from None
    return v


def check_record(rec: Any, spec: RowSpec, *, coerce: bool = False) -> dict:
    """Return the clean row of a good record, or raise BadRow with a code and a reason."""
    if isinstance(rec, Malformed):
        raise BadRow(rec.code, rec.reason)
    if not isinstance(rec, dict):
        raise BadRow("not_an_object", f"row must be an object with fields (got {_typename(rec)})")
    if spec.id_field not in rec:
        raise BadRow("missing_id", f"missing id field '{spec.id_field}'; set corpus.id_field to the id column")
    doc_id = rec[spec.id_field]
    if doc_id is None:
        raise BadRow("missing_id", f"id field '{spec.id_field}' is null")
    if not isinstance(doc_id, str):
        raise BadRow("bad_id_type", f"id must be a string (got {_typename(doc_id)} {doc_id!r:.60}); quote ids in the source")
    if not doc_id.strip():
        raise BadRow("empty_id", "id is empty")
    if spec.deleted_field and rec.get(spec.deleted_field) is not None:
        flag = rec[spec.deleted_field]
        if not isinstance(flag, bool):
            raise BadRow("bad_deleted_flag", f"'{spec.deleted_field}' must be true or false (got {_typename(flag)} "
                                             f"{flag!r:.40}); a change feed marks deletions with a JSON boolean")
        if flag:
            return {S.ID: _encodable("id", doc_id), S.DELETED: True}
    if spec.text_field not in rec or rec[spec.text_field] is None:
        raise BadRow("missing_text", f"text field '{spec.text_field}' is missing or null")
    text = rec[spec.text_field]
    if not isinstance(text, str):
        raise BadRow("bad_text_type", f"text must be a string (got {_typename(text)})")
    if not text.strip():
        raise BadRow("empty_text", "text is empty or only whitespace")
    if len(text) > spec.max_text_chars:
        raise BadRow(
            "text_too_long",
            f"text has {len(text):,} characters, over corpus.max_text_chars={spec.max_text_chars:,}; "
            "split the document or raise the limit",
        )
    title = rec.get(spec.title_field) if spec.title_field else None
    if title is not None and not isinstance(title, str):
        raise BadRow("bad_title_type", f"title must be a string or null (got {_typename(title)})")
    row = {S.ID: _encodable("id", doc_id), S.TITLE: _encodable("title", title or ""), S.TEXT: _encodable("text", text)}
    for name, kind in spec.metadata.items():
        value = _check_meta(name, kind, rec.get(name), coerce)
        row[name] = _encodable(name, value) if isinstance(value, str) else value
    return row


def _raw_text(rec: Any) -> str:
    if isinstance(rec, Malformed):
        raw = rec.raw
    else:
        try:
            raw = json.dumps(rec, ensure_ascii=False, default=str, allow_nan=True)
        except (TypeError, ValueError):
            raw = repr(rec)
        except RecursionError:
            raw = f"<{_typename(rec)} nested too deeply to show>"
    raw = raw.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be stored
    return raw if len(raw) <= RAW_LIMIT else raw[:RAW_LIMIT] + f"... [{len(raw):,} chars]"


def _raw_id(rec: Any, spec: RowSpec) -> str | None:
    if isinstance(rec, dict):
        v = rec.get(spec.id_field)
        try:
            # the whole id: a snapshot keeps every id it holds, bad rows' too, so a cut id would not protect its
            # document from deletion (reports cut ids for display; decisions never do)
            if v is None:
                return None
            return (v if isinstance(v, str) else str(v)[:200]).encode("utf-8", "replace").decode("utf-8")
        except RecursionError:
            return f"<{_typename(v)}>"
    return None


_COMPUTED = (S.SECONDS, S.ID_KEY, S.CONTENT_KEY)


def validate_records(
    records: Iterable[tuple[int | None, Any]], spec: RowSpec, *, source: str, coerce: bool = False
) -> pa.Table:
    """Validate ``(row_number, record)`` pairs into one Arrow table of validated columns."""
    out_schema = S.validated_schema(spec.metadata)
    cols: dict[str, list] = {f.name: [] for f in out_schema if f.name not in _COMPUTED}
    for row_no, rec in records:
        try:
            try:
                row = check_record(rec, spec, coerce=coerce)
            except RecursionError:  # a value nested so deeply that showing it in the reason overflows the stack
                raise BadRow("too_deep", "row holds a value nested too deeply to read") from None
        except BadRow as bad:
            row = {S.ID: _raw_id(rec, spec), S.REASON_CODE: bad.code, S.REASON: bad.reason, S.RAW: _raw_text(rec)}
        else:
            if not row.get(S.DELETED):
                embed_input = spec.embed_input(row[S.TITLE], row[S.TEXT])
                row[S.EMBED_INPUT] = embed_input
                row[S.CONTENT_HASH] = spec.content_hash(embed_input)
        row[S.SOURCE] = source
        row[S.ROW] = row_no
        for name in cols:
            cols[name].append(row.get(name))
    cols[S.SECONDS] = [0.0] * len(cols[S.ID])  # the columns filled after the rows (_COMPUTED)
    # the id state's keys, hashed here in the (parallel) readers rather than on the driver, which checks every row
    cols[S.ID_KEY] = [None if i is None else id_hash(i) for i in cols[S.ID]]
    cols[S.CONTENT_KEY] = [None if h is None else id_hash(h) for h in cols[S.CONTENT_HASH]]
    return pa.table(cols, schema=out_schema)
