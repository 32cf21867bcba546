"""Read a corpus (JSONL, Parquet, CSV or Lance; a file, folder, glob or URI) as validated rows.

Reads top to bottom::

    expand_paths      corpus.path: globs expanded, a missing path refused (pipelines/files.py)
    read_corpus       Ray Data: one read task per file, streaming validated blocks of ``corpus.rows_per_block``
                      rows (several blocks per file, so that one file still feeds every embedding actor)
    read_local        the same blocks read in this process, without Ray, for inputs small enough
    corpus_fingerprint  the content fingerprint of the table the index job would build, read without Ray

Each file format is parsed by a plain generator of ``(row_number, record)`` pairs (``pipelines/files.py``),
so a malformed line (bad JSON, bad UTF-8, a CSV row with the wrong number of fields) becomes a quarantined
row instead of a crash. Ray is imported only by ``read_corpus``.

Example::

    ds = read_corpus(cfg.corpus, RowSpec.from_config(cfg))   # a ray.data.Dataset
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import files
from pipelines import schema as S
from pipelines.files import (
    FORMAT_BY_SUFFIX,
    detect_format,
    iter_csv_records,
    iter_jsonl_records,
    iter_parquet_records,
    open_path,
)
from pipelines.index.validate import Malformed, RowSpec, validate_records
from pipelines.schema import fingerprint_rows
from pipelines.store.objstore import filesystem, filesystem_paths, lance_location, redact

_CHUNK = 1 << 20  # bytes per read (and per CSV block) of the corpus readers; tests shrink it


def expand_paths(path: str | list[str], storage_options: dict[str, str] | None = None) -> list[str]:
    """``corpus.path`` expanded (``files.expand_paths``): globs listed, locally or with ``storage_options``; folders,
    files and URIs as given. Raise if nothing matches."""
    return files.expand_paths(path, storage_options, key="corpus.path")


def blocks(records: Iterator[tuple[int, Any]], spec: RowSpec, source: str, rows: int,
           coerce: bool = False) -> Iterator[pa.Table]:
    """Validate records in blocks of ``rows`` rows."""
    while True:
        chunk = list(islice(records, rows))
        if not chunk:
            return
        yield validate_records(chunk, spec, source=source, coerce=coerce)


def read_corpus(corpus_cfg, spec: RowSpec, *, read_cpus: float = 0.1, storage_options: dict[str, str] | None = None,
                rows: int | None = None):
    """Ray Dataset of validated rows (see ``schema.validated_schema``) for the configured corpus, in blocks of
    ``rows`` rows (default ``corpus.rows_per_block``); an object store is reached with ``storage_options``
    (``storage.storage_options``), in every read task."""
    import ray.data

    paths = expand_paths(corpus_cfg.path, storage_options)
    fmt = corpus_cfg.format if corpus_cfg.format != "auto" else detect_format(paths)
    rows = rows or corpus_cfg.rows_per_block
    if fmt == "lance":
        return _read_lance(paths, spec, rows, read_cpus, storage_options)
    datasource_cls = _datasources().get(fmt)
    if datasource_cls is None:
        raise ValueError(f"cannot tell the format of corpus.path {redact(str(corpus_cfg.path))!r}; "
                         "set corpus.format to jsonl, parquet, csv or lance")
    fs, paths = filesystem_paths(paths, storage_options)  # the filesystem travels to the read tasks
    source = datasource_cls(paths, spec=spec, rows=rows, filesystem=fs)
    return ray.data.read_datasource(source, num_cpus=read_cpus)


@functools.cache
def _datasources() -> dict[str, type]:
    """The Ray Data datasource of each file format, defined on first use: importing this module does not import
    Ray. Each streams one file per read task, in validated blocks of ``rows`` rows."""
    from ray.data.datasource import FileBasedDatasource

    class _CorpusSource(FileBasedDatasource):
        def __init__(self, paths: list[str], *, spec: RowSpec, rows: int, extensions: list[str], filesystem=None):
            super().__init__(paths, filesystem=filesystem, file_extensions=extensions)
            self._spec, self._rows = spec, rows

    class _JsonlSource(_CorpusSource):
        def __init__(self, paths: list[str], *, spec: RowSpec, rows: int, filesystem=None):
            super().__init__(paths, spec=spec, rows=rows, extensions=["jsonl", "json", "ndjson", "gz"],
                             filesystem=filesystem)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            yield from blocks(iter_jsonl_records(f, _CHUNK), self._spec, path, self._rows)

    class _CsvSource(_CorpusSource):
        def __init__(self, paths: list[str], *, spec: RowSpec, rows: int, filesystem=None):
            super().__init__(paths, spec=spec, rows=rows, extensions=["csv", "gz"], filesystem=filesystem)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            records = iter_csv_records(f, self._spec.source_fields, _CHUNK)
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

    return {"jsonl": _JsonlSource, "csv": _CsvSource, "parquet": _ParquetSource}


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
    found = _local_files(paths, fmt, options)
    if found is None or (max_bytes is not None and sum(size for _, size in found) > max_bytes):
        return None
    return _read_files([f for f, _ in found], fmt, spec, cfg.corpus.rows_per_block, options)


def mean_input_chars(cfg, rows: int = 1024) -> float | None:
    """Mean characters of the embedding input over the corpus's first ``rows`` good rows, read here (None: none
    readable here, e.g. a Lance corpus or a folder on an object store): what sizes a CPU embedding call."""
    blocks = read_local(cfg)
    if blocks is None:
        return None
    chars = n = 0
    try:
        for block in blocks:
            lengths = pc.utf8_length(block[S.EMBED_INPUT]).drop_null()
            chars, n = chars + (pc.sum(lengths).as_py() or 0), n + len(lengths)
            if n >= rows:
                break
    except (OSError, pa.ArrowException, UnicodeDecodeError, ValueError):
        return None  # the run itself reports an unreadable corpus, row by row or file by file
    finally:
        blocks.close()
    return chars / n if n else None


def corpus_size(cfg) -> int | None:
    """Bytes of the corpus's input files (None: a Lance dataset, or a folder on an object store)."""
    options = cfg.storage.storage_options
    paths = expand_paths(cfg.corpus.path, options)
    fmt = cfg.corpus.format if cfg.corpus.format != "auto" else detect_format(paths)
    if fmt not in ("jsonl", "csv", "parquet"):
        return None
    found = _local_files(paths, fmt, options)
    return None if found is None else sum(size for _, size in found)


def _read_files(paths: list[str], fmt: str, spec: RowSpec, rows: int, options=None) -> Iterator[pa.Table]:
    for path in paths:
        with open_path(path, random_access=fmt == "parquet", options=options) as stream:
            records = (iter_jsonl_records(stream, _CHUNK) if fmt == "jsonl" else
                       iter_csv_records(stream, spec.source_fields, _CHUNK) if fmt == "csv" else
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
    local = read_local(cfg)
    if local is None:
        return None
    first: dict[str, str] = {}
    for block in local:
        good = block.filter(pc.and_(pc.is_null(block[S.REASON_CODE]), pc.invert(pc.fill_null(block[S.DELETED], False))))
        for doc, h in zip(good[S.ID].to_pylist(), good[S.CONTENT_HASH].to_pylist()):
            first.setdefault(doc, h)
    return fingerprint_rows(pa.table({S.ID: list(first), S.CONTENT_HASH: list(first.values())}))
