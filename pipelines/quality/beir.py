"""Judged collections in the BEIR layout: ``queries.jsonl``, ``qrels/<split>.tsv`` (and ``corpus.jsonl``).

Shared by the training jobs (judgments to learn from) and the eval job (judgments to measure against).

Example::

    texts = read_queries("data/scifact/queries.jsonl")            # {query id: text}
    qrels = read_qrels("data/scifact/qrels/train.tsv")            # [(query id, doc id, score)]
    fit, held_out = split_queries(sorted({q for q, _, _ in qrels}), 0.1, seed=12)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator


def read_queries(path: str, key: str = "queries") -> dict[str, str]:
    """``queries.jsonl`` (one ``{"_id", "text"}`` per line) → {query id: text}."""
    texts = {}
    for n, line in enumerate(_lines(path, key, "a BEIR queries.jsonl"), 1):
        try:
            row = json.loads(line)
            texts[str(row["_id"])] = str(row["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected a JSON object with _id and text ({exc!r})") from None
    return texts


def read_qrels(path: str, key: str = "qrels") -> list[tuple[str, str, int]]:
    """A BEIR qrels TSV (header ``query-id<TAB>corpus-id<TAB>score``) → [(query id, doc id, score)] in file order."""
    layout = "expected a header line, then query-id<TAB>corpus-id<TAB>score (BEIR; TREC qrels need converting)"
    rows = []
    for n, line in enumerate(_lines(path, key, "a BEIR qrels TSV such as qrels/train.tsv"), 1):
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: {len(parts)} tab-separated columns; {layout}")
        try:
            rows.append((parts[0], parts[1], int(float(parts[2]))))
        except ValueError:
            if n > 1:
                raise ValueError(f"{path}:{n}: score {parts[2]!r} is not a number; {layout}") from None
        else:
            if n == 1:
                raise ValueError(f"{path}: the first line is a judgment, not a header; add the line "
                                 "'query-id<TAB>corpus-id<TAB>score' at the top")
    return rows


def relevant(qrels: Iterable[tuple[str, str, int]]) -> dict[str, set[str]]:
    """{query id: ids of the documents judged relevant (score > 0)}."""
    out: dict[str, set[str]] = {}
    for q, doc, score in qrels:
        if score > 0:
            out.setdefault(q, set()).add(doc)
    return out


def split_queries(query_ids: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(fit, held out): about ``fraction`` of the ids held out, chosen by a seeded hash of each id, so the split
    of a query never depends on which other queries are in the file. At least one query is held out when
    ``fraction`` > 0 and there are two or more."""
    ids = list(dict.fromkeys(query_ids))
    if fraction <= 0 or len(ids) < 2:
        return ids, []
    rank = sorted(ids, key=lambda q: hashlib.blake2b(f"{seed}\x1f{q}".encode(), digest_size=8).digest())
    n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    held = set(rank[:n])
    return [q for q in ids if q not in held], [q for q in ids if q in held]


def collection_paths(folder: str, split: str) -> dict[str, str]:
    """The files of a BEIR collection folder, each checked to exist (the error names what is missing)."""
    paths = {"corpus": os.path.join(folder, "corpus.jsonl"), "queries": os.path.join(folder, "queries.jsonl"),
             "qrels": os.path.join(folder, "qrels", f"{split}.tsv")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder} is not a BEIR collection: missing {', '.join(missing)} "
                                "(expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv)")
    return paths


def _lines(path: str, key: str, what: str) -> Iterator[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no file {path}; point it at {what}")
    with open(path, encoding="utf-8") as fh:
        yield from (line.rstrip("\r\n") for line in fh if line.strip())
