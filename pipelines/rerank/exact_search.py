"""Exact vector search as matrix products over one pinned passages version, held in memory.

The ``vector`` column of a Lance table version is read once (streamed in batches into one preallocated float32
matrix, rows normalised for ``cosine``); each call then scores many queries at once with chunked matrix products
(numpy/BLAS on CPU; torch on CUDA when a GPU is visible and torch is installed) and keeps each query's top k
(``argpartition``, then a sort; ties go to the lower row position). Hits come back as ``CandidateSearch.vector``
returns them: per query a table of the requested columns and ``score`` (``pipelines.store.distance_to_score`` of
LanceDB's distance for the metric), best first; title/text are fetched for the hits only, by row position, from
the same version.

``resolve_method`` picks the search method for ``retrieve.exact`` (``auto``: the matrix product while it is faster
than ANN search, measured by ``benchmarks/retrieval_crossover.py``).

Example::

    exact = ExactSearch(store.passages(version), "cosine", columns=("id", "text"))
    hits = exact.tables(query_vectors, k=100)  # one pa.Table per query
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pyarrow as pa

from pipelines import schema as S

log = logging.getLogger(__name__)

METHODS = ("matmul", "ann", "lance_flat")
CHUNK_BYTES = 256 << 20  # scores held at once per chunk of queries x rows
LOAD_BATCH_ROWS = 65_536
RESCORE_QUERIES = 64  # queries whose hits are scored again at once


def _defaults() -> tuple[int, int]:
    from pipelines.config import RetrieveConfig

    fields = RetrieveConfig.model_fields
    return fields["exact_max_rows"].default, fields["exact_max_bytes"].default


def has_ann_index(table) -> bool:
    """Whether the table (at its checked-out version) has a vector index on ``vector``."""
    from pipelines.store import has_vector_index

    return has_vector_index(table)


def choose_method(exact, *, rows: int, dim: int, has_ann: bool, max_rows: int | None = None,
                  max_bytes: int | None = None) -> tuple[str, str]:
    """(method, why) for ``retrieve.exact``: ``matmul`` (this module), ``ann`` (LanceDB's ANN index) or
    ``lance_flat`` (LanceDB's flat scan).

    * ``auto``: ``matmul`` when the vectors (rows x dim x 4 bytes) fit ``max_bytes`` and, if there is an ANN index,
      rows <= ``max_rows`` (above it ANN search is faster); otherwise ANN, or LanceDB's flat scan without an index;
    * ``true``: always exact: ``matmul``, or ``lance_flat`` when the vectors do not fit ``max_bytes``;
    * ``false``: never exact: the ANN index (LanceDB scans when there is none, as before);
    * ``lance_flat``: LanceDB's flat scan."""
    d_rows, d_bytes = _defaults()
    max_rows = d_rows if max_rows is None else max_rows
    max_bytes = d_bytes if max_bytes is None else max_bytes
    nbytes = rows * dim * 4
    fits = nbytes <= max_bytes
    no_ann = "lance_flat" if not has_ann else "ann"
    if exact == "lance_flat":
        return "lance_flat", "retrieve.exact: lance_flat"
    if exact is False:
        return no_ann, "retrieve.exact: false" + ("" if has_ann else " (no ANN index: LanceDB scans)")
    if exact is True:
        if fits:
            return "matmul", "retrieve.exact: true"
        return "lance_flat", f"retrieve.exact: true, vectors {nbytes:,} B > exact_max_bytes {max_bytes:,}"
    if exact != "auto":
        raise ValueError(f"retrieve.exact must be auto, true, false or lance_flat (got {exact!r})")
    if not fits:
        return no_ann, f"auto: vectors {nbytes:,} B > exact_max_bytes {max_bytes:,}"
    if has_ann and rows > max_rows:
        return "ann", f"auto: {rows:,} rows > exact_max_rows {max_rows:,} (ANN search is faster)"
    return "matmul", (f"auto: {rows:,} rows <= exact_max_rows {max_rows:,}" if has_ann
                      else f"auto: no ANN index, {rows:,} rows fit exact_max_bytes")


def resolve_method(table, exact, *, max_rows: int | None = None, max_bytes: int | None = None) -> tuple[str, str]:
    """``choose_method`` for a LanceDB table at its checked-out version."""
    dim = table.schema.field(S.VECTOR).type.list_size
    return choose_method(exact, rows=table.count_rows(), dim=dim, has_ann=has_ann_index(table),
                         max_rows=max_rows, max_bytes=max_bytes)


def configured_method(cfg, passages_version: int | str | None = None) -> tuple[str | None, str]:
    """(method, why) that ``CandidateSearch`` picks for ``cfg.retrieve`` on passages at ``passages_version``
    (default: the latest); (None, ...) for ``retrieve.source: fts`` (no vector search)."""
    from pipelines.store import Store

    rt = cfg.retrieve
    if rt.source == "fts":
        return None, "full-text search only"
    return resolve_method(Store(cfg.storage).passages(passages_version), rt.exact, max_rows=rt.exact_max_rows,
                          max_bytes=rt.exact_max_bytes)


def method_for_report(cfg, passages_version: int | None) -> dict:
    """``{"method": ..., "method_reason": ...}`` of ``configured_method`` for a run report; never raises (a failed
    run's report is written too)."""
    if passages_version is None:
        return {"method": None, "method_reason": "passages not read"}
    try:
        method, why = configured_method(cfg, passages_version)
    except Exception as exc:  # noqa: BLE001 - the report must be written whatever happened
        return {"method": None, "method_reason": f"unknown ({type(exc).__name__}: {exc})"}
    return {"method": method, "method_reason": why}


def _torch_cuda(device: str):
    """The torch module when the matrix product should run on CUDA, else None (numpy on CPU)."""
    if device not in ("auto", "cuda"):  # cpu, or mps: numpy
        return None
    if device == "auto" and "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia"):
        return None  # no GPU driver visible: do not import torch just to find out
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        if device == "cuda":
            log.warning("exact search: device cuda requested but not available here; running on CPU")
        return None
    return torch


def _top(scores: np.ndarray, k: int, key: np.ndarray | None = None) -> np.ndarray:
    """Column indices of each row's ``k`` best scores, best first; equal scores in ascending ``key`` (default: the
    column index), so that the result does not depend on how the rows were split."""
    m, n = scores.shape
    k = min(k, n)
    if key is None and n >= 8 * k and k > 0:
        return _top_sampled(scores, k)
    if key is None:
        key = np.broadcast_to(np.arange(n), (m, n))
    if k == n:
        cand = np.broadcast_to(np.arange(n), (m, n)).copy()
    else:
        cand = np.argpartition(scores, n - k, axis=1)[:, n - k:]
        thr = np.take_along_axis(scores, cand, 1).min(axis=1)
        for r in np.flatnonzero(np.count_nonzero(scores >= thr[:, None], axis=1) > k):  # ties across the cut
            c = np.flatnonzero(scores[r] >= thr[r])
            cand[r] = c[np.lexsort((key[r, c], -scores[r, c]))[:k]]
    s = np.take_along_axis(scores, cand, 1)
    order = np.lexsort((np.take_along_axis(key, cand, 1), -s), axis=1)
    return np.take_along_axis(cand, order, 1)


def _nonzero_ge(scores: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero(scores >= thr[:, None])`` (by row, then column), about 3x faster when few pass: the mask is
    searched 8 bytes at a time, then only the words with a hit byte by byte."""
    m, n = scores.shape
    size = m * n
    buf = np.zeros(-(-size // 8) * 8, bool)
    np.greater_equal(scores, thr[:, None], out=buf[:size].reshape(m, n))
    words = np.flatnonzero(buf.view(np.uint64))
    wi, bi = np.nonzero(buf.reshape(-1, 8)[words])
    return np.divmod(words[wi] * 8 + bi, n)


def _top_sampled(scores: np.ndarray, k: int) -> np.ndarray:
    """``_top`` by a threshold: a score that about 2k of the row pass, from a strided sample of the row (a partition
    of 1/stride of it, not of all of it); the rows whose threshold lets fewer than k through go the exact way."""
    m, n = scores.shape
    stride = max(1, k // 8)
    sample = scores[:, ::stride]
    j = min(sample.shape[1], -(-2 * k // stride))
    thr = np.partition(sample, sample.shape[1] - j, axis=1)[:, sample.shape[1] - j]
    r, c = _nonzero_ge(scores, thr)
    count = np.bincount(r, minlength=m)
    out = np.empty((m, k), np.int64)
    short = count < k
    if short.any():
        out[short] = _top(scores[short], k, key=np.broadcast_to(np.arange(n), (int(short.sum()), n)))
        keep = ~short[r]
        r, c = r[keep], c[keep]
    order = np.lexsort((c, -scores[r, c], r))  # by row, best first, ties by column
    start = np.concatenate([[0], np.cumsum(np.where(short, 0, count))])
    ok = np.flatnonzero(~short)
    take = (start[ok][:, None] + np.arange(k)).ravel()
    out[ok] = c[order[take]].reshape(len(ok), k)
    return out


class ExactSearch:
    """Top-k by exact matrix products over one table version held in memory (see the module doc)."""

    def __init__(self, table, metric: str, *, columns=(S.ID,), device: str = "auto", chunk_bytes: int = CHUNK_BYTES,
                 batch_rows: int = LOAD_BATCH_ROWS):
        if metric not in ("cosine", "dot", "l2"):
            raise ValueError(f"unknown metric {metric!r}; use cosine, dot or l2")
        from pipelines.store import dataset

        self.ds = dataset(table)  # the checked-out version, as a Lance dataset (whole columns, rows by position)
        self.metric, self.chunk_bytes = metric, max(4, int(chunk_bytes))
        self.columns = list(dict.fromkeys([S.ID, *columns]))
        self.version = self.ds.version
        n, dim = self.ds.count_rows(), self.ds.schema.field(S.VECTOR).type.list_size
        mat = np.empty((n, dim), np.float32)
        valid = np.ones(n, bool)
        ids, at = [], 0
        for batch in self.ds.to_batches(columns=[S.ID, S.VECTOR], batch_size=batch_rows):
            m, vec = batch.num_rows, batch.column(S.VECTOR)
            if at + m > n:
                raise RuntimeError(f"passages version {self.version} scanned more rows than its {n} rows")
            flat = vec.values.slice(vec.offset * dim, m * dim).to_numpy(zero_copy_only=False)
            mat[at:at + m] = flat.reshape(m, dim)
            if vec.null_count:
                valid[at:at + m] = vec.is_valid().to_numpy(zero_copy_only=False)
            ids.append(batch.column(S.ID))
            at += m
        if at != n:
            raise RuntimeError(f"passages version {self.version} scanned {at} rows of {n}")
        self.ids = pa.concat_arrays(ids) if ids else pa.array([], self.ds.schema.field(S.ID).type)
        self.positions = np.arange(n, dtype=np.int64)  # matrix row -> row position in the version (take)
        if not valid.all():  # rows without a vector are never candidates (LanceDB skips them too)
            self.positions = np.flatnonzero(valid)
            mat, self.ids = mat[valid], self.ids.take(pa.array(self.positions))
        if metric == "cosine":
            norms = np.linalg.norm(mat, axis=1)
            mat /= np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
        self.sq = np.einsum("ij,ij->i", mat, mat) if metric == "l2" else None
        self.rows, self.dim = mat.shape
        self.torch = _torch_cuda(device)
        self.device = "cuda" if self.torch is not None else "cpu"
        if self.torch is not None:
            self.mat = self.torch.from_numpy(mat).to("cuda")
            self.sq = self.torch.from_numpy(self.sq).to("cuda") if self.sq is not None else None
        else:
            self.mat = mat
        log.info("exact search: %d x %d vectors of passages version %d in memory (%s, %.1f MiB)", self.rows,
                 self.dim, self.version, self.device, mat.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4

    # -- scoring ----------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(matrix rows, scores), each (queries, min(k, rows)), best first; scores as ``distance_to_score``."""
        from pipelines.store import distance_to_score

        q = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim))
        k = min(int(k), self.rows)
        if len(q) == 0 or k == 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        if self.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1), np.finfo(np.float32).tiny)[:, None]
        block = max(1, min(self.rows, self.chunk_bytes // 4))  # rows per block: one query's scores fit
        per_chunk = max(1, min(len(q), self.chunk_bytes // (4 * block)))
        rows = np.empty((len(q), k), np.int64)
        for a in range(0, len(q), per_chunk):
            parts = [self._block_top(q[a:a + per_chunk], lo, min(lo + block, self.rows), k)
                     for lo in range(0, self.rows, block)]
            r, _ = parts[0] if len(parts) == 1 else self._merge(parts, k)
            rows[a:a + len(r)] = r
        # The hits' scores again, one (query, row) pair at a time: BLAS rounds differently for other chunk
        # shapes, and these do not depend on the chunking (nor does the order, sorted again on them).
        score = distance_to_score(self._distances(q, rows), self.metric).astype(np.float32)
        order = np.lexsort((rows, -score), axis=1)
        return np.take_along_axis(rows, order, 1), np.take_along_axis(score, order, 1)

    def _distances(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """LanceDB's distance of each query to its hits: l2 |q - d|^2, cosine 1 - cos (rows normalised), dot
        1 - q.d; in fixed groups of queries, each a sum along the dimension in the same order."""
        out = np.empty(rows.shape, np.float32)
        for a in range(0, len(q), RESCORE_QUERIES):
            r, qq = rows[a:a + RESCORE_QUERIES], q[a:a + RESCORE_QUERIES]
            if self.torch is not None:
                g = self.mat[self.torch.from_numpy(r).to("cuda")]
                qq = self.torch.from_numpy(qq).to("cuda")[:, None, :]
                d = ((g - qq) ** 2).sum(-1) if self.metric == "l2" else 1 - (g * qq).sum(-1)
                out[a:a + len(r)] = d.cpu().numpy()
            else:
                g = self.mat[r]
                if self.metric == "l2":
                    g -= qq[:, None, :]
                    out[a:a + len(r)] = np.einsum("qkd,qkd->qk", g, g)
                else:  # einsum's own loop: the same sums whatever the shape around them
                    out[a:a + len(r)] = np.float32(1) - np.einsum("qkd,qd->qk", g, qq)
        return out

    def _block_top(self, q: np.ndarray, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Matrix rows and similarities of each query's best k among rows [lo, hi), best first."""
        if self.torch is not None:
            return self._block_top_cuda(q, lo, hi, k)
        s = q @ self.mat[lo:hi].T
        if self.sq is not None:
            s *= 2
            s -= self.sq[lo:hi]
        cand = _top(s, k)
        return cand + lo, np.take_along_axis(s, cand, 1)

    def _block_top_cuda(self, q: np.ndarray, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        s = torch.from_numpy(q).to("cuda") @ self.mat[lo:hi].T
        if self.sq is not None:
            s.mul_(2).sub_(self.sq[lo:hi])
        kk = min(k, hi - lo)
        vals, idx = torch.topk(s, kk, dim=1, largest=True, sorted=False)
        thr = vals.min(dim=1).values
        over = torch.nonzero((s >= thr[:, None]).sum(dim=1) > kk).flatten().cpu().numpy()
        vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        for r in over:  # ties across the cut: the same choice as on CPU
            row = s[int(r)].cpu().numpy()[None, :]
            c = _top(row, kk)[0]
            idx[r], vals[r] = c, row[0, c]
        order = np.lexsort((idx, -vals), axis=1)
        idx = np.take_along_axis(idx, order, 1).astype(np.int64)
        return idx + lo, np.take_along_axis(vals, order, 1)

    @staticmethod
    def _merge(parts, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.concatenate([r for r, _ in parts], axis=1)
        sims = np.concatenate([s for _, s in parts], axis=1)
        best = _top(sims, k, key=rows)
        return np.take_along_axis(rows, best, 1), np.take_along_axis(sims, best, 1)

    # -- hits as tables ---------------------------------------------------------------------
    def tables(self, vectors: np.ndarray, k: int, columns=None) -> list[pa.Table]:
        """Per query a table of ``columns`` (default: the constructor's) and ``score``, best first."""
        columns = list(dict.fromkeys([S.ID, *(columns or self.columns)]))
        rows, scores = self.search(vectors, k)
        flat = rows.ravel()
        data = {S.ID: self.ids.take(pa.array(flat))}
        extra = [c for c in columns if c != S.ID]
        if extra:  # title/text of the hits only, by row position in the same version
            uniq, inverse = np.unique(self.positions[flat], return_inverse=True)
            fetched = self.ds.take(uniq, columns=extra) if len(uniq) else self.ds.schema.empty_table().select(extra)
            fetched = fetched.take(pa.array(inverse.ravel()))
            data.update({c: fetched.column(c).combine_chunks() for c in extra})
        fields = [self.ds.schema.field(c) for c in columns]  # types and nullability as LanceDB's results have them
        schema = pa.schema([pa.field(f.name, f.type, f.nullable) for f in fields])
        hits = pa.table([data[c].cast(schema.field(c).type) for c in columns], schema=schema)
        hits = hits.append_column("score", pa.array(scores.ravel(), pa.float32()))
        per = rows.shape[1]
        return [hits.slice(i * per, per) for i in range(rows.shape[0])]
