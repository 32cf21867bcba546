"""Leak checks: evaluation judgments must never reach a model's training, or its metrics are inflated.

The eval job calls ``check_leaks`` before anything else. It refuses when a training section of the same
config reads the eval judgments file (or judges an evaluated query), and when a model in play that
batchrank trained (``embed.model``, ``rerank.model``: folders with ``batchrank-train.json``) lists an
evaluated query among its training or validation queries, or recorded the eval judgments file.

Example::

    check_leaks(cfg, ["1", "3"], "data/scifact/qrels/test.tsv")   # {"status": "clean", ...} or LeakError
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

TRAIN_META, TRAIN_PAIRS = "batchrank-train.json", "batchrank-train-pairs.jsonl"  # written by the training jobs


class LeakError(ValueError):
    """Evaluation judgments that reached a model's training: its metrics would be inflated."""


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _same_file(a: str | None, b: str) -> bool:
    return bool(a) and os.path.isfile(a) and os.path.samefile(a, b)


def check_leaks(cfg, query_ids: list[str], qrels_path: str) -> dict[str, Any]:
    """Refuse (``LeakError``) when eval judgments could reach training: a train section of this config reads the
    eval qrels file (or judges an evaluated query), or a trained model in play (``embed.model``,
    ``rerank.model``) recorded the file or an evaluated query among its training or validation queries."""
    from pipelines.beir import read_qrels
    from pipelines.models import resolve_model

    evaluated, digest, split = set(query_ids), _sha256(qrels_path), cfg.eval.split
    fix = f"train on the train split (qrels/train.tsv) and evaluate on '{split}'"
    for key in ("train", "train_biencoder"):
        section = getattr(cfg, key)
        if section is None:
            continue
        if _same_file(section.qrels, qrels_path) or (os.path.isfile(section.qrels) and _sha256(section.qrels) == digest):
            raise LeakError(f"{key}.qrels is the eval judgments file ({qrels_path}): test judgments would reach "
                            f"training; {fix}")
        if os.path.isfile(section.qrels):
            overlap = sorted(evaluated & {q for q, _, _ in read_qrels(section.qrels, f"{key}.qrels")})
            if overlap:
                raise LeakError(f"{key}.qrels ({section.qrels}) judges {len(overlap)} of the evaluated queries "
                                f"({', '.join(overlap[:5])}); {fix}")
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
        used = {s: {str(q) for q in ((meta.get("query_ids") or {}).get(s) or [])} for s in ("train", "validation")}
        pairs = os.path.join(folder, TRAIN_PAIRS)
        if os.path.isfile(pairs):  # the audit file lists every trained query, also for older metadata
            with open(pairs, encoding="utf-8") as fh:
                used["train"] |= {str(json.loads(line)["query_id"]) for line in fh if line.strip()}
        for part, ids in used.items():
            hit = sorted(evaluated & ids)
            if hit:
                raise LeakError(f"{key} {folder} was trained on {len(hit)} of the evaluated '{split}' queries (in its "
                                f"{part} queries: {', '.join(hit[:5])}); its metrics would be inflated: {fix}, "
                                "then evaluate again")
        recorded = next((r for r in (meta.get("qrels"), (meta.get("inputs") or {}).get("qrels")) if isinstance(r, dict)),
                        {})  # {"path", "sha256"}: top level, or under "inputs" (pipelines/training.py)
        sha = recorded.get("sha256") or meta.get("qrels_sha256")
        path = recorded.get("path") or (meta.get("config") or {}).get("qrels")
        if sha == digest or _same_file(path, qrels_path):
            raise LeakError(f"{key} {folder} was trained with the eval judgments file ({qrels_path}); its metrics "
                            f"would be inflated: {fix}, then evaluate again")
        models.append({"key": key, "model": name, "trained_by_batchrank": True,
                       "train_queries": len(used["train"]), "validation_queries": len(used["validation"])})
    return {"status": "clean", "qrels_sha256": digest, "models": models}
