"""Rebuild this sample from the full SciFact collection (BEIR layout).

    python data/scifact-sample/make_sample.py ../shared/data/scifact data/scifact-sample

Keeps every abstract judged relevant for the 300 test claims and for train claims in file
order until 1,000 abstracts are reached (a claim is taken only if all its abstracts fit),
then the claims whose relevant abstracts are all in the sample, and their judgments.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

LIMIT = 1000


def qrels(path: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            out.setdefault(row["query-id"], set()).add(row["corpus-id"])
    return out


def main(src: Path, dst: Path) -> None:
    test, train = qrels(src / "qrels/test.tsv"), qrels(src / "qrels/train.tsv")
    keep: set[str] = set()
    for judged in (test, train):
        for docs in judged.values():
            if len(keep | docs) <= LIMIT:
                keep |= docs
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").open()]
    for doc in corpus:  # fill with unjudged abstracts, in file order
        if len(keep) >= LIMIT:
            break
        keep.add(doc["_id"])
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    with (dst / "corpus.jsonl").open("w") as out:
        for doc in corpus:
            if doc["_id"] in keep:
                out.write(json.dumps({"_id": doc["_id"], "title": doc["title"], "text": doc["text"]}) + "\n")
    kept_queries: set[str] = set()
    for split, judged in (("test", test), ("train", train)):
        with (dst / f"qrels/{split}.tsv").open("w") as out:
            out.write("query-id\tcorpus-id\tscore\n")
            for qid, docs in judged.items():
                if docs <= keep:
                    kept_queries.add(qid)
                    for d in sorted(docs):
                        out.write(f"{qid}\t{d}\t1\n")
    with (dst / "queries.jsonl").open("w") as out:
        for line in (src / "queries.jsonl").open():
            q = json.loads(line)
            if q["_id"] in kept_queries:
                out.write(json.dumps({"_id": q["_id"], "text": q["text"]}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
