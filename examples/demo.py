"""Demo: index the bundled SciFact sample with the packaged all-MiniLM-L6-v2, then search a few claims.

    python examples/demo.py --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_CLAIMS = 3  # the first test claims of the sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    args = parser.parse_args()

    from pipelines.cli import run_index
    from pipelines.config import load_config
    from pipelines.search import search

    if run_index(Path(args.config)) != 0:
        return 1
    cfg = load_config(args.config)
    claims = _test_claims(ROOT / "data/scifact-sample")
    for claim, relevant in claims[:N_CLAIMS]:
        print(f"\nclaim: {claim}")
        for rank, hit in enumerate(search(cfg, claim, k=3), 1):
            mark = "  <- judged relevant" if hit["id"] in relevant else ""
            print(f"  {rank}. {hit['score']:.3f} [{hit['id']}] {hit['title'][:90]}{mark}")
    return 0


def _test_claims(folder: Path) -> list[tuple[str, set[str]]]:
    """(claim text, judged relevant abstract ids) for the sample's test claims, in file order."""
    texts = {q["_id"]: q["text"] for q in map(json.loads, (folder / "queries.jsonl").open())}
    judged: dict[str, set[str]] = {}
    for line in list((folder / "qrels/test.tsv").open())[1:]:
        qid, doc, _ = line.split("\t")
        judged.setdefault(qid, set()).add(doc)
    return [(texts[qid], docs) for qid, docs in judged.items()]


if __name__ == "__main__":
    sys.exit(main())
