"""Demo: the whole batchrank path on the bundled SciFact sample, on this machine.

    python examples/demo.py --config configs/demo.yaml

1. index the 1,000 sample abstracts with the packaged all-MiniLM-L6-v2 (``batchrank index``);
2. train the demo cross-encoder on the sample's train judgments, once (``batchrank train-reranker``;
   later runs reuse it);
3. write a query log: the sample's test claims, searched 1-9 times each over the last 5 days,
   with a few broken lines (they are quarantined);
4. rerank the log (``batchrank rerank``) into a new version of the rankings table;
5. look a few claims up (``batchrank lookup``), marking the abstracts judged relevant;
6. run the next night (``batchrank nightly``): nothing changed, so nothing is embedded and every pair
   score comes from the cache.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "data/scifact-sample"
N_LOGGED = 60  # test claims in the demo log
N_SHOWN = 3  # claims whose rankings are printed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    args = parser.parse_args()

    from pipelines.runs import run_job
    from pipelines.config import load_config

    config = Path(args.config)
    cfg = load_config(config)
    _step("1/6 index the sample corpus")
    if run_job("index", config) != 0:
        return 1
    _step("2/6 train the demo reranker (cached after the first run)")
    if run_job("train-reranker", config) != 0:
        return 1
    _step("3/6 write a query log")
    claims = _test_claims()
    log_path = Path(cfg.query_log.path if isinstance(cfg.query_log.path, str) else cfg.query_log.path[0])
    print(build_query_log(log_path, [text for text, _ in claims[:N_LOGGED]]))
    _step("4/6 rerank the query log")
    if run_job("rerank", config) != 0:
        return 1
    _step("5/6 look up a few claims (* = judged relevant)")
    from pipelines.lookup import Rankings

    rankings = Rankings(cfg)
    for (claim, relevant), ranking in zip(claims, rankings.lookup_many([c for c, _ in claims[:N_SHOWN]], n=3)):
        print(f"\nclaim: {claim}")
        if ranking is None:
            print("  no precomputed ranking")
            continue
        for rank, hit in enumerate(ranking.hits, 1):
            mark = "*" if hit.id in relevant else " "
            print(f" {mark}{rank}. {hit.score:.3f} [{hit.id}] (first stage #{hit.retrieval_rank}) {hit.title[:80]}")
    _step("6/6 the next night: batchrank nightly (nothing changed, so nothing is embedded or scored)")
    if run_job("nightly", config) != 0:
        return 1
    print("\nThe demo reranker trains for about two minutes on 200 claims; the rerank summary above shows the weight, "
          "fitted on held-out train claims, with which its score is blended with the first stage's.")
    print(f"more: batchrank lookup --config {args.config} \"{claims[3][0]}\"")
    print(f"quality and cost of every candidate source and rerank depth: batchrank eval --config {args.config}")
    return 0


def build_query_log(path: Path, queries: list[str], days: int = 5, seed: int = 7) -> str:
    """Write a JSONL query log: each query searched 1-3 times (every tenth 3-9 times), at random times in
    the last ``days`` days, in varied case and spacing; plus three broken lines. Deterministic per day."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    lines: list[str] = []
    for i, query in enumerate(queries):
        for _ in range(rng.randint(1, 3) * (3 if i % 10 == 0 else 1)):
            when = now - timedelta(hours=rng.uniform(0, days * 24))
            shown = query.upper() if rng.random() < 0.2 else f"  {query} " if rng.random() < 0.2 else query
            lines.append(json.dumps({"query": shown, "timestamp": when.isoformat().replace("+00:00", "Z"),
                                     "user": f"u{rng.randint(1, 500)}"}))
    rng.shuffle(lines)
    lines += ['{"query": "truncated line', json.dumps({"query": "no timestamp"}),
              json.dumps({"query": "bad timestamp", "timestamp": "yesterday"})]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return f"wrote {len(lines)} lines ({len(queries)} distinct claims, 3 broken lines) to {path}"


def _test_claims() -> list[tuple[str, set[str]]]:
    """(claim text, judged relevant abstract ids) for the sample's test claims, in file order."""
    texts = {q["_id"]: q["text"] for q in map(json.loads, (SAMPLE / "queries.jsonl").open())}
    judged: dict[str, set[str]] = {}
    for line in list((SAMPLE / "qrels/test.tsv").open())[1:]:
        qid, doc, _ = line.split("\t")
        judged.setdefault(qid, set()).add(doc)
    return [(texts[qid], docs) for qid, docs in judged.items()]


def _step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


if __name__ == "__main__":
    sys.exit(main())
