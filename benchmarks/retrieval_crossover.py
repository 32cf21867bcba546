"""Exact matrix-product retrieval vs ANN vs LanceDB's flat scan, by table size: where does ``retrieve.exact: auto``
switch to ANN?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/retrieval_crossover.py [--sizes 20000 100000 300000]
        [--matmul-sizes 600000]

Per size: a passages-like LanceDB table of 384-d vectors, half random unit vectors and half clustered (centres
with noise: closer to real embeddings), the ANN index the index job builds (``index.ann`` defaults: IVF-HNSW-SQ,
``round(sqrt(n) / 2)`` partitions, nprobes 20), then the same queries (half random, half near a cluster) top-100
through ``CandidateSearch`` three ways, as the retrieve actor runs them (batches of ``retrieve.queries_per_call``,
interleaved: one batch of each method in turn, so that a shared machine's load weighs on all alike):

* ``matmul``: ``exact: true``, the in-memory matrix product (load time reported apart);
* ``ann``: ``exact: false``, LanceDB's ANN search (``search_threads`` threads of 32-query calls);
* ``lance_flat``: LanceDB's flat scan (fewer queries: it is slow).

``--matmul-sizes``: larger tables without an ANN index (building one takes minutes), matrix product and flat scan
only. recall@100 of ANN is against the matrix product's lists. The crossover is the size where ANN's queries/s
passes the matrix product's: interpolated between two measured sizes when ANN is faster at one of them; else
where the matrix product's time per query, fitted as a + b * rows over every size, reaches the time of an ANN
query at the largest size with ANN (ANN's speed barely changes with size; it slows a little, so this errs
towards ANN). Writes ``benchmarks/results/retrieval_crossover.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("LANCE_LOG", "error")

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, K = 384, 100


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, queries: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n vectors: half random unit, half around n/200 cluster centres; queries: half random, half near a centre."""
    half = n // 2
    centres = unit(rng.standard_normal((max(1, n // 200), DIM), dtype=np.float32))
    clustered = unit(centres[rng.integers(0, len(centres), n - half)]
                     + 0.6 / np.sqrt(DIM) * rng.standard_normal((n - half, DIM), dtype=np.float32))
    docs = np.concatenate([unit(rng.standard_normal((half, DIM), dtype=np.float32)), clustered])
    qh = queries // 2
    near = unit(centres[rng.integers(0, len(centres), queries - qh)]
                + 0.8 / np.sqrt(DIM) * rng.standard_normal((queries - qh, DIM), dtype=np.float32))
    return docs, np.concatenate([unit(rng.standard_normal((qh, DIM), dtype=np.float32)), near])


def measure(n: int, n_queries: int, flat_queries: int, workdir: Path, rng, ann: bool = True) -> dict:
    from pipelines.config import IndexConfig, RetrieveConfig, StorageConfig
    from pipelines.rerank.retrieve import CandidateSearch
    from pipelines.store import Store, _ann_config

    docs, queries = make_data(n, n_queries, rng)
    store = Store(StorageConfig(uri=str(workdir / f"db{n}")))
    vec = pa.FixedSizeListArray.from_arrays(pa.array(docs.ravel()), DIM)
    t0 = time.perf_counter()
    table = store.db.create_table("passages", pa.table({"id": [f"d{i}" for i in range(n)], "vector": vec}))
    del vec, docs
    write_s = time.perf_counter() - t0
    index_cfg, rt = IndexConfig(), RetrieveConfig()
    out = {"rows": n, "dim": DIM, "k": K, "queries": n_queries, "write_s": round(write_s, 2), "ann_index": None}
    if ann:
        config, params = _ann_config("ivf_hnsw_sq", index_cfg.metric, index_cfg.ann, n, DIM)
        t0 = time.perf_counter()
        table.create_index("vector", config=config, replace=True)
        out["ann_index"] = {"type": "ivf_hnsw_sq", **params, "nprobes": index_cfg.ann.nprobes,
                            "build_s": round(time.perf_counter() - t0, 1)}
    table = store.passages()
    common = {"k": K, "threads": rt.search_threads, "exact_max_bytes": 1 << 40}
    t0 = time.perf_counter()
    searches = {"matmul": CandidateSearch(store, table, index_cfg, exact=True, **common)}
    out["matmul_load_s"] = round(time.perf_counter() - t0, 3)
    if ann:
        searches["ann"] = CandidateSearch(store, table, index_cfg, exact=False, **common)
    searches["lance_flat"] = CandidateSearch(store, table, index_cfg, exact="lance_flat", **common)
    assert all(s.method == name for name, s in searches.items())
    # Interleaved, one batch of retrieve.queries_per_call each in turn, so that the load of the machine (shared
    # here) weighs on every method alike; the flat scan gets a slice of each batch.
    per_call = rt.queries_per_call
    batches = range(0, n_queries, per_call)
    flat_per_batch = max(1, flat_queries // len(batches))
    seconds = dict.fromkeys(searches, 0.0)
    counted = dict.fromkeys(searches, 0)
    ids: dict[str, list] = {name: [] for name in searches}
    for name, search in searches.items():
        search(queries[:4], [])  # warm up (caches, index pages)
    for a in batches:
        for name, search in searches.items():
            batch = queries[a:a + (flat_per_batch if name == "lance_flat" else per_call)]
            start = time.perf_counter()
            hits = search(batch, [])
            seconds[name] += time.perf_counter() - start
            counted[name] += len(batch)
            ids[name].extend(t["id"].to_pylist() for t in hits)
    for name, search in searches.items():
        search.__exit__(None, None, None)
        out[f"{name}_qps"] = round(counted[name] / seconds[name], 1)
    out["lance_flat_queries"] = counted["lance_flat"]
    truth = ids["matmul"]
    if ann:
        rec = np.array([len(set(a) & set(b)) / len(a) for a, b in zip(truth, ids["ann"])])
        half = n_queries // 2
        out["ann_recall_at_k"] = round(float(rec.mean()), 3)
        out["ann_recall_random_queries"] = round(float(rec[:half].mean()), 3)
        out["ann_recall_clustered_queries"] = round(float(rec[half:].mean()), 3)
    flat_truth = [truth[a + i] for a in batches for i in range(flat_per_batch) if a + i < n_queries]
    out["lance_flat_same_ids_as_matmul"] = round(float(np.mean([x == y for x, y in zip(ids["lance_flat"], flat_truth)])), 3)
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out), flush=True)
    del searches
    store.db.drop_table("passages")
    return out


def crossover(points: list[dict]) -> tuple[int | None, str]:
    """(rows, how): where ANN's queries/s passes the matrix product's (see the module doc)."""
    with_ann = [p for p in points if "ann_qps" in p]
    if not with_ann:
        return None, "no size with ANN measured"
    for a, b in itertools.pairwise(with_ann):
        ra, rb = np.log(a["matmul_qps"] / a["ann_qps"]), np.log(b["matmul_qps"] / b["ann_qps"])
        if ra >= 0 > rb:
            t = ra / (ra - rb)
            return (int(np.rint(np.exp(np.log(a["rows"]) + t * (np.log(b["rows"]) - np.log(a["rows"]))))),
                    "interpolated between measured sizes")
    if with_ann[0]["matmul_qps"] < with_ann[0]["ann_qps"]:
        return with_ann[0]["rows"], "ANN faster at the smallest size"
    n = np.array([p["rows"] for p in points], float)
    per_query = np.array([1 / p["matmul_qps"] for p in points])
    b, a = np.polyfit(n, per_query, 1)
    ann_s = 1 / with_ann[-1]["ann_qps"]
    if b <= 0:
        return None, "the matrix product's time per query does not grow with rows here (too noisy to fit)"
    how = (f"fit: matmul s/query = {a:.2e} + {b:.3e} * rows; ANN {with_ann[-1]['ann_qps']} q/s at "
           f"{with_ann[-1]['rows']:,} rows")
    return int(np.rint((ann_s - a) / b)), how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 300_000])
    ap.add_argument("--matmul-sizes", type=int, nargs="*", default=[600_000])
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--flat-queries", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/retrieval_crossover.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="batchrank-crossover-") as tmp:
        points = [measure(n, args.queries, args.flat_queries, Path(tmp), rng) for n in args.sizes]
        points += [measure(n, args.queries, args.flat_queries, Path(tmp), rng, ann=False) for n in args.matmul_sizes]
    points.sort(key=lambda p: p["rows"])
    rows, how = crossover(points)
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]},
              "sizes": points, "crossover_rows": rows, "crossover": how,
              "seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'rows':>8} {'matmul q/s':>11} {'ANN q/s':>9} {'ANN recall@100':>15} {'flat q/s':>9}")
    for p in points:
        ann = f"{p['ann_qps']:>9.1f} {p['ann_recall_at_k']:>15.3f}" if "ann_qps" in p else f"{'-':>9} {'-':>15}"
        print(f"{p['rows']:>8,} {p['matmul_qps']:>11.1f} {ann} {p['lance_flat_qps']:>9.1f}")
    print(f"crossover (ANN faster above): {rows} rows ({how}); {result['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
