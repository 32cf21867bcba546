"""Input files without Ray: what the corpus and query log readers share.

Reads top to bottom::

    expand_paths        globs expanded, on disk or on an object store (listed through pyarrow.fs); a path
                        that matches nothing raises, naming the config key that holds it
    detect_format       jsonl, parquet, csv or lance, from the file (or folder) names
    open_path           a local path or a URI opened as the readers read it: a stream, or a file for Parquet
    iter_*_records      one parser per format, a plain generator of ``(row_number, record)`` pairs

A malformed line (bad JSON, bad UTF-8, a CSV row with the wrong number of fields) comes back as a
``Malformed`` record instead of an exception, so the caller quarantines it and reads on. Streams are read
``_CHUNK`` bytes at a time (tests shrink it to cross chunk boundaries).

Example::

    paths = expand_paths("logs/*.jsonl", key="query_log.path")
    with open_path(paths[0]) as stream:
        for line_no, record in iter_jsonl_records(stream):
            ...
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipelines.index.validate import Malformed
from pipelines.store.objstore import filesystem, redact

FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv",
    ".lance": "lance",
}
_CHUNK = 1 << 20
_BLANK = object()  # what a blank line parses to: not a row (a JSON null line is a row, refused as not an object)


# -- paths ---------------------------------------------------------------------------------------
def expand_paths(path: str | list[str], storage_options: dict[str, str] | None = None, *, key: str) -> list[str]:
    """Expand local globs and object-store globs (listed with ``storage_options``); keep folders, files and URIs
    as given. Raise if nothing matches, naming ``key`` (the config key holding the path: ``corpus.path``)."""
    out: list[str] = []
    for p in [path] if isinstance(path, str) else path:
        if any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(p, recursive=True)) if "://" not in p else _expand_uri_glob(p, storage_options)
            if not matches:
                raise FileNotFoundError(f"{key} pattern {redact(p)!r} matched no files; check the path")
            out.extend(matches)
        elif "://" not in p and not os.path.exists(p):
            raise FileNotFoundError(f"{key} {p!r} does not exist; check the path")
        else:
            out.append(p)
    return out


def _expand_uri_glob(pattern: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """Glob on an object store (s3://bucket/corpus/*.jsonl): list below the fixed prefix, then match."""
    import pyarrow.fs as pafs

    scheme, rest = pattern.split("://", 1)
    fixed = rest[: min(rest.index(ch) for ch in "*?[" if ch in rest)].rsplit("/", 1)[0]
    fs, base = filesystem(f"{scheme}://{fixed}", storage_options)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = base.rstrip("/")[: -len(fixed)] if fixed and base.rstrip("/").endswith(fixed) else ""
    paths = [f"{scheme}://{i.path[len(prefix):]}" if prefix else f"{scheme}://{i.path}" for i in infos
             if i.type == pafs.FileType.File]
    return sorted(p for p in paths if _glob_match(p.split("/"), pattern.split("/")))


def _glob_match(parts: list[str], pats: list[str]) -> bool:
    """Glob semantics per path segment: ``*`` stays within a segment, ``**`` spans any number of them."""
    import fnmatch

    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_glob_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _glob_match(parts[1:], pats[1:])


def detect_format(paths: list[str]) -> str:
    """The format of the first path whose name tells it (``.gz`` allowed; a local folder: of the files in it, when
    they agree), else ``unknown``."""
    for p in paths:
        base = p.rstrip("/")
        for suffix, fmt in FORMAT_BY_SUFFIX.items():
            if base.endswith(suffix) or base.endswith(suffix + ".gz"):
                return fmt
        if os.path.isdir(base):
            found = {detect_format([f]) for f in os.listdir(base) if not f.startswith((".", "_"))} - {"unknown"}
            if len(found) == 1:
                return found.pop()
    return "unknown"


def open_path(path: str, random_access: bool, options=None):
    """A local path or a URI, as the index job's readers open it (compression detected from the extension)."""
    if "://" not in path:
        return pa.memory_map(path) if random_access else pa.input_stream(path)
    fs, inner = filesystem(path, options)
    return fs.open_input_file(inner) if random_access else fs.open_input_stream(inner)


# -- records -------------------------------------------------------------------------------------
def iter_jsonl_records(stream: Any, chunk: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)``, reading ``chunk`` bytes at a time (default ``_CHUNK``); unparseable lines
    come back as ``Malformed``."""
    chunk = chunk or _CHUNK
    line_no = 0
    pending = b""
    while True:
        data = stream.read(chunk)
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            line_no += 1
            rec = _parse_json_line(line)
            if rec is not _BLANK:
                yield line_no, rec
    if pending:
        rec = _parse_json_line(pending)
        if rec is not _BLANK:
            yield line_no + 1, rec


def _parse_json_line(line: bytes) -> Any:
    line = line.rstrip(b"\r")
    if not line.strip():
        return _BLANK  # blank lines are not rows
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Malformed("bad_utf8", f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                         line.decode("utf-8", "replace"))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return Malformed("bad_json", f"line is not valid JSON ({exc.msg} at column {exc.colno})", text)
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        return Malformed("bad_json", f"line is not readable JSON ({str(exc).split(';')[0]})", text)
    except RecursionError:
        return Malformed("bad_json", "line is not valid JSON (nested too deeply)", text[:200])


def iter_csv_records(stream: Any, string_columns: list[str], chunk: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, record)`` from a CSV with a header, parsed in blocks of ``chunk`` bytes (default
    ``_CHUNK``); bad rows come back as ``Malformed``."""
    import pyarrow.csv as pacsv

    bad: list[tuple[int | None, Malformed]] = []

    def on_invalid(row) -> str:
        bad.append((row.number, Malformed("bad_csv_row", f"CSV row has {row.actual_columns} fields, "
                                          f"expected {row.expected_columns}", row.text or "")))
        return "skip"

    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=chunk or _CHUNK),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
            # bytes, decoded row by row below: bad UTF-8 quarantines its row, not the whole block
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in string_columns},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
        reader.schema.names  # noqa: B018 -- column names that are not UTF-8 raise here
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        yield 1, Malformed("bad_csv_file", f"CSV header could not be read: {exc}", "")
        return
    n = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            yield from bad
            yield n + 1, Malformed("bad_csv_file", f"CSV unreadable after row {n}: {exc}", "")
            return
        yield from bad
        bad.clear()
        for rec in batch.to_pylist():
            n += 1
            yield n, _decode_csv_row(rec, string_columns)
    yield from bad


def _decode_csv_row(rec: dict, string_columns: list[str]) -> Any:
    """The row with its string columns decoded, or ``Malformed`` naming the first field that is not UTF-8."""
    for name in string_columns:
        value = rec.get(name)
        if isinstance(value, bytes):
            try:
                rec[name] = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                shown = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v for k, v in rec.items()}
                raw = json.dumps(shown, ensure_ascii=False, default=str)
                return Malformed("bad_utf8", f"field '{name}' is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                 raw)
    return rec


def iter_parquet_records(f: Any, columns: list[str], batch_rows: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, record)`` of the ``columns`` a Parquet file has, read ``batch_rows`` rows at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    # (no column at all, columns=[], makes pyarrow abort the process on some corrupt files: read one column then)
    present = [c for c in columns if c in pf.schema_arrow.names] or pf.schema_arrow.names[:1]
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
        for rec in batch.to_pylist():
            n += 1
            yield n, rec
