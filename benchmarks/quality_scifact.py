"""Quality on SciFact test: the packaged bi-encoder, then everything batchrank offers, trained on train only.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_scifact.py [--data ../shared/data/scifact]

Every step is a batchrank job run as users run it (``python -m jobs.<job> --config ...``); the configs
are written to the work folder (``~/.batchrank/quality-scifact``) and kept there for reading:

1. ``base.yaml``: ``jobs.eval`` with the packaged all-MiniLM-L6-v2 (indexes the full corpus into
   ``passages_minilm``, or reuses it): vector, BM25 (title + text) and hybrid candidates, no reranker;
2. ``base.yaml``: ``jobs.train_biencoder`` fine-tunes MiniLM on the TRAIN judgments (hard negatives mined
   from ``passages_minilm``; a validation split of the train queries picks the checkpoint);
3. ``tuned.yaml``: the fine-tuned bi-encoder as ``embed.model``; ``jobs.index`` embeds the corpus with it into
   ``passages_tuned``; ``jobs.train_reranker`` trains the cross-encoder on the TRAIN judgments, negatives mined
   from the tuned index, fusion weight fitted on the held-out train queries;
4. ``tuned.yaml``: ``jobs.eval`` (reuses ``passages_tuned``): every candidate source, the cross-encoder at each
   depth, alone and fused.
Test judgments are read only by the eval job, whose leak check refuses a model trained on any test query.
Writes ``benchmarks/results/quality_scifact.json`` plus the tuned run's ``.md`` and ``.png`` next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--work", default=str(Path("~/.batchrank/quality-scifact").expanduser()))
    ap.add_argument("--depths", default="10,20,50", help="rerank depths K")
    ap.add_argument("--loss", default="listwise", choices=["bce", "listwise"])
    ap.add_argument("--reranker-epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per (query, document) pair")
    ap.add_argument("--self-supervised", type=int, default=0, help="title→text pairs added to reranker training")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_scifact.json"))
    ap.add_argument("--configs-only", action="store_true", help="write base.yaml and tuned.yaml, run nothing")
    args = ap.parse_args()
    data, work = Path(args.data).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    depths = [int(d) for d in args.depths.split(",")]
    common = {
        "storage": {"uri": str(work / "db")},
        "corpus": {"path": str(data / "corpus.jsonl")},
        "index": {"fts": {"columns": ["title", "text"]}},
        "retrieve": {"k": 100, "source": "hybrid", "exact": True},
    }
    judgments = {"queries": str(data / "queries.jsonl"), "qrels": str(data / "qrels/train.tsv"),
                 "validation_fraction": 0.1}
    base = _write(work / "base.yaml", {
        **common,
        "storage": {**common["storage"], "passages_table": "passages_minilm"},
        "embed": {"model": "all-MiniLM-L6-v2", "batch_size": 16, "actors": 2},
        # SciFact's train and test splits share two claims word for word (test 870 = train 871, 1292 = 1291):
        # evaluated without them, and listed in the report
        "eval": {"collection": str(data), "output": str(work / "eval-base"), "leaked_queries": "exclude"},
        "train_biencoder": {**judgments, "output": str(work / "biencoder"), "batch_size": 32, "epochs": 1,
                            "negatives": {"per_query": 1, "source": "vector", "range_min": 3, "range_max": 30}},
    })
    tuned = _write(work / "tuned.yaml", {
        **common,
        "storage": {**common["storage"], "passages_table": "passages_tuned"},
        "embed": {"model": str(work / "biencoder"), "batch_size": 16, "actors": 2},
        "rerank": {"model": str(work / "reranker"), "max_length": args.max_length, "batch_size": 32, "fusion": "auto"},
        "train": {**judgments, "output": str(work / "reranker"), "base_model": "all-MiniLM-L6-v2",
                  "loss": args.loss, "epochs": args.reranker_epochs, "max_length": args.max_length,
                  "negatives": {"per_query": 4, "range_min": 3, "range_max": 30},
                  "self_supervised": {"pairs": args.self_supervised}},
        "eval": {"collection": str(data), "output": str(work / "eval-tuned"), "depths": depths,
                 "leaked_queries": "exclude"},
    })
    if args.configs_only:
        print(f"wrote {base} and {tuned}")
        return
    result: dict = {"date": datetime.now(UTC).isoformat(), "machine": f"{os.cpu_count()} CPUs", "data": str(data),
                    "configs": {"base": str(base), "tuned": str(tuned)}, "jobs": {}}
    for name, job, config in (("eval_base", "eval", base), ("train_biencoder", "train_biencoder", base),
                              ("index_tuned", "index", tuned), ("train_reranker", "train_reranker", tuned),
                              ("eval_tuned", "eval", tuned)):
        if job == "index" and _indexed(config):
            result["jobs"][name] = {"status": "reused", "reason": "the table already holds exactly the corpus"}
            continue
        result["jobs"][name] = _job(job, config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["variants"] = {"base": _variants(result["jobs"]["eval_base"]),
                          "tuned": _variants(result["jobs"]["eval_tuned"])}
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    shutil.copyfile(work / "eval-tuned" / "eval.png", out.with_suffix(".png"))
    markdown = (work / "eval-tuned" / "eval.md").read_text(encoding="utf-8")
    out.with_suffix(".md").write_text(markdown.replace("(eval.png)", f"({out.with_suffix('.png').name})"),
                                      encoding="utf-8")
    _print(result)
    print(f"\nwrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def _write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    return path


def _indexed(config: Path) -> bool:
    """Whether the config's passages table holds exactly its corpus, embedded by its model and split into passages
    as configured (as eval checks it):
    the index job re-embeds every document (incremental reindexing is not there yet)."""
    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config
    from pipelines.config.index import same_passages
    from pipelines.index.corpus import corpus_fingerprint
    from pipelines.store import Store

    cfg = load_config(config)
    store = Store(cfg.storage)
    if store.passages_model() != cfg.embed.model or not same_passages(store.passages_settings(),
                                                                        cfg.passage_settings):
        return False
    return corpus_fingerprint(cfg) == store.content_fingerprint(store.passages())


def _job(name: str, config: Path) -> dict:
    from common import run_job  # benchmarks/common.py

    return run_job(name, config)


def _variants(report: dict) -> list[dict]:
    return [{"name": v["name"], **v["metrics"], "pairs": v["pairs"], "seconds": v["seconds"]}
            for v in report["variants"]]


def _print(result: dict) -> None:
    jobs = result["jobs"]
    print("\n| bi-encoder | variant | nDCG@10 | MRR@10 | R@100 | pairs | seconds |\n|---|---|---|---|---|---|---|")
    for which, label in (("base", "all-MiniLM-L6-v2"), ("tuned", "fine-tuned")):
        for v in result["variants"][which]:
            print(f"| {label} | {v['name']} | {v['ndcg@10']:.4f} | {v['mrr@10']:.4f} | {v['recall@100']:.4f} | "
                  f"{v['pairs']:,} | {v['seconds']:.1f} |")
    for name in ("train_biencoder", "train_reranker"):
        r = jobs[name]  # a cached run's report carries the training seconds of the run that trained the model
        print(f"{name}: {r.get('status')}, training {r.get('training', {}).get('seconds', 0):.0f} s on "
              f"{r.get('training', {}).get('device')}, trained at {r.get('trained_at')}")


if __name__ == "__main__":
    main()
