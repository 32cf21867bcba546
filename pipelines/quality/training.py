"""What ``train-reranker`` and ``train-biencoder`` share: judged queries and their validation split, hard negatives
mined from ``passages``, self-supervised pairs, the cache fingerprint, the atomic save and the run report.

Both jobs read top to bottom::

    queries.jsonl + qrels → judged queries (first max_queries) with a positive in passages
    → split by hashed query id (validation_fraction): train | validation (never trained on)
    → each train query (and each self-supervised title) → its top range_max candidates (CandidateSearch)
    → Groups: (query, positive, negatives sampled from ranks > range_min, unjudged, within the margins)
    → the trainer's fit (saves into <output>.tmp-<run_id>) → batchrank-train.json → swapped into output

A rerun with the same inputs (the fingerprint in ``<output>/batchrank-train.json``) reuses the saved model.

Example (what a trainer's ``run`` does)::

    return training.run(cfg, "train", job="train", command="batchrank train-reranker", fit=_train)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import runs
from pipelines import schema as S
from pipelines.quality.beir import read_qrels, read_queries, split_queries
from pipelines.report import Timer, utcnow

META = "batchrank-train.json"
PAIRS = "batchrank-train-pairs.jsonl"  # which (query, doc, label) the model was trained on, for audits
CACHED_KEYS = ("queries", "judgments", "pairs", "self_supervised", "training", "validation", "fusion", "head")


@dataclass
class Group:
    """One positive of a query and the hard negatives mined for it. ``query_id`` is None for a self-supervised
    pair (a document's title as the query). ``score`` is the positive's first-stage score in the same candidate
    list; when the positive is not among the candidates (``rank`` None), the lowest candidate score stands in.
    ``rows`` holds the passage each document is read as for this query: its best passage in the candidate list
    (at document level, the one that earned its rank); a positive missing from the list is read as ``Data.docs``
    has it (its first passage). ``row(doc, docs)`` picks."""

    query_id: str | None
    query: str
    positive: str
    rank: int | None
    score: float | None
    negatives: list[tuple[str, int, float]] = field(default_factory=list)  # (doc id, 1-based rank, score)
    rows: dict[str, dict] = field(default_factory=dict)

    def row(self, doc: str, docs: dict[str, dict]) -> dict:
        return self.rows.get(doc) or docs[doc]


@dataclass
class Data:
    """What a trainer learns from (``groups``) and validates on (``validation_ids``); ``docs`` has the title and
    text of every document in the groups."""

    cfg: Any
    store: Any
    table: Any
    queries: dict[str, str]
    positives: dict[str, list[str]]
    judgments: list[tuple[str, str, int]]  # every qrels row of the used queries, whatever its grade
    train_ids: list[str]
    validation_ids: list[str]
    docs: dict[str, dict] = field(default_factory=dict)
    groups: list[Group] = field(default_factory=list)
    encoder: Any = None

    def candidates(self, texts: list[str], *, k: int, source: str, exact: bool) -> list[list[dict]]:
        """Each text's top ``k`` passages (id, title, text, score; best first) from ``source``, queries embedded
        by ``embed.model`` (the table's bi-encoder) in chunks of ``retrieve.queries_per_call``."""
        from pipelines.models import configure_threads, load_bi_encoder
        from pipelines.models.prompts import query_prompt
        from pipelines.rerank.retrieve import CandidateSearch

        cfg, e = self.cfg, self.cfg.embed
        search = CandidateSearch.from_config(self.store, self.table, cfg, k=k, source=source, exact=exact,
                                             columns=(S.TITLE, S.TEXT))
        if source != "fts" and self.encoder is None:
            configure_threads(cpus())
            self.encoder = load_bi_encoder(e.model, device=e.device, dtype=e.dtype, max_seq_length=e.max_seq_length,
                                           trust_remote_code=e.trust_remote_code, backend=e.backend,
                                           batch_tokens=e.batch_tokens)
        out, step = [], cfg.retrieve.queries_per_call
        prompt = "" if self.encoder is None else query_prompt(self.encoder, e)
        with search:
            for start in range(0, len(texts), step):
                chunk = texts[start:start + step]
                vectors = None if source == "fts" else self.encoder.encode(
                    chunk, batch_size=e.batch_size, normalize_embeddings=e.normalize, convert_to_numpy=True,
                    show_progress_bar=False, prompt=prompt).astype("float32")
                out += [hits.to_pylist() for hits in search(vectors, chunk)]
        return out


def run(cfg, section: str, *, job: str, command: str, fit: Callable, force: bool = False,
        run_id: str | None = None, fingerprint: list | None = None) -> dict[str, Any]:
    """Prepare the data of ``cfg.<section>``, call ``fit(cfg, data, folder, report)`` (which saves the model into
    ``folder`` and returns metadata), publish; return the run report (also written as JSON). On failure the
    report is written with ``status: failed`` and the error raised again; the output folder is untouched."""
    t = getattr(cfg, section, None)
    this = runs.start(cfg, job, sections=(section,), command=command, run_id=run_id, output=t and t.output,
                      base_model=t and (t.base_model or cfg.embed.model), bi_encoder=cfg.embed.model)
    return runs.guarded(this, cfg, body=lambda: _run(cfg, section, fit, this.report, this.timer, force,
                                                     fingerprint or []),
                        finish=lambda: _finish(this))


def _run(cfg, section: str, fit: Callable, report: dict, timer: Timer, force: bool, extra: list) -> None:
    from pipelines.registry import require_extra

    require_extra("datasets", "train", "batchrank train-reranker" if section == "train" else "batchrank train-biencoder")
    from pipelines.store import Store

    t, out = getattr(cfg, section), Path(getattr(cfg, section).output)
    if "://" in t.output:
        raise ValueError(f"{section}.output must be a local folder (got {t.output}); copy the model to object "
                         "storage after training")
    with timer("read"):
        texts, qrels = read_queries(t.queries, f"{section}.queries"), read_qrels(t.qrels, f"{section}.qrels")
        store = Store(cfg.storage)
        table = store.passages_for_queries(cfg.embed.model)  # negatives are mined from it
        report["passages_version"] = table.version
        report["inputs"] = {k: {"path": p, "sha256": _sha256(p)}
                            for k, p in (("queries", t.queries), ("qrels", t.qrels))}
        passages = [store.content_fingerprint(table), store.passages_settings()]  # the documents, and their passages
        report["fingerprint"] = _fingerprint(cfg, report["job"], t, passages,
                                             report["inputs"], extra)
        previous = _previous(out, f"{section}.output")
        if previous and previous.get("fingerprint") == report["fingerprint"] and not force:
            report.update(status="cached", trained_at=previous.get("trained_at"), trained_by=previous.get("run_id"),
                          **{k: previous[k] for k in CACHED_KEYS if k in previous})
            return
        queries, positives = _select(texts, qrels, t.max_queries, report)
        docs = _rows(store, table, sorted({d for ds in positives.values() for d in ds}))
        queries, positives = _positives(queries, positives, docs, report)
        fit_ids, held_out = split_queries(list(queries), t.validation_fraction, t.seed)
        data = Data(cfg, store, table, queries, positives, [r for r in qrels if r[0] in queries], fit_ids, held_out,
                    docs)
        report["query_ids"] = {"train": fit_ids, "validation": held_out}
        report["queries"].update(train=len(fit_ids), validation=len(held_out))
    with timer("mine"):
        judged = {}
        for q, doc, _ in qrels:
            judged.setdefault(q, set()).add(doc)
        data.groups = mine(data, t, [(q, queries[q], positives[q], judged[q]) for q in fit_ids], report)
        data.groups += self_supervised(data, t, report)
    if not data.groups:
        raise ValueError(f"no training pairs: none of the judged documents of {t.qrels} is in "
                         f"'{cfg.storage.passages_table}'; index the collection the judgments refer to")
    tmp = out.with_name(f"{out.name}.tmp-{report['run_id']}")
    try:
        with timer("train"):  # fit, then save the model to tmp
            meta = fit(cfg, data, tmp, report)
        with timer("publish"):
            meta = {"job": report["job"], **{k: report[k] for k in (
                "fingerprint", "run_id", "base_model", "bi_encoder", "passages_version", "inputs", "query_ids",
                "queries", "judgments", "pairs", "self_supervised")}, **meta}
            meta.update(negatives=dict(t.negatives.model_dump(mode="json"),
                                       source=t.negatives.source or cfg.retrieve.source),
                        trained_at=utcnow().isoformat(), config=t.model_dump(mode="json"),
                        query_keys=leak_record(data))  # what the eval's leak check matches, by text
            meta["training"]["seconds"] = timer.seconds["train"]
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            (tmp / PAIRS).write_text("".join(json.dumps(line) + "\n" for line in pair_lines(data.groups)),
                                     encoding="utf-8")
            _swap_in(tmp, out, report["run_id"])
        report.update(status="succeeded", trained_at=meta["trained_at"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mine(data: Data, t, items: list[tuple[str | None, str, list[str], set[str]]], report: dict) -> list[Group]:
    """One Group per (query, positive) of ``items`` = (query id, text, positive ids, excluded ids): ``per_query``
    negatives drawn (seeded) from the top ``range_max`` candidates ranked below ``range_min``, minus the excluded
    (judged) docs, minus those within the margins of the positive's score."""
    n = t.negatives
    if not items:
        return []
    lists = data.candidates([text for _, text, _, _ in items], k=n.range_max, exact=True,
                            source=n.source or data.cfg.retrieve.source)
    rng, groups, short = random.Random(f"{t.seed}:{items[0][0] is None}"), [], 0
    for (qid, text, positives, exclude), hits in zip(items, lists):
        ranks = {h[S.ID]: r for r, h in enumerate(hits, 1)}
        floor = min((h["score"] for h in hits), default=None)
        pool = [(r, h) for r, h in enumerate(hits, 1) if r > n.range_min and h[S.ID] not in exclude]
        for pos in positives:
            rank = ranks.get(pos)
            score = hits[rank - 1]["score"] if rank else floor
            ok = [(r, h) for r, h in pool if _within_margins(h["score"], score, n)]
            picked = sorted(rng.sample(ok, min(n.per_query, len(ok))), key=lambda x: x[0])
            short += len(picked) < n.per_query
            for _, h in picked:
                data.docs.setdefault(h[S.ID], h)
            rows = {h[S.ID]: h for _, h in picked} | ({pos: hits[rank - 1]} if rank else {})
            groups.append(Group(qid, text, pos, rank, score, [(h[S.ID], r, h["score"]) for r, h in picked], rows))
    key = "self_supervised" if items[0][0] is None else "queries"
    report[key]["short_of_negatives"] = short  # positives with fewer than per_query eligible negatives
    return groups


def _within_margins(negative: float, positive: float | None, n) -> bool:
    """Each margin that is set must hold: negative ≤ positive − absolute_margin; negative ≤ positive × (1 − m)."""
    if positive is None:
        return False
    if n.absolute_margin is not None and negative > positive - n.absolute_margin:
        return False
    return n.relative_margin is None or negative <= positive * (1 - n.relative_margin)


def self_supervised(data: Data, t, report: dict) -> list[Group]:
    """``self_supervised.pairs`` documents (seeded) with a title and a text: query = title, positive = the text
    alone, negatives mined with the title as query (the document itself excluded). Documents judged for a
    validation query are never drawn, so nothing of the validation set is trained on."""
    wanted = t.self_supervised.pairs
    report["self_supervised"] = {"requested": wanted, "pairs": 0}
    if not wanted:
        return []
    validation = set(data.validation_ids)
    held = {d for q, d, _ in data.judgments if q in validation}
    # the table's own query API: the only way to filter without reading every text
    titled = data.store.scan(data.table, [S.ID, S.TITLE], where=f"{S.TITLE} IS NOT NULL")
    ids = sorted(i for i, title in zip(titled[S.ID].to_pylist(), titled[S.TITLE].to_pylist())
                 if title and title.strip() and i not in held)
    chosen = random.Random(t.seed).sample(ids, min(wanted, len(ids)))
    rows = _rows(data.store, data.table, chosen)
    chosen = [d for d in chosen if d in rows and (rows[d].get(S.TEXT) or "").strip()]
    data.docs.update(rows)
    report["self_supervised"].update(eligible=len(ids), pairs=len(chosen))
    return mine(data, t, [(None, rows[d][S.TITLE], [d], {d}) for d in chosen], report)


def doc_text(group: Group, row: dict, fields, separator: str) -> str:
    """A document as the model reads it; for a self-supervised pair the text alone (its title is the query)."""
    from pipelines.rerank.retrieve import document_text

    if group.query_id is None:
        return row.get(S.TEXT) or ""
    return document_text(row.get(S.TITLE), row.get(S.TEXT), fields, separator)


def leak_record(data: Data) -> dict[str, Any]:
    """Which queries the model learned from, identified by their text (ids are per collection): the train and
    validation queries, and each self-supervised (title, document) pair. See pipelines/quality/leaks.py."""
    from pipelines.quality.leaks import training_record

    return training_record([data.queries[q] for q in data.train_ids], [data.queries[q] for q in data.validation_ids],
                           [(g.query, g.positive) for g in data.groups if g.query_id is None])


def count_pairs(groups: list[Group]) -> dict[str, int]:
    neg = sum(len(g.negatives) for g in groups)
    return {"total": len(groups) + neg, "positive": len(groups), "negative": neg,
            "self_supervised": sum(g.query_id is None for g in groups)}


def pair_lines(groups: list[Group]):
    """The audit file's lines: every (query, doc) trained on, with its label and first-stage rank and score."""
    for g in groups:
        source = "self_supervised" if g.query_id is None else "judged"
        passage = {d: r.get(S.PASSAGE_ID) for d, r in g.rows.items()}
        yield {"query_id": g.query_id, "doc_id": g.positive, "passage_id": passage.get(g.positive), "label": 1.0,
               "rank": g.rank, "score": g.score, "source": source}
        for doc, rank, score in g.negatives:
            yield {"query_id": g.query_id, "doc_id": doc, "passage_id": passage.get(doc), "label": 0.0,
                   "rank": rank, "score": score, "source": source}


def _select(texts: dict[str, str], qrels: list, max_queries: int | None, report: dict) -> tuple[dict, dict]:
    """The first ``max_queries`` judged queries (qrels file order) that have text; their relevant doc ids."""
    judged = list(dict.fromkeys(q for q, _, _ in qrels))
    with_text = [q for q in judged if q in texts]
    if not with_text:
        raise ValueError(f"none of the {len(judged)} judged query ids is in the queries file (e.g. {judged[:3]}); "
                         "use the queries file of the same collection as the qrels")
    chosen = set(with_text[:max_queries])
    counts = dict.fromkeys(("read", "query_not_in_queries_file", "beyond_max_queries", "not_relevant", "duplicate"), 0)
    positives: dict[str, list[str]] = {q: [] for q in with_text[:max_queries]}
    for q, doc, score in qrels:
        counts["read"] += 1
        reason = ("query_not_in_queries_file" if q not in texts else "beyond_max_queries" if q not in chosen
                  else "not_relevant" if score <= 0 else "duplicate" if doc in positives[q] else None)
        if reason:
            counts[reason] += 1
        else:
            positives[q].append(doc)
    report["judgments"] = counts
    report["queries"] = {"judged": len(judged), "not_in_queries_file": len(judged) - len(with_text),
                         "beyond_max_queries": len(with_text) - len(chosen)}
    return {q: texts[q] for q in positives}, positives


def _positives(queries: dict, positives: dict, found: dict, report: dict) -> tuple[dict, dict]:
    """Keep the relevant docs present in passages (the others are counted), and the queries left with one."""
    j = report["judgments"]
    j["skipped_not_in_passages"] = sum(d not in found for docs in positives.values() for d in docs)
    kept = {q: [d for d in docs if d in found] for q, docs in positives.items()}
    kept = {q: docs for q, docs in kept.items() if docs}
    j["used"] = sum(len(docs) for docs in kept.values())
    j["reconciled"] = j["read"] == sum(v for k, v in j.items() if k not in ("read", "reconciled"))
    report["queries"].update(without_positive_in_passages=len(queries) - len(kept), used=len(kept))
    return {q: queries[q] for q in kept}, kept


def _rows(store, table, ids: list[str]) -> dict[str, dict]:
    """{document id: row} of the judged documents: a document split into passages is represented by its first
    passage (its title and opening, where abstracts and summaries sit)."""
    if S.PASSAGE not in table.schema.names:
        return {r[S.ID]: r for r in store.rows_by_id(table, ids, [S.ID, S.TITLE, S.TEXT]).to_pylist()}
    rows = store.rows_by_id(table, ids, [S.ID, S.PASSAGE, S.TITLE, S.TEXT]).to_pylist()
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r[S.PASSAGE]):
        out.setdefault(r[S.ID], r)
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fingerprint(cfg, job: str, t, passages_content: list, inputs: dict, extra: list) -> str:
    """What the trained model depends on: the job's settings, the mining model and candidate settings, the
    passages' content and split (not their version: a reindex that changed nothing must not retrain), the document
    text fields (``extra``), the two input files."""
    r = cfg.retrieve
    return hashlib.sha256(json.dumps([
        job, t.model_dump(mode="json", exclude={"output"}), cfg.embed.model, cfg.embed.normalize, cfg.index.metric,
        r.source, r.rrf_k, r.hybrid_fusion, r.vector_weight, r.exact, r.level, r.passage_hits, cfg.embed.query_prompt,
        passages_content, extra,
        [v["sha256"] for v in inputs.values()],
    ], sort_keys=True).encode()).hexdigest()


def _previous(out: Path, key: str) -> dict[str, Any] | None:
    """The metadata of the model already in ``output``; refuse to replace a folder that is not one of ours."""
    if (out / META).is_file():
        return json.loads((out / META).read_text(encoding="utf-8"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{key} {out} exists and holds no {META}; point {key} at a new folder "
                              "(a trained model is only ever replaced by another)")
    return None


def _swap_in(tmp: Path, out: Path, run_id: str) -> None:
    """Replace ``out`` by ``tmp`` with two renames; the old model is deleted only once the new one is in place."""
    old = out.with_name(f"{out.name}.old-{run_id}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _finish(this: runs.Run) -> dict[str, Any]:
    this.report["finished_at"] = utcnow().isoformat()
    this.report["seconds"] = dict(this.timer.seconds, total=this.elapsed())
    return this.report


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
