"""Passages against whole documents cut at the model's limit, on SciFact and on a long-document collection built
from it; then a night on the long collection with one document edited and one shortened.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/passages_scifact.py [--data ../shared/data/scifact] [--group 10]

Every step is a batchrank job run as users run it (``python -m jobs.<job> --config ...``; configs in the work folder,
``~/.batchrank/passages-scifact``), with the packaged all-MiniLM-L6-v2 (256 tokens) and exact vector search:

1. **SciFact** (5,183 abstracts, test claims): ``jobs.index`` then ``jobs.eval`` (vector and hybrid candidates, no
   reranker) with ``chunk.enabled: false`` (each abstract one row, cut at 256 tokens: what batchrank did before) and
   with the default split into passages. Index time and row count from the index job's report.
2. **SciFact-long**, built here reproducibly: every ``--group`` consecutive abstracts of corpus.jsonl (in file
   order) joined into one document ``g<n>`` (``title. text`` of each, blank lines between), judgments mapped to the
   joined document (a claim whose evidence spans two abstracts of one group counts it once). The same two
   settings; plus the *per-abstract* reference: the abstracts of step 1 (passages) retrieved as they are, each
   hit mapped to its group (a group scores its best abstract). Truncation reads only the first ~256 tokens of
   each group; passages should recover most of what it loses against the reference.
   Hybrid candidates both ways (``retrieve.hybrid_fusion``: reciprocal rank and the convex combination, the
   default) on the train claims, where the default was chosen, and on the test claims.
3. **A night** on SciFact-long (passages): one group edited (its third abstract replaced by another text), one
   shortened (only its first abstract kept); ``jobs.index`` again. The table is then read: only those two
   documents' passages are new, the shortened one has none left over, every other passage is untouched.

Writes ``benchmarks/results/passages_scifact.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(ROOT))

MEASURES = ("ndcg@10", "recall@100")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--work", default=str(Path("~/.batchrank/passages-scifact").expanduser()))
    ap.add_argument("--group", type=int, default=10, help="abstracts joined into one long document")
    ap.add_argument("--docs", type=int, default=None, help="first N abstracts only (a quick check)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/passages_scifact.json"))
    args = ap.parse_args()
    data, work = Path(args.data).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": datetime.now(UTC).isoformat(), "cpu": _cpu(), "cpus": os.cpu_count(),
                    "data": str(data), "group": args.group, "sections": {}}
    short = _collection(data, work / "scifact", args.docs)
    long = _long_collection(short, work / f"scifact-long{args.group}", args.group)
    for name, coll in (("scifact", short), ("scifact_long", long)):
        section = result["sections"][name] = {}
        for setting, chunk in (("truncated", {"enabled": False}), ("passages", {})):
            cfg = _config(work, coll, f"{name}_{setting}", chunk)
            ix = _job("index", cfg)
            ev = _job("eval", cfg)
            section[setting] = {"index_seconds": ix["seconds"]["total"], "documents": ix["rows"]["read"],
                                "rows": ix["table"]["rows"], "split": ix.get("passages_split"),
                                "config": str(cfg), **_metrics(ev), "hybrid_fusion": _fusions(cfg, coll)}
    result["sections"]["scifact_long"]["per_abstract_reference"] = _reference(
        work, _config(work, short, "scifact_passages", {}), long)
    result["night"] = _night(work, long, args.group)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    _print(result)
    print(f"\nwrote {out}")


def _cpu() -> str:
    from common import cpu_model  # benchmarks/common.py

    return cpu_model()


def _collection(data: Path, out: Path, n: int | None) -> Path:
    """SciFact as it is (its first ``n`` abstracts and their judgments when ``n`` is set)."""
    if n is None:
        return data
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    lines = (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    (out / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = {json.loads(x)["_id"] for x in lines}
    (out / "queries.jsonl").write_text((data / "queries.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    for split in ("train", "test"):
        rows = list(csv.reader((data / "qrels" / f"{split}.tsv").open(encoding="utf-8"), delimiter="\t"))
        kept = [rows[0]] + [r for r in rows[1:] if r[1] in ids]
        with (out / "qrels" / f"{split}.tsv").open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh, delimiter="\t").writerows(kept)
    return out


def _long_collection(data: Path, out: Path, group: int) -> Path:
    """Every ``group`` consecutive abstracts joined into one document; judgments mapped to it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    docs = [json.loads(x) for x in (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    where, joined = {}, []
    for start in range(0, len(docs), group):
        gid = f"g{start // group}"
        part = docs[start:start + group]
        for d in part:
            where[d["_id"]] = gid
        text = "\n\n".join(f"{d.get('title') or ''}. {d['text']}".strip(". ") for d in part)
        joined.append({"_id": gid, "title": "", "text": text, "abstracts": [d["_id"] for d in part]})
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in joined), encoding="utf-8")
    (out / "queries.jsonl").write_text((data / "queries.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    for split in ("train", "test"):
        rows = list(csv.reader((data / "qrels" / f"{split}.tsv").open(encoding="utf-8"), delimiter="\t"))
        mapped = {(r[0], where[r[1]]): max(int(r[2]), 0) for r in rows[1:] if r[1] in where}
        with (out / "qrels" / f"{split}.tsv").open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(rows[0])
            w.writerows([q, d, g] for (q, d), g in sorted(mapped.items()))
    (out / "groups.json").write_text(json.dumps(where))
    return out


def _config(work: Path, coll: Path, name: str, chunk: dict) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(json.dumps({
        "storage": {"uri": str(work / "db"), "passages_table": f"passages_{name}"},
        "corpus": {"path": str(coll / "corpus.jsonl")},
        "embed": {"model": "all-MiniLM-L6-v2", "actors": 2},
        "chunk": chunk,
        "index": {"fts": {"columns": ["title", "text"]}},
        "retrieve": {"k": 100, "exact": True},
        "eval": {"collection": str(coll), "output": str(work / f"eval-{name}"), "sources": ["vector", "hybrid"],
                 "leaked_queries": "exclude"},
    }, indent=1) + "\n")  # JSON is YAML
    return path


def _job(name: str, config: Path) -> dict:
    from common import run_job  # benchmarks/common.py

    return run_job(name, config)


def _metrics(report: dict) -> dict:
    return {v["name"]: {m: v["metrics"][m] for m in MEASURES} for v in report["variants"]}


def _claims(cfg, coll: Path, split: str):
    """The judged claims of ``split``: (their ids, texts, query vectors, judgments)."""
    from pipelines.models import load_bi_encoder
    from pipelines.models.prompts import query_prompt
    from pipelines.quality.beir import read_qrels, read_queries

    judgments = read_qrels(str(coll / "qrels" / f"{split}.tsv"))
    queries = read_queries(str(coll / "queries.jsonl"))
    judged = sorted({q for q, _, _ in judgments if q in queries})
    texts = [queries[q] for q in judged]
    model = load_bi_encoder(cfg.embed.model, batch_tokens=0)
    vectors = model.encode(texts, normalize_embeddings=True, prompt=query_prompt(model, cfg.embed))
    return judged, texts, vectors, judgments


def _fusions(config: Path, coll: Path) -> dict:
    """Hybrid candidates fused by reciprocal rank and by the convex combination (``retrieve.hybrid_fusion``), on
    the train claims (where the default was chosen) and the test claims; k = 100, document level."""
    from pipelines.config import load_config
    from pipelines.quality.metrics import evaluate
    from pipelines.rerank.retrieve import CandidateSearch
    from pipelines.store import Store

    cfg = load_config(config)
    store = Store(cfg.storage)
    out = {}
    for split in ("train", "test"):
        judged, texts, vectors, judgments = _claims(cfg, coll, split)
        for fusion in ("rrf", "convex"):
            with CandidateSearch.from_config(store, store.passages(), cfg, source="hybrid", fusion=fusion) as search:
                hits = search(vectors, texts)
            run = {q: {d: float(len(h) - i) for i, d in enumerate(h["id"].to_pylist())} for q, h in zip(judged, hits)}
            out.setdefault(split, {})[fusion] = {m: round(v, 6) for m, v in evaluate(run, judgments, MEASURES).items()}
    return out


def _reference(work: Path, abstracts_cfg: Path, long: Path) -> dict:
    """The per-abstract figure for SciFact-long: abstracts retrieved as they are (passages of step 1), each hit
    mapped to its group, a group ranked at its best abstract; test claims (all judged, as ``_fusions``)."""
    from pipelines.config import load_config
    from pipelines.quality.metrics import evaluate
    from pipelines.rerank.retrieve import CandidateSearch
    from pipelines.store import Store

    cfg = load_config(abstracts_cfg)
    where = json.loads((long / "groups.json").read_text())
    judged, texts, vectors, judgments = _claims(cfg, long, "test")
    store = Store(cfg.storage)
    out = {}
    for source in ("vector", "hybrid"):
        with CandidateSearch.from_config(store, store.passages(), cfg, k=1000, source=source) as search:
            hits = search(vectors, texts)
        run = {}
        for q, h in zip(judged, hits):
            groups = list(dict.fromkeys(where[d] for d in h["id"].to_pylist()))[:100]
            run[q] = {g: float(len(groups) - i) for i, g in enumerate(groups)}
        out[source] = {m: round(v, 6) for m, v in evaluate(run, judgments, MEASURES).items()}
    return out


def _night(work: Path, long: Path, group: int) -> dict:
    """One document edited, one shortened; the index job again; the table read back."""
    from pipelines.config import load_config
    from pipelines.store import Store

    config = _config(work, long, "scifact_long_passages", {})
    cfg = load_config(config)
    store = Store(cfg.storage)

    def table() -> dict[str, tuple]:
        rows = store.passages().to_arrow().select(["passage_id", "id", "run_id", "content_hash", "vector"])
        return {p: (d, r, h, v) for p, d, r, h, v in zip(*(rows[c].to_pylist() for c in rows.column_names))}

    before = table()
    corpus = long / "corpus.jsonl"
    original = corpus.read_text(encoding="utf-8")
    docs = [json.loads(x) for x in original.splitlines()]
    edited, shortened = docs[3], docs[7]
    parts = edited["text"].split("\n\n")
    parts[2] = "Vitamin D supplementation and bone density in older adults: a randomised trial of 400 people."
    edited["text"] = "\n\n".join(parts)
    shortened["text"] = shortened["text"].split("\n\n")[0]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    try:
        night = _job("index", config)
    finally:
        corpus.write_text(original, encoding="utf-8")  # the collection stays as built (a rerun starts equal)
    after = table()
    changed = {edited["_id"], shortened["_id"]}
    new = {p for p, row in after.items() if row[1] == night["run_id"]}
    untouched = all(after.get(p) == row for p, row in before.items() if row[0] not in changed)
    leftovers = [p for p, row in after.items() if row[0] == shortened["_id"] and p not in new]
    restore = _job("index", config)  # back to the collection as built, for a rerun of this script
    return {"index_seconds": night["seconds"]["total"], "plan": night.get("plan"), "documents": night["documents"],
            "passages_written": night["passages"]["written"],
            "new_passages_belong_to": sorted({after[p][0] for p in new}), "expected": sorted(changed),
            "shortened_passages_after": sum(1 for row in after.values() if row[0] == shortened["_id"]),
            "shortened_leftovers": leftovers, "others_untouched": untouched,
            "passages_before": len(before), "passages_after": len(after),
            "restore_run": {"documents": restore["documents"], "passages_written": restore["passages"]["written"]}}


def _print(result: dict) -> None:
    print(f"\nCPU: {result['cpu']} ({result['cpus']} cores)")
    print("\n| collection | setting | rows | index s | vector nDCG@10 | vector R@100 | hybrid nDCG@10 | hybrid R@100 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, section in result["sections"].items():
        for setting, r in section.items():
            if setting == "per_abstract_reference":
                v, h = r["vector"], r["hybrid"]
                print(f"| {name} | per-abstract reference | | | {v['ndcg@10']:.4f} | {v['recall@100']:.4f} | "
                      f"{h['ndcg@10']:.4f} | {h['recall@100']:.4f} |")
                continue
            v, h = r["vector"], r["hybrid"]
            print(f"| {name} | {setting} | {r['rows']:,} | {r['index_seconds']:.0f} | {v['ndcg@10']:.4f} | "
                  f"{v['recall@100']:.4f} | {h['ndcg@10']:.4f} | {h['recall@100']:.4f} |")
    print("\n| collection | setting | hybrid fusion | train nDCG@10 | test nDCG@10 | test R@100 |")
    print("|---|---|---|---|---|---|")
    for name, section in result["sections"].items():
        for setting, r in section.items():
            for fusion in ("rrf", "convex"):
                tr, te = r.get("hybrid_fusion", {}).get("train", {}).get(fusion), r.get("hybrid_fusion", {}).get(
                    "test", {}).get(fusion)
                if tr and te:
                    print(f"| {name} | {setting} | {fusion} | {tr['ndcg@10']:.4f} | {te['ndcg@10']:.4f} | "
                          f"{te['recall@100']:.4f} |")
    n = result["night"]
    print(f"\nnight: {n['documents']}, {n['passages_written']} passages written in {n['index_seconds']:.0f} s; new "
          f"passages belong to {n['new_passages_belong_to']} (expected {n['expected']}); shortened document now "
          f"{n['shortened_passages_after']} passage(s), leftovers {n['shortened_leftovers']}; others untouched: "
          f"{n['others_untouched']}")


if __name__ == "__main__":
    main()
