"""Read a corpus (JSONL, Parquet, CSV or Lance; a file, folder, glob or URI) as validated rows.

Each file format is parsed by a plain generator of ``(row_number, record)`` pairs, so a
malformed line (bad JSON, bad UTF-8, a CSV row with the wrong number of fields) becomes a
quarantined row instead of a crash. ``read_corpus`` wraps them in Ray Data datasources that
stream each file in blocks of ``corpus.rows_per_block`` rows (several blocks per file, so
that one file still feeds every embedding actor).

Example::

    ds = read_corpus(cfg.corpus, RowSpec.from_config(cfg))   # a ray.data.Dataset
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipelines import schema as S
from pipelines.objstore import filesystem, filesystem_paths, lance_location, redact
from pipelines.validate import Malformed, RowSpec, validate_records

FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv",
    ".lance": "lance",
}
_CHUNK = 1 << 20
_BLANK = object()  # what a blank line parses to: not a row (a JSON null line is a row, refused as not an object)


def iter_jsonl_records(stream: Any) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)``; unparseable lines come back as ``Malformed``."""
    line_no = 0
    pending = b""
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            break
        pending += chunk
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


def iter_csv_records(stream: Any, string_columns: list[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, record)`` from a CSV with a header; bad rows come back as ``Malformed``."""
    import pyarrow.csv as pacsv

    bad: list[tuple[int | None, Malformed]] = []

    def on_invalid(row) -> str:
        bad.append((row.number, Malformed("bad_csv_row", f"CSV row has {row.actual_columns} fields, "
                                          f"expected {row.expected_columns}", row.text or "")))
        return "skip"

    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=_CHUNK),
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
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    # (no column at all, columns=[], makes pyarrow abort the process on some corrupt files: read one column then)
    present = [c for c in columns if c in pf.schema_arrow.names] or pf.schema_arrow.names[:1]
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
        for rec in batch.to_pylist():
            n += 1
            yield n, rec


def blocks(records: Iterator[tuple[int, Any]], spec: RowSpec, source: str, rows: int,
           coerce: bool = False) -> Iterator[pa.Table]:
    """Validate records in blocks of ``rows`` rows."""
    while True:
        chunk = list(islice(records, rows))
        if not chunk:
            return
        yield validate_records(chunk, spec, source=source, coerce=coerce)


def detect_format(paths: list[str]) -> str:
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


def expand_paths(path: str | list[str], storage_options: dict[str, str] | None = None) -> list[str]:
    """Expand local globs and object-store globs (listed with ``storage_options``); keep folders, files and URIs
    as given. Raise if nothing matches."""
    out: list[str] = []
    for p in [path] if isinstance(path, str) else path:
        if any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(p, recursive=True)) if "://" not in p else _expand_uri_glob(p, storage_options)
            if not matches:
                raise FileNotFoundError(f"corpus.path pattern {redact(p)!r} matched no files; check the path")
            out.extend(matches)
        elif "://" not in p and not os.path.exists(p):
            raise FileNotFoundError(f"corpus.path {p!r} does not exist; check the path")
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


def read_corpus(corpus_cfg, spec: RowSpec, *, read_cpus: float = 0.1, storage_options: dict[str, str] | None = None):
    """Ray Dataset of validated rows (see ``schema.validated_schema``) for the configured corpus; an object store
    is reached with ``storage_options`` (``storage.storage_options``), in every read task."""
    import ray.data

    paths = expand_paths(corpus_cfg.path, storage_options)
    fmt = corpus_cfg.format if corpus_cfg.format != "auto" else detect_format(paths)
    rows = corpus_cfg.rows_per_block
    if fmt == "lance":
        return _read_lance(paths, spec, rows, read_cpus, storage_options)
    datasource_cls = {"jsonl": _JsonlSource, "csv": _CsvSource, "parquet": _ParquetSource}.get(fmt)
    if datasource_cls is None:
        raise ValueError(f"cannot tell the format of corpus.path {redact(str(corpus_cfg.path))!r}; "
                         "set corpus.format to jsonl, parquet, csv or lance")
    fs, paths = filesystem_paths(paths, storage_options)  # the filesystem travels to the read tasks
    source = datasource_cls(paths, spec=spec, rows=rows, filesystem=fs)
    return ray.data.read_datasource(source, num_cpus=read_cpus)


class _CorpusSource(FileBasedDatasource):
    """Streams one file per read task, in validated blocks of ``rows`` rows."""

    def __init__(self, paths: list[str], *, spec: RowSpec, rows: int, extensions: list[str], filesystem=None):
        super().__init__(paths, filesystem=filesystem, file_extensions=extensions)
        self._spec, self._rows = spec, rows


class _JsonlSource(_CorpusSource):
    def __init__(self, paths: list[str], *, spec: RowSpec, rows: int, filesystem=None):
        super().__init__(paths, spec=spec, rows=rows, extensions=["jsonl", "json", "ndjson", "gz"],
                         filesystem=filesystem)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        yield from blocks(iter_jsonl_records(f), self._spec, path, self._rows)


class _CsvSource(_CorpusSource):
    def __init__(self, paths: list[str], *, spec: RowSpec, rows: int, filesystem=None):
        super().__init__(paths, spec=spec, rows=rows, extensions=["csv", "gz"], filesystem=filesystem)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        records = iter_csv_records(f, self._spec.source_fields)
        yield from blocks(records, self._spec, path, self._rows, coerce=True)


class _ParquetSource(_CorpusSource):
    def __init__(self, paths: list[str], *, spec: RowSpec, rows: int, filesystem=None):
        super().__init__(paths, spec=spec, rows=rows, extensions=["parquet", "pq"], filesystem=filesystem)

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet needs random access

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        try:
            yield from blocks(iter_parquet_records(f, self._spec.source_fields, self._rows),
                              self._spec, path, self._rows)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # (a corrupt string column: bad UTF-8)
            bad = iter([(None, Malformed("bad_parquet_file", f"Parquet file unreadable: {exc}", ""))])
            yield from blocks(bad, self._spec, path, self._rows)


def _read_lance(paths: list[str], spec: RowSpec, rows: int, read_cpus: float, storage_options=None):
    import ray.data

    def validate_batch(batch: pa.Table, source: str) -> pa.Table:
        records = ((None, rec) for rec in batch.to_pylist())
        return validate_records(records, spec, source=source)

    datasets = []
    for path in paths:
        uri, options = lance_location(path, storage_options)
        ds = ray.data.read_lance(uri, storage_options=options, num_cpus=read_cpus)
        datasets.append(ds.map_batches(validate_batch, fn_kwargs={"source": uri}, batch_size=rows,
                                       batch_format="pyarrow", num_cpus=read_cpus))
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def read_local(cfg, *, max_bytes: int | None = None) -> Iterator[pa.Table] | None:
    """The validated blocks of ``cfg.corpus``, read in this process (no Ray): the same readers and validation as
    ``read_corpus``, for inputs small enough that starting read tasks would cost more than reading. None when
    that is not possible: a Lance corpus, a folder on an object store, or more than ``max_bytes`` of input."""
    options = cfg.storage.storage_options
    spec, paths = RowSpec.from_config(cfg), expand_paths(cfg.corpus.path, options)
    fmt = cfg.corpus.format if cfg.corpus.format != "auto" else detect_format(paths)
    if fmt not in ("jsonl", "csv", "parquet"):
        return None
    files = _local_files(paths, fmt, options)
    if files is None or (max_bytes is not None and sum(size for _, size in files) > max_bytes):
        return None
    return _read_files([f for f, _ in files], fmt, spec, cfg.corpus.rows_per_block, options)


def _read_files(files: list[str], fmt: str, spec: RowSpec, rows: int, options=None) -> Iterator[pa.Table]:
    for path in files:
        with _open_path(path, random_access=fmt == "parquet", options=options) as stream:
            records = (iter_jsonl_records(stream) if fmt == "jsonl" else
                       iter_csv_records(stream, spec.source_fields) if fmt == "csv" else
                       iter_parquet_records(stream, spec.source_fields, rows))
            try:
                yield from blocks(records, spec, redact(path), rows, coerce=fmt == "csv")
            except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # as _ParquetSource: quarantined
                if fmt != "parquet":
                    raise
                bad = iter([(None, Malformed("bad_parquet_file", f"Parquet file unreadable: {redact(str(exc))}", ""))])
                yield from blocks(bad, spec, redact(path), rows)


def _local_files(paths: list[str], fmt: str, options=None) -> list[tuple[str, int]] | None:
    """(file, bytes) of every input file in reading order; None when a folder is on an object store."""
    import pyarrow.fs as pafs

    out: list[tuple[str, int]] = []
    for p in paths:
        if "://" in p:
            fs, inner = filesystem(p, options)
            info = fs.get_file_info(inner)
            if info.type != pafs.FileType.File:
                return None
            out.append((p, info.size or 0))
        elif os.path.isdir(p):
            suffixes = tuple(s for s, f in FORMAT_BY_SUFFIX.items() if f == fmt)
            for name in sorted(os.listdir(p)):
                full = os.path.join(p, name)
                if not name.startswith((".", "_")) and os.path.isfile(full) and \
                        name.removesuffix(".gz").endswith(suffixes):
                    out.append((full, os.path.getsize(full)))
        else:
            out.append((p, os.path.getsize(p)))
    return out


def corpus_fingerprint(cfg) -> str | None:
    """``Store.content_fingerprint`` of the table the index job would build from ``cfg.corpus`` (read here,
    without Ray): first row of each id wins, bad rows left out. None for inputs not read here (Lance)."""
    import pyarrow.compute as pc

    local = read_local(cfg)
    if local is None:
        return None
    first: dict[str, str] = {}
    for block in local:
        good = block.filter(pc.and_(pc.is_null(block[S.REASON_CODE]), pc.invert(pc.fill_null(block[S.DELETED], False))))
        for doc, h in zip(good[S.ID].to_pylist(), good[S.CONTENT_HASH].to_pylist()):
            first.setdefault(doc, h)
    from pipelines.store import fingerprint_rows

    return fingerprint_rows(pa.table({S.ID: list(first), S.CONTENT_HASH: list(first.values())}))


def _open_path(path: str, random_access: bool, options=None):
    """A local path or a URI, as the index job's readers open it (compression detected from the extension)."""
    import pyarrow as pa

    if "://" not in path:
        return pa.memory_map(path) if random_access else pa.input_stream(path)
    fs, inner = filesystem(path, options)
    return fs.open_input_file(inner) if random_access else fs.open_input_stream(inner)
