"""Leak checks: evaluation judgments must never reach a model's training, or its metrics are inflated.

The eval job calls ``check_leaks`` before anything else. It refuses when a training section of the same
config reads the eval judgments file (or judges an evaluated query), and when a model in play that
batchrank trained (``embed.model``, ``rerank.model``: folders with ``batchrank-train.json``) was trained or
validated on an evaluated query, or recorded the eval judgments file.

A query is identified by its text, not its id: ids are labels local to one collection (SciFact's "1" and
another collection's "1" are different queries), while the same text is the same query whatever its id or
file. Training records ``query_keys`` (:func:`training_record`): a hash of each trained and validation
query's normalised text (NFKC, case-folded, whitespace collapsed), and for self-supervised pairs (a
document's title as the query) the hash with the document, since only that (query, document) pair was
trained. Judgments files are identified by their sha256. Models trained before ``query_keys`` existed
recorded ids only: their texts are read back from the queries file they recorded (while it has the
recorded digest); when it is gone or changed the check refuses and says so.

Example::

    check_leaks(cfg, {"1": "0-dimensional biomaterials ...", "3": "..."}, "data/scifact/qrels/test.tsv",
                "data/scifact/queries.jsonl")   # {"status": "clean", ...} or LeakError
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

TRAIN_META, TRAIN_PAIRS = "batchrank-train.json", "batchrank-train-pairs.jsonl"  # written by the training jobs
KEY_RULES = {"unicode": "NFKC", "casefold": True, "collapse_whitespace": True}  # pipelines.rerank.query_log.normalize
KEY_SCHEME = "blake2b-128 of the UTF-8 query text after NFKC, case-folding and collapsing whitespace"

log = logging.getLogger("batchrank.eval")


class LeakError(ValueError):
    """Evaluation judgments that reached a model's training: its metrics would be inflated."""


def query_key(text: str) -> str:
    """The identity of a query for leak checks: a hash of its normalised text (ids are per collection)."""
    from pipelines.rerank.query_log import normalize

    return hashlib.blake2b(normalize(text, KEY_RULES).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def training_record(train: Iterable[str], validation: Iterable[str],
                    self_supervised: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """``query_keys`` of ``batchrank-train.json``: the keys of the texts of the trained (``train``) and validation
    queries, and ``[key, doc id]`` of each self-supervised (title, document) pair."""
    return {"scheme": KEY_SCHEME,
            "train": sorted({query_key(t) for t in train}),
            "validation": sorted({query_key(t) for t in validation}),
            "self_supervised": sorted({(query_key(t), str(d)) for t, d in self_supervised})}


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _same_file(a: str | None, b: str) -> bool:
    return bool(a) and os.path.isfile(a) and os.path.samefile(a, b)


def _listed(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def check_leaks(cfg, queries: dict[str, str], qrels_path: str, queries_path: str | None = None) -> dict[str, Any]:
    """Refuse (``LeakError``) when eval judgments could reach training. ``queries``: evaluated id → text;
    ``queries_path``: the eval queries file (lets a model trained by an older batchrank, which recorded ids
    only, be checked when its own queries file is gone but had the same content).

    Refused: a train section of this config reads the eval qrels file, or judges a query with the text of an
    evaluated one; a trained model in play (``embed.model``, ``rerank.model``) recorded the file, or trained or
    validated on the text of an evaluated query, or on a self-supervised pair that is an evaluated judgment."""
    from pipelines.models import resolve_model
    from pipelines.quality.beir import read_qrels, read_queries

    digest, split = _sha256(qrels_path), cfg.eval.split
    excluded: dict[str, str] = {}  # evaluated id → why (eval.leaked_queries: exclude)
    by_key: dict[str, list[str]] = {}
    for qid, text in queries.items():
        by_key.setdefault(query_key(text), []).append(qid)
    order = {q: i for i, q in enumerate(queries)}

    def evaluated(keys) -> list[str]:  # the evaluated ids whose text has one of ``keys``, in eval order
        return sorted((q for k in set(keys) & by_key.keys() for q in by_key[k]), key=order.__getitem__)

    fix = f"train on the train split (qrels/train.tsv) and evaluate on '{split}'"
    text_fix = ("drop those queries from the training judgments and retrain, or set eval.leaked_queries: exclude "
                "to evaluate without them (they are listed in the report)")

    def leaked(ids: list[str], message: str, why: str) -> None:
        if cfg.eval.leaked_queries != "exclude":
            raise LeakError(message)
        for q in ids:
            excluded.setdefault(q, why)
    for key in ("train", "train_biencoder"):
        section = getattr(cfg, key)
        if section is None:
            continue
        if _same_file(section.qrels, qrels_path) or (os.path.isfile(section.qrels) and _sha256(section.qrels) == digest):
            raise LeakError(f"{key}.qrels is the eval judgments file ({qrels_path}): test judgments would reach "
                            f"training; {fix}")
        if os.path.isfile(section.qrels) and os.path.isfile(section.queries):  # else that section cannot train
            texts = read_queries(section.queries, f"{key}.queries")
            judged = {q for q, _, _ in read_qrels(section.qrels, f"{key}.qrels")}
            overlap = evaluated(query_key(texts[q]) for q in judged if q in texts)
            if overlap:
                leaked(overlap, f"{key}.qrels ({section.qrels}) judges {len(overlap)} of the evaluated queries "
                                f"({_listed(overlap)}), matched by query text; {text_fix}",
                       f"its text is judged in {key}.qrels")
    relevant: set[tuple[str, str]] | None = None  # evaluated (key, doc) judged relevant, read when needed
    models = []
    for key, name in (("embed.model", cfg.embed.model), ("rerank.model", cfg.rerank.model if cfg.rerank else None)):
        folder = resolve_model(name) if name else None
        meta_path = os.path.join(folder, TRAIN_META) if folder else ""
        if not os.path.isfile(meta_path):
            if name:
                models.append({"key": key, "model": name, "trained_by_batchrank": False})
            continue
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        used, identity = _trained_keys(meta, folder, key, queries_path, fix)
        for part in ("train", "validation"):
            hit = evaluated(used[part])
            if hit:
                leaked(hit, f"{key} {folder} was trained on {len(hit)} of the evaluated '{split}' queries (in its "
                            f"{part} queries: {_listed(hit)}; matched by query text); its metrics would be "
                            f"inflated: {fix}, then evaluate again; or {text_fix}",
                       f"{key} was trained on its text ({part} queries)")
        if used["self_supervised"]:
            if relevant is None:
                relevant = {(query_key(queries[q]), d) for q, d, grade in read_qrels(qrels_path, "eval.qrels")
                            if grade > 0 and q in queries}
            pairs = sorted(p for p in relevant if p in used["self_supervised"])
            if pairs:
                shown = [f"{q} → {d}" for k, d in pairs for q in by_key[k]]
                raise LeakError(f"{key} {folder} was trained on {len(shown)} of the evaluated '{split}' judgments as "
                                f"self-supervised pairs (a document's title equal to an evaluated query judged "
                                f"relevant to that document: {_listed(shown)}); its metrics would be inflated: "
                                f"retrain it with self_supervised.pairs: 0, then evaluate again")
        recorded = next((r for r in (meta.get("qrels"), (meta.get("inputs") or {}).get("qrels")) if isinstance(r, dict)),
                        {})  # {"path", "sha256"}: top level, or under "inputs" (pipelines/quality/training.py)
        sha = recorded.get("sha256") or meta.get("qrels_sha256")
        path = recorded.get("path") or (meta.get("config") or {}).get("qrels")
        if sha == digest or _same_file(path, qrels_path):
            raise LeakError(f"{key} {folder} was trained with the eval judgments file ({qrels_path}); its metrics "
                            f"would be inflated: {fix}, then evaluate again")
        models.append({"key": key, "model": name, "trained_by_batchrank": True, "queries_identified_by": identity,
                       "train_queries": len(used["train"]), "validation_queries": len(used["validation"]),
                       "self_supervised_pairs": len(used["self_supervised"])})
    if excluded:
        log.warning("evaluating without %d quer%s whose text training saw (eval.leaked_queries: exclude): %s",
                    len(excluded), "y" if len(excluded) == 1 else "ies", _listed(sorted(excluded, key=order.__getitem__)))
    return {"status": "clean" if not excluded else "excluded", "qrels_sha256": digest, "models": models,
            **({"excluded": dict(sorted(excluded.items(), key=lambda kv: order[kv[0]]))} if excluded else {})}


def _trained_keys(meta: dict, folder: str, key: str, eval_queries: str | None, fix: str) -> tuple[dict, str]:
    """``({"train": keys, "validation": keys, "self_supervised": {(key, doc)}}, how they were identified)``."""
    record = meta.get("query_keys")
    if isinstance(record, dict):
        return ({p: set(record.get(p) or []) for p in ("train", "validation")}
                | {"self_supervised": {tuple(x) for x in record.get("self_supervised") or []}}, "text")
    # Older metadata: ids only (and the audit file's ids); read their texts back from the queries file.
    ids = {p: {str(q) for q in ((meta.get("query_ids") or {}).get(p) or [])} for p in ("train", "validation")}
    pairs = os.path.join(folder, TRAIN_PAIRS)
    if os.path.isfile(pairs):
        with open(pairs, encoding="utf-8") as fh:
            ids["train"] |= {str(q) for q in (json.loads(line).get("query_id") for line in fh if line.strip())
                             if q is not None}
    empty = {"train": set(), "validation": set(), "self_supervised": set()}
    if not ids["train"] and not ids["validation"]:
        return empty, "none recorded"
    texts, source = _recorded_queries(meta, eval_queries)
    unknown = sorted((ids["train"] | ids["validation"]) - set(texts or {}))
    if texts is None or unknown:
        raise LeakError(f"{key} {folder} was trained by an older batchrank that recorded query ids only, and "
                        + (f"its queries file ({source}) is gone or changed" if source else "no queries file")
                        + (f" ({len(unknown)} of its ids are not in it, e.g. {_listed(unknown, 3)})" if texts else "")
                        + ": which queries it was trained on cannot be told, and ids alone would mix up collections; "
                        "retrain it with this batchrank (it records the query texts' hashes)"
                        + (", or restore that file" if source else "") + f" ({fix})")
    return {p: {query_key(texts[q]) for q in ids[p]} for p in ids} | {"self_supervised": set()}, \
        f"text, read back by id from {source}"


def _recorded_queries(meta: dict, eval_queries: str | None) -> tuple[dict[str, str] | None, str | None]:
    """The texts of the queries file a model was trained with: the recorded file while it has the recorded
    digest (or any, when none was recorded), else the eval queries file when it has that digest."""
    from pipelines.quality.beir import read_queries

    recorded = (meta.get("inputs") or {}).get("queries")
    path, sha = (recorded.get("path"), recorded.get("sha256")) if isinstance(recorded, dict) else \
        ((meta.get("config") or {}).get("queries"), None)
    if path and os.path.isfile(path) and (sha is None or _sha256(path) == sha):
        return read_queries(path, "the model's training queries"), path
    if sha and eval_queries and os.path.isfile(eval_queries) and _sha256(eval_queries) == sha:
        return read_queries(eval_queries, "eval.queries"), f"{eval_queries} (same content)"
    return None, path
