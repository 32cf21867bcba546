"""The index job's commit at scale: one commit of a night's staging table into a large ``passages`` table.

    .venv/bin/python benchmarks/merge_insert_scale.py [--rows 250000 1000000 4000000] [--dim 32] [--changed 0.01]

Users report LanceDB upserts running out of memory on large tables (lance#1983: memory grows with the target table,
not the batch) and updating nothing when a scalar index is on the key (the second is a test:
``tests/test_store.py::test_upserts_update_rows_when_the_key_has_a_scalar_index``). This measures the first, on
batchrank's own commit (``Store.commit_passages``), for each table size in a fresh process:

1. a synthetic ``passages`` table of N one-passage documents (random ``--dim`` vectors, ~60 characters of text),
   written through a staging table and ``commit_passages`` as a first run writes it, then the id and passage-id
   B-trees the upkeep builds (no ANN or full-text index: their upkeep is measured by ``memory_stream.py``);
2. ``upsert_only``: ``--changed`` of the documents changed (new content hash, still one passage), staged, then
   ``commit_passages`` without deletions: the ``merge_insert`` alone;
3. ``night``: another ``--changed`` of the documents changed (2 passages where they had 1, so the commit also
   inserts), 0.1% new and 0.1% deleted, then ``commit_passages`` with those deletions, as the index job commits;
each timed, with the process's RSS sampled every 20 ms, and the table read back to check the commit's counts.

The commit was a ``merge_insert`` on passage_id with ``when_not_matched_by_source_delete(id IN (...))`` until
issue 20: its memory grew with the table (+267 MiB at 1M rows, +1,411 MiB at 4M, all of it the delete clause's
join); it is now ``staging.delete_and_append`` (deletion vectors on the fragments holding a gone or rewritten
document, the staged rows as new fragments, one Lance ``Update`` commit). The merge_insert figures are kept in the
result file under ``merge_insert_before`` (measured on 2026-12-07 07:52 UTC, same machine).

Writes ``benchmarks/results/merge_insert_scale.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHUNK = 250_000  # rows per staging append


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/merge_insert_scale.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child: one size
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.dim, args.changed)))
        return
    runs = []
    for n in args.rows:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--changed",
                              str(args.changed)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(_line(runs[-1]), flush=True)
    result = {"benchmark": "merge_insert_scale", "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat(),
              "machine": {"cpu": _cpu(), "cpus": os.cpu_count()}, "dim": args.dim, "changed": args.changed,
              "runs": runs}
    if Path(args.out).exists():  # the merge_insert commit's figures, measured before it was replaced, stay
        old = json.loads(Path(args.out).read_text())
        result["merge_insert_before"] = old.get("merge_insert_before") or {
            k: old.get(k) for k in ("command", "date", "machine", "runs")}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"CPU: {_cpu()} ({os.cpu_count()} cores); wrote {args.out}")


def _rows(ids: list[str], dim: int, version: str, passages: int = 1):
    import numpy as np
    import pyarrow as pa

    from pipelines import schema as S

    rng = np.random.default_rng(zlib.crc32(f"{ids[0]}:{version}".encode()))
    doc = [i for i in ids for _ in range(passages)]
    n = len(doc)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    number = [p for _ in ids for p in range(passages)]
    return pa.table({
        S.ID: doc, S.PASSAGE_ID: [f"{d}#{p}" for d, p in zip(doc, number)], S.PASSAGE: pa.array(number, pa.int32()),
        S.PASSAGE_START: pa.array([p * 60 for p in number], pa.int64()),
        S.PASSAGE_END: pa.array([p * 60 + 60 for p in number], pa.int64()),
        S.TITLE: [f"title {d}" for d in doc], S.TEXT: [f"{version} text of document {d} " + "x" * 30 for d in doc],
        S.VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
        S.CONTENT_HASH: [f"{version}-{d}" for d in doc], S.MODEL: ["synthetic"] * n,
        S.PASSAGE_SETTINGS: ["{}"] * n, S.EMBEDDED_AT: pa.array([None] * n, S.TIMESTAMP),
        S.RUN_ID: [version] * n,
    }, schema=S.passages_schema({}, dim))


def _one(n: int, dim: int, changed: float) -> dict:
    import psutil

    from pipelines import schema as S
    from pipelines.config import parse_config
    from pipelines.store import Store

    work = tempfile.mkdtemp(prefix="batchrank-merge-")
    cfg = parse_config({"storage": {"uri": work}, "corpus": {"path": "x.jsonl"},
                        "index": {"ann": {"type": "none"}, "fts": {"enabled": False}}})
    store, proc = Store(cfg.storage), psutil.Process()
    ids = [f"d{i:09d}" for i in range(n)]
    out: dict = {"rows": n}

    def stage(run_id: str, parts) -> object:
        staged = store.stage(cfg.storage.passages_table, run_id, S.passages_schema({}, dim))
        for part in parts:
            staged.add(part)
        return staged

    started = time.monotonic()
    staged = stage("build", (_rows(ids[i:i + CHUNK], dim, "v1") for i in range(0, n, CHUNK)))
    store.commit_passages(staged, "build")
    staged.drop()
    store.ensure_indexes(cfg.index)  # the id and passage_id B-trees, as the upkeep builds them
    out["build_seconds"] = round(time.monotonic() - started, 1)

    k = max(1, int(n * changed))
    step = n // k
    out["table_bytes"] = sum(f.stat().st_size for f in Path(work).rglob("*") if f.is_file())
    # two nights on the same table: the upsert alone (the changed documents keep their passage count), then the
    # index job's full commit (a changed document's leftover passages and the deleted documents removed in it)
    out["upsert_only"] = _night(store, cfg, dim, proc, ids[2::step][:k], [], [], passages=1, version="v2")
    out["night"] = _night(store, cfg, dim, proc, ids[::step][:k], [f"n{i:09d}" for i in range(max(1, n // 1000))],
                          ids[1::step][:max(1, n // 1000)], passages=2, version="v3")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return out


def _night(store, cfg, dim: int, proc, changed_ids: list[str], new_ids: list[str], gone: list[str], *,
           passages: int, version: str) -> dict:
    """Stage the changed documents (``passages`` each) and the new ones, commit as the index job does (``gone``
    deleted in the same commit), timed with the process's RSS sampled every 20 ms; the table read back."""
    from pipelines import schema as S

    staged = store.stage(cfg.storage.passages_table, version, S.passages_schema({}, dim))
    staged.add(_rows(changed_ids, dim, version, passages=passages))
    if new_ids:
        staged.add(_rows(new_ids, dim, version))
    before = store.passages().count_rows()
    peak, base = [0], proc.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started = time.monotonic()
    store.commit_passages(staged, version, deletes=gone)
    seconds = time.monotonic() - started
    stop.set()
    watcher.join()
    staged.drop()
    table = store.passages()
    after = table.count_rows()
    staged_rows = passages * len(changed_ids) + len(new_ids)
    expected = before + (passages - 1) * len(changed_ids) + len(new_ids) - len(gone)
    return {"changed_documents": len(changed_ids), "new_documents": len(new_ids), "deleted": len(gone),
            "delete_clause": bool(gone), "staged_rows": staged_rows, "commit_seconds": round(seconds, 2),
            "rss_before_mib": round(base / 2**20), "rss_peak_mib": round(peak[0] / 2**20),
            "rss_growth_mib": round((peak[0] - base) / 2**20), "rows_before": before, "rows_after": after,
            "rows_expected": expected, "counts_right": after == expected
            and table.count_rows(f"{S.RUN_ID} = '{version}'") == staged_rows}


def _line(r: dict) -> str:
    text = f"{r['rows']:>10,} rows (built in {r['build_seconds']} s, {r['table_bytes'] / 2**20:,.0f} MiB on disk)"
    for name in ("upsert_only", "night"):
        n = r[name]
        text += (f"\n    {name}: {n['staged_rows']:,} staged rows, {n['deleted']:,} deleted -> commit "
                 f"{n['commit_seconds']} s, RSS {n['rss_before_mib']} -> peak {n['rss_peak_mib']} MiB "
                 f"(+{n['rss_growth_mib']}); counts right: {n['counts_right']}")
    return text


def _cpu() -> str:
    from common import cpu_model  # benchmarks/common.py

    return cpu_model()


if __name__ == "__main__":
    main()
