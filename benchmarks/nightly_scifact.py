"""A night of batchrank against a full run, on SciFact: incremental reindex and cached reranking, as ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/nightly_scifact.py [--data ../shared/data/scifact]

One process, one local Ray (started before the first timing, as a cluster is up before a job starts):
1. full index: the 5,183 SciFact abstracts into an empty database with the packaged all-MiniLM-L6-v2
   (ANN index built: ``index.ann.min_rows`` 1,000; BM25 on title and text);
2. full rerank: the 300 test claims as the query log, hybrid top-100 candidates each, scored by a
   MiniLM-L6 cross-encoder (all-MiniLM-L6-v2's weights with a new one-logit head: the same architecture and
   cost as cross-encoder/ms-marco-MiniLM-L6-v2, which cannot be downloaded here), empty pair-score cache;
3. night 2, ``nightly.run``: 1% of the documents changed (26 edited, 13 deleted, 13 new) and a query log in
   which 10% of the queries are new (270 of the test claims + 30 train claims);
4. night 3: the corpus as it was, 10% new queries again (other train claims): the rerank night of the goal;
5. night 4: nothing changed (nothing may be embedded or scored).
Goals: night 2's index stage <= 5% of the full index's wall time; night 3's rerank stage <= 15% of the full
rerank's (night 2's rerank, where changed documents also miss the cache, is reported too).
Writes ``benchmarks/results/nightly_scifact.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--work", default=str(Path("~/.batchrank/nightly-scifact").expanduser()))
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/nightly_scifact.json"))
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)  # a full run starts from an empty database
    work.mkdir(parents=True)

    docs = [json.loads(line) for line in open(data / "corpus.jsonl", encoding="utf-8")]
    queries = {q["_id"]: q["text"] for q in map(json.loads, open(data / "queries.jsonl", encoding="utf-8"))}
    test_ids = _judged(data / "qrels/test.tsv")
    train_ids = [q for q in _judged(data / "qrels/train.tsv") if q not in set(test_ids)]
    rng = random.Random(5)

    _write(work / "corpus-1.jsonl", docs)
    night2 = _change(docs, rng)
    _write(work / "corpus-2.jsonl", night2["docs"])
    now = datetime.now(UTC)
    log1 = [queries[q] for q in test_ids]
    tenth = len(log1) // 10
    new, new3 = ([queries[q] for q in train_ids[i * tenth:(i + 1) * tenth]] for i in (0, 1))
    log2, log3 = log1[: len(log1) - tenth] + new, log1[: len(log1) - tenth] + new3
    for name, log in (("log-1", log1), ("log-2", log2), ("log-3", log3)):
        _write(work / f"{name}.jsonl", _log(log, now))
    ce = _cross_encoder(work / "cross-encoder", args.max_length)

    from pipelines import nightly
    from pipelines.cluster.runtime import init_ray
    from pipelines.config import parse_config
    from pipelines.index import job as index
    from pipelines.rerank import job as rerank

    def config(corpus: str, log: str):
        return parse_config({
            "storage": {"uri": str(work / "db")},
            "corpus": {"path": str(work / corpus)},
            "embed": {"model": "all-MiniLM-L6-v2", "batch_size": 16, "actors": 2},
            "index": {"ann": {"type": "auto", "min_rows": 1000}, "fts": {"columns": ["title", "text"]}},
            "query_log": {"path": str(work / log), "last_days": 1},
            "retrieve": {"k": args.k, "source": "hybrid"},
            "rerank": {"model": ce, "top_n": 20, "max_length": args.max_length, "batch_size": 32, "actors": 2},
        })

    cfg1, cfg2 = config("corpus-1.jsonl", "log-1.jsonl"), config("corpus-2.jsonl", "log-2.jsonl")
    cfg3 = config("corpus-2.jsonl", "log-3.jsonl")
    init_ray(cfg1.ray)
    result: dict = {"date": now.isoformat(), "machine": f"{os.cpu_count()} CPUs", "documents": len(docs),
                    "queries": len(log1), "k": args.k, "max_length": args.max_length,
                    "night2_changes": night2["counts"], "night2_new_queries": len(new)}

    t = time.perf_counter()
    full_index = index.run(cfg1)
    result["full_index"] = {"seconds": round(time.perf_counter() - t, 2), "report": full_index}
    t = time.perf_counter()
    full_rerank = rerank.run(cfg1)
    result["full_rerank"] = {"seconds": round(time.perf_counter() - t, 2), "report": full_rerank}
    print(index.summary(full_index), rerank.summary(full_rerank), sep="\n", flush=True)

    second = nightly.run(cfg2)
    result["night2"] = second
    print(nightly.summary(second), flush=True)
    third = nightly.run(cfg3)
    result["night3"] = third
    print(nightly.summary(third), flush=True)
    fourth = nightly.run(cfg3)
    result["night4"] = fourth
    print(nightly.summary(fourth), flush=True)

    s2, s3 = second["seconds"], third["seconds"]
    result["ratios"] = {
        "index_night_vs_full": round(s2["index"] / result["full_index"]["seconds"], 4),
        "rerank_night_vs_full": round(s3["rerank"] / result["full_rerank"]["seconds"], 4),
        "rerank_night_with_changed_documents_vs_full": round(s2["rerank"] / result["full_rerank"]["seconds"], 4),
        "goals": {"index": 0.05, "rerank": 0.15},
    }
    ix2, rr2, rr3 = second["stages"]["index"], second["stages"]["rerank"], third["stages"]["rerank"]
    rows = [
        ("full index", result["full_index"]["seconds"], f"{full_index['rows']['written']:,} embedded"),
        ("night 2: index (1% changed)", s2["index"],
         f"{ix2['rows']['written']:,} embedded, {ix2['rows']['unchanged']:,} unchanged, "
         f"{ix2['passages']['deleted']} deleted"),
        ("full rerank", result["full_rerank"]["seconds"], f"{full_rerank['pairs']['scored']:,} pairs scored"),
        ("night 2: rerank (10% new queries, 1% documents changed)", s2["rerank"],
         f"{rr2['pairs']['scored']:,} pairs scored, {rr2['pairs']['cached']:,} from the cache"),
        ("night 3: rerank (10% new queries)", s3["rerank"],
         f"{rr3['pairs']['scored']:,} pairs scored, {rr3['pairs']['cached']:,} from the cache"),
        ("night 4: nothing changed (index + rerank)", fourth["seconds"]["total"],
         f"{fourth['work']['documents_embedded']} embedded, {fourth['work']['pairs_scored']} pairs scored"),
    ]
    r = result["ratios"]
    md = ["| run | seconds | work |", "|---|---|---|"] + [f"| {a} | {b:.1f} | {c} |" for a, b, c in rows]
    md += ["", f"index night (night 2) / full index: **{r['index_night_vs_full']:.1%}** (goal <= 5%)",
           f"rerank night (night 3) / full rerank: **{r['rerank_night_vs_full']:.1%}** (goal <= 15%)",
           f"rerank night with 1% changed documents (night 2) / full rerank: "
           f"{r['rerank_night_with_changed_documents_vs_full']:.1%}"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _judged(path: Path) -> list[str]:
    seen: dict[str, None] = {}
    for line in open(path, encoding="utf-8").read().splitlines()[1:]:
        if line.strip():
            seen.setdefault(line.split("\t")[0], None)
    return list(seen)


def _change(docs: list[dict], rng: random.Random) -> dict:
    """1% of the corpus changed: half edited, a quarter deleted, a quarter new."""
    n = round(len(docs) / 100)
    picked = rng.sample(range(len(docs)), n // 2 + n // 4)
    edited, deleted = set(picked[: n // 2]), set(picked[n // 2:])
    out = []
    for i, d in enumerate(docs):
        if i in deleted:
            continue
        out.append(dict(d, text=d["text"] + " (Revised.)") if i in edited else d)
    donors = rng.sample(range(len(docs)), n - len(picked))
    out += [{"_id": f"new-{j}", "title": docs[i]["title"] + " (update)", "text": docs[i]["text"]}
            for j, i in enumerate(donors)]
    return {"docs": out, "counts": {"edited": len(edited), "deleted": len(deleted), "new": len(donors)}}


def _log(texts: list[str], now: datetime) -> list[dict]:
    return [{"query": t, "timestamp": (now - timedelta(minutes=i % 600)).isoformat()} for i, t in enumerate(texts)]


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _cross_encoder(folder: Path, max_length: int) -> str:
    import torch
    from sentence_transformers import CrossEncoder

    from pipelines.models import resolve_model

    torch.manual_seed(0)
    CrossEncoder(resolve_model("all-MiniLM-L6-v2"), num_labels=1, max_length=max_length, device="cpu").save(str(folder))
    return str(folder)


if __name__ == "__main__":
    main()
