"""Query logs → normalised, counted, selected queries.

A log is JSONL or Parquet (a file, folder, glob or URI; ``.gz`` JSONL too), one line per search
with at least a query text and a timestamp. One streaming pass on the driver normalises each
query (Unicode NFKC, case-folding, collapsed whitespace; configurable), keeps the lines inside
the time window and counts them per normalised text; memory grows with distinct queries, not
lines. Selection then keeps queries seen ``min_count`` times or more, most frequent first,
at most ``head`` of them. Bad lines are quarantined with their reason, never dropped:

    lines read = lines counted + lines outside the window + lines quarantined

Example::

    log = read_query_log(cfg.query_log)
    log.selected        # Arrow table: query_id, query, count, last_seen (most frequent first)
    log.counts          # the reconciliation above, and the selection funnel
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa

from pipelines import schema as S
from pipelines.files import expand_paths, iter_jsonl_records, iter_parquet_records
from pipelines.index.validate import Malformed
from pipelines.store.objstore import filesystem, redact

LOG_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl",
                ".ndjson.gz": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
RAW_CHARS = 4096  # raw input kept per quarantined line
MAX_COUNT = (1 << 63) - 1  # a query's count is stored as int64


def normalizer_spec(norm_cfg) -> str:
    """The normalisation rules as a JSON string: stored with each ranking so lookups apply the same ones."""
    return json.dumps({"unicode": norm_cfg.unicode, "casefold": norm_cfg.casefold,
                       "collapse_whitespace": norm_cfg.collapse_whitespace}, sort_keys=True)


def normalize(text: str, spec: dict[str, Any]) -> str:
    """Normalise one query: Unicode form, case-folding, whitespace collapsed to single spaces and trimmed."""
    if spec.get("unicode", "NFKC") != "none":
        text = unicodedata.normalize(spec.get("unicode", "NFKC"), text)
    if spec.get("casefold", True):
        text = text.casefold()
    if spec.get("collapse_whitespace", True):
        text = " ".join(text.split())
    return text


def query_id(normalized: str) -> str:
    """Stable 16-hex id of a normalised query (same text → same id, in every run and at lookup)."""
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def parse_timestamp(value: Any) -> datetime:
    """ISO 8601 text (naive means UTC), epoch seconds / milliseconds / microseconds, or a datetime/date."""
    if isinstance(value, datetime):  # in UTC: a time that is not a datetime there (year 10000) raises OverflowError
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, bool):
        raise ValueError(f"a boolean ({value}) is not a time")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a time")
        seconds = value / 1e6 if abs(value) >= 1e14 else value / 1e3 if abs(value) >= 1e11 else value
        return datetime.fromtimestamp(seconds, UTC)
    if isinstance(value, str):
        ts = datetime.fromisoformat(value.strip())
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC)
    raise ValueError(f"a {type(value).__name__} is not a time")


@dataclass
class QueryLog:
    """What one pass over the log found: the selected queries, the quarantined lines and the counts."""

    selected: pa.Table
    quarantine: list[dict[str, Any]]
    counts: dict[str, Any]
    window: dict[str, str | None]
    normalizer: str
    reasons: dict[str, int] = field(default_factory=dict)


SELECTED_SCHEMA = pa.schema([
    pa.field(S.QUERY_ID, pa.string()), pa.field(S.QUERY, pa.string()),
    pa.field(S.COUNT, pa.int64()), pa.field(S.LAST_SEEN, S.TIMESTAMP),
])


def time_window(log_cfg, now: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    """``[since, until)`` from the config: explicit bounds, or the last N days before ``until`` (or now)."""
    since, until = log_cfg.since, log_cfg.until
    if log_cfg.last_days is not None:
        try:
            since = (until or now or datetime.now(UTC)) - timedelta(days=log_cfg.last_days)
        except OverflowError:  # the window reaches back before year 1: it starts with the first line
            since = None
    return since, until


def read_query_log(log_cfg, *, now: datetime | None = None, progress=None,
                   storage_options: dict[str, str] | None = None) -> QueryLog:
    """Read, normalise, window, count and select; see the module docstring. A log on an object store is read with
    ``storage_options`` (``storage.storage_options``)."""
    spec_json = normalizer_spec(log_cfg.normalize)
    spec = json.loads(spec_json)
    since, until = time_window(log_cfg, now)
    counts: dict[str, list] = {}  # normalised text → [count, last_seen]
    bad: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    read = outside = counted_lines = 0
    for source, row, record in iter_log_records(log_cfg, storage_options):
        read += 1
        if progress is not None and read % 10_000 == 0:
            progress.update(10_000)
        try:
            text, ts, weight = _check(record, log_cfg, spec)
            inside = not ((since is not None and ts < since) or (until is not None and ts >= until))
            if inside and text in counts and counts[text][0] + weight > MAX_COUNT:
                raise _BadLine("bad_count", f"'{log_cfg.count_field}' takes the count of this query over {MAX_COUNT:,}")
        except _BadLine as exc:
            bad.append({S.SOURCE: source, S.ROW: row, S.ID: None, S.REASON_CODE: exc.code, S.REASON: exc.reason,
                        S.RAW: _quarantined_raw(record, exc, log_cfg)})
            reasons[exc.code] = reasons.get(exc.code, 0) + 1
            continue
        if not inside:
            outside += 1
            continue
        counted_lines += 1
        entry = counts.get(text)
        if entry is None:
            counts[text] = [weight, ts]
        else:
            entry[0] += weight
            entry[1] = max(entry[1], ts)
    if progress is not None:
        progress.update(read % 10_000)

    ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))
    frequent = [kv for kv in ranked if kv[1][0] >= log_cfg.min_count]
    chosen = frequent[: log_cfg.head] if log_cfg.head else frequent
    selected = pa.table({
        S.QUERY_ID: [query_id(q) for q, _ in chosen],
        S.QUERY: [q for q, _ in chosen],
        S.COUNT: pa.array([c for _, (c, _) in chosen], pa.int64()),
        S.LAST_SEEN: pa.array([ts for _, (_, ts) in chosen], S.TIMESTAMP),
    }, schema=SELECTED_SCHEMA)
    tally = {
        "lines_read": read, "lines_counted": counted_lines, "lines_outside_window": outside,
        "lines_quarantined": len(bad),
        "lines_reconciled": read == counted_lines + outside + len(bad),
        "distinct_queries": len(counts), "below_min_count": len(counts) - len(frequent),
        "beyond_head": len(frequent) - len(chosen), "selected": len(chosen),
        "searches_selected": sum(c for _, (c, _) in chosen),
    }
    window = {"since": since.isoformat() if since else None, "until": until.isoformat() if until else None}
    return QueryLog(selected, bad, tally, window, spec_json, dict(sorted(reasons.items())))


class _BadLine(Exception):
    def __init__(self, code: str, reason: str, raw: str | None = None):
        super().__init__(reason)
        self.code, self.reason, self.raw = code, reason, raw


def _check(record: Any, log_cfg, spec: dict[str, Any]) -> tuple[str, datetime, int]:
    """(normalised text, timestamp, count) of one log line, or ``_BadLine`` naming what is wrong."""
    if isinstance(record, Malformed):
        raise _BadLine(record.code, record.reason, record.raw[:RAW_CHARS])
    if not isinstance(record, dict):
        raise _BadLine("not_an_object", f"line is a JSON {type(record).__name__}, not an object; write one "
                                        "object per line")
    tf, ts_f = log_cfg.text_field, log_cfg.time_field
    text = record.get(tf)
    if text is None:
        raise _BadLine("missing_query", f"no '{tf}' field; set query_log.text_field to the field holding the query")
    if not isinstance(text, str):
        raise _BadLine("bad_query_type", f"'{tf}' must be a string (got {type(text).__name__})")
    norm = normalize(text, spec)
    if not norm:
        raise _BadLine("empty_query", f"'{tf}' is empty or only whitespace")
    try:
        norm.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadLine("bad_unicode", f"'{tf}' holds an unpaired surrogate (invalid Unicode); fix the log's "
                                      "encoding") from None
    if len(norm) > log_cfg.max_query_chars:
        raise _BadLine("query_too_long", f"query has {len(norm):,} characters, over query_log.max_query_chars "
                                         f"({log_cfg.max_query_chars:,}); raise the limit if such queries are real")
    if record.get(ts_f) is None:
        raise _BadLine("missing_timestamp", f"no '{ts_f}' field; set query_log.time_field to the field holding "
                                            "the time of the search")
    try:
        ts = parse_timestamp(record[ts_f])
    except (ValueError, OverflowError, OSError) as exc:
        raise _BadLine("bad_timestamp", f"'{ts_f}' is not a time ({exc}); use ISO 8601 (2026-11-29T08:00:00Z) "
                                        "or epoch seconds/milliseconds") from None
    weight = 1
    if log_cfg.count_field:
        weight = record.get(log_cfg.count_field)
        if isinstance(weight, float) and weight.is_integer():
            weight = int(weight)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= MAX_COUNT:
            raise _BadLine("bad_count", f"'{log_cfg.count_field}' must be a whole number from 1 to {MAX_COUNT:,} "
                                        f"(got {weight!r})")
    return norm, ts, weight


def _raw(record: Any) -> str:
    raw = json.dumps(record, ensure_ascii=False, default=str)[:RAW_CHARS]
    return raw.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be stored


def _quarantined_raw(record: Any, exc: _BadLine, log_cfg) -> str:
    """What the quarantine keeps of a bad line. Logs hold personal data (user ids, addresses, sessions), so by
    default (``query_log.quarantine_raw: fields``) only the fields batchrank reads are kept, and of a line that
    does not parse, only its size; ``full`` keeps the line as it was."""
    if log_cfg.quarantine_raw == "full":
        return exc.raw if exc.raw is not None else _raw(record)
    if isinstance(record, dict):
        fields = (log_cfg.text_field, log_cfg.time_field, log_cfg.count_field)
        return _raw({k: record[k] for k in fields if k and k in record})
    size = len(exc.raw) if exc.raw is not None else len(_raw(record))
    return (f"<{size:,} characters not kept: the line may hold personal data; set query_log.quarantine_raw: full "
            "to keep bad lines whole>")


# -- files ---------------------------------------------------------------------------------------
def log_files(paths: str | list[str], fmt: str, storage_options: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``(path, format)`` of every log file: globs expanded, folders listed (hidden and ``_`` files skipped)."""
    import pyarrow.fs as pafs

    out: list[tuple[str, str]] = []
    for p in expand_paths(paths, storage_options, key="query_log.path"):
        fs, path = filesystem(p, storage_options)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            found = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and not i.base_name.startswith((".", "_")) and _format_of(i.path, "auto"))
            uri = p.rstrip("/")  # s3://bucket/logs/ lists as bucket/logs/...: the prefix is s3://
            prefix = uri[: len(uri) - len(path.rstrip("/"))] if "://" in p else ""
            out.extend((prefix + f if prefix else f, _format_of(f, fmt)) for f in found)
        elif info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"query_log.path {redact(p)!r} does not exist; check the path")
        else:
            f = _format_of(p, fmt)
            if f is None:
                raise ValueError(f"cannot tell the format of query log {redact(p)!r}; set query_log.format to jsonl "
                                 "or parquet")
            out.append((p, f))
    if not out:
        raise FileNotFoundError(f"query_log.path {redact(repr(paths))} holds no .jsonl or .parquet files; "
                                "check the path")
    return out


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    return next((f for suffix, f in LOG_SUFFIXES.items() if lower.endswith(suffix)), None)


def iter_log_records(log_cfg, storage_options: dict[str, str] | None = None) -> Iterator[tuple[str, int | None, Any]]:
    """``(source, row, record)`` for every line of every log file; unreadable input comes back ``Malformed``."""
    fields = [f for f in (log_cfg.text_field, log_cfg.time_field, log_cfg.count_field) if f]
    for path, fmt in log_files(log_cfg.path, log_cfg.format, storage_options):
        fs, inner = filesystem(path, storage_options)
        source = redact(path)  # stored with quarantined lines
        if fmt == "jsonl":
            compression = "gzip" if path.endswith(".gz") else None
            with fs.open_input_stream(inner, compression=compression) as stream:
                for row, rec in iter_jsonl_records(stream):
                    yield source, row, rec
            continue
        try:
            with fs.open_input_file(inner) as f:
                for row, rec in iter_parquet_records(f, fields, 8192):
                    yield source, row, rec
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # (a corrupt string column: bad UTF-8)
            yield source, None, Malformed("bad_parquet_file", f"Parquet file unreadable: {redact(str(exc))}", "")
