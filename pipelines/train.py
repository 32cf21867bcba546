"""Train a reranker: judged (query, passage) pairs + hard negatives mined from ``passages`` → a CrossEncoder.

Reads top to bottom::

    queries.jsonl + qrels TSV → judged queries (first ``max_queries``) → positives looked up in passages
    → queries embedded by the table's bi-encoder → exact top ``mine_k`` → negatives = top minus judged docs
    → CrossEncoderTrainer (BCE) → saved to ``<output>.tmp-<run_id>`` → swapped into ``output``

A rerun with the same inputs (the fingerprint in ``<output>/batchrank-train.json``) reuses the saved model.

Example::

    report = run(load_config("configs/demo.yaml"))
    CrossEncoder(report["output"]).predict([("query", "passage")])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import schema as S
from pipelines.report import Timer, new_run_id, save_report, utcnow
from pipelines.retrieve import document_text

log = logging.getLogger("batchrank.train")
META = "batchrank-train.json"
PAIRS = "batchrank-train-pairs.jsonl"  # which (query, doc, label) the model was trained on, for audits
EVERY_S = 15.0


def run(cfg, *, force: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Fine-tune ``train.base_model`` on ``train.qrels``; return the run report (also written as JSON).

    ``force`` retrains even when ``train.output`` holds a model trained from the same inputs. On failure
    the report is written with ``status: failed`` and the error is raised again; ``output`` is untouched.
    """
    cfg.require("train", command="batchrank train-reranker")
    run_id = run_id or new_run_id("train")
    t0, timer = time.perf_counter(), Timer()
    report: dict[str, Any] = {"job": "train", "run_id": run_id, "status": "running", "started_at": utcnow().isoformat(),
                              "output": cfg.train.output, "base_model": cfg.train.base_model,
                              "bi_encoder": cfg.embed.model}
    try:
        _train(cfg, run_id, report, timer, force)
    except BaseException as exc:
        report.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        exc.batchrank_report = _finish(cfg, report, timer, t0)  # the CLI prints its summary
        raise
    return _finish(cfg, report, timer, t0)


def _train(cfg, run_id: str, report: dict[str, Any], timer: Timer, force: bool) -> None:
    from pipelines.store import Store

    t, out = cfg.train, Path(cfg.train.output)
    if "://" in t.output:
        raise ValueError(f"train.output must be a local folder (got {t.output}); copy the model to object storage "
                         "after training")
    with timer("read"):
        texts, qrels = read_queries(t.queries), read_qrels(t.qrels)
        store = Store(cfg.storage)
        table = store.passages_for_queries(cfg.embed.model)  # negatives are mined from it
        report["passages_version"] = table.version
        fingerprint = _fingerprint(cfg, store.content_fingerprint(table))
        report["fingerprint"] = fingerprint
        previous = _previous(out)
        if previous and previous.get("fingerprint") == fingerprint and not force:
            report.update(status="cached", trained_at=previous.get("trained_at"), trained_by=previous.get("run_id"),
                          **{k: previous[k] for k in ("queries", "judgments", "pairs", "steps") if k in previous})
            return
        queries, positives = _select(texts, qrels, t.max_queries, report)
        found = _fetch(store, table, sorted({d for docs in positives.values() for d in docs}), cfg)
        queries, examples = _positives(queries, positives, found, report)
    with timer("mine"):
        examples += _mine(cfg, store, table, queries, qrels, report)
    report["pairs"] = {"total": len(examples), "positive": report["judgments"]["used"],
                       "negative": len(examples) - report["judgments"]["used"]}
    if not examples:
        raise ValueError(f"no training pairs: none of the judged documents of {t.qrels} is in "
                         f"'{cfg.storage.passages_table}'; index the collection the judgments refer to")
    tmp = out.with_name(f"{out.name}.tmp-{run_id}")
    try:
        with timer("train"):  # fit, then save the model to tmp
            report.update(_fit(t, examples, tmp))
        with timer("publish"):
            meta = {k: report[k] for k in ("fingerprint", "run_id", "base_model", "bi_encoder", "passages_version",
                                           "queries", "judgments", "pairs", "steps", "loss")}
            meta.update(trained_at=utcnow().isoformat(), config=t.model_dump(mode="json"),
                        train_seconds=timer.seconds["train"])
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            (tmp / PAIRS).write_text("".join(json.dumps({k: ex[k] for k in ("query_id", "doc_id", "label")}) + "\n"
                                             for ex in examples), encoding="utf-8")
            _swap_in(tmp, out, run_id)
        report.update(status="succeeded", trained_at=meta["trained_at"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_queries(path: str) -> dict[str, str]:
    """``queries.jsonl`` (BEIR: one ``{"_id", "text"}`` per line) → {query id: text}."""
    texts = {}
    for n, line in enumerate(_lines(path, "train.queries", "a BEIR queries.jsonl"), 1):
        try:
            row = json.loads(line)
            texts[str(row["_id"])] = str(row["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected a JSON object with _id and text ({exc!r})") from None
    return texts


def read_qrels(path: str) -> list[tuple[str, str, int]]:
    """A BEIR qrels TSV (header ``query-id<TAB>corpus-id<TAB>score``) → [(query id, doc id, score)] in file order."""
    layout = "expected a header line, then query-id<TAB>corpus-id<TAB>score (BEIR; TREC qrels need converting)"
    rows = []
    for n, line in enumerate(_lines(path, "train.qrels", "a BEIR qrels TSV such as qrels/train.tsv"), 1):
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


def _lines(path: str, key: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no file {path}; point it at {what}")
    with open(path, encoding="utf-8") as fh:
        yield from (line.rstrip("\r\n") for line in fh if line.strip())


def _fingerprint(cfg, passages_content: str) -> str:
    """What the trained model depends on: the train settings, the mining model, the passages' content (not their
    version: a reindex that changed nothing must not retrain), the document text, the two input files."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.train.model_dump(mode="json", exclude={"output"}), sort_keys=True).encode())
    fields = (cfg.rerank.input_fields, cfg.rerank.separator) if cfg.rerank else None
    h.update(json.dumps([cfg.embed.model, cfg.embed.normalize, cfg.index.metric, passages_content, fields]).encode())
    for path in (cfg.train.queries, cfg.train.qrels):
        with open(path, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _previous(out: Path) -> dict[str, Any] | None:
    """The metadata of the model already in ``output``; refuse to replace a folder that is not one of ours."""
    if (out / META).is_file():
        return json.loads((out / META).read_text(encoding="utf-8"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"train.output {out} exists and holds no {META}; point train.output at a new folder "
                              "(a trained reranker is only ever replaced by another)")
    return None


def _select(texts: dict[str, str], qrels: list, max_queries: int | None, report: dict) -> tuple[dict, dict]:
    """The first ``max_queries`` judged queries (qrels file order) that have text; their relevant doc ids."""
    judged = list(dict.fromkeys(q for q, _, _ in qrels))
    with_text = [q for q in judged if q in texts]
    if not with_text:
        raise ValueError(f"none of the {len(judged)} judged query ids is in train.queries (e.g. {judged[:3]}); "
                         "use the queries file of the same collection as train.qrels")
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


def _positives(queries: dict, positives: dict, found: dict, report: dict) -> tuple[dict, list[dict]]:
    """(query, positive passage, 1.0) examples; judgments whose doc is not in passages are counted, not used."""
    j, examples, kept = report["judgments"], [], {}
    j["skipped_not_in_passages"] = sum(d not in found for docs in positives.values() for d in docs)
    for q, docs in positives.items():
        docs = [d for d in docs if d in found]
        if docs:
            kept[q] = queries[q]
            examples += [{"query_id": q, "doc_id": d, "query": queries[q], "document": found[d], "label": 1.0}
                         for d in docs]
    j["used"] = len(examples)
    j["reconciled"] = j["read"] == sum(v for k, v in j.items() if k not in ("read", "reconciled"))
    report["queries"].update(without_positive_in_passages=len(queries) - len(kept), used=len(kept))
    return kept, examples


def _doc_text(row: dict, cfg=None) -> str:
    """The text the cross-encoder reads for a document: as the rerank job builds it (``rerank.input_fields``)."""
    fields, sep = (cfg.rerank.input_fields, cfg.rerank.separator) if cfg is not None and cfg.rerank else \
        (["title", "text"], " ")
    return document_text(row.get(S.TITLE), row.get(S.TEXT), fields, sep)


def _fetch(store, table, ids: list[str], cfg=None) -> dict[str, str]:
    """{id: passage text} for the ids present in passages."""
    rows = store.rows_by_id(table, ids, [S.ID, S.TITLE, S.TEXT])
    return {r[S.ID]: _doc_text(r, cfg) for r in rows.to_pylist()}


def _mine(cfg, store, table, queries: dict[str, str], qrels: list, report: dict) -> list[dict]:
    """Hard negatives: ``negatives_per_query`` drawn (seeded) from the exact top ``mine_k`` minus all judged docs."""
    from pipelines.models import configure_threads, load_bi_encoder

    t, e = cfg.train, cfg.embed
    configure_threads(_cpus())
    model = load_bi_encoder(e.model, device=e.device, dtype=e.dtype, max_seq_length=e.max_seq_length,
                            trust_remote_code=e.trust_remote_code)
    ids = list(queries)
    vectors = model.encode([queries[q] for q in ids], batch_size=e.batch_size, normalize_embeddings=e.normalize,
                           convert_to_numpy=True, show_progress_bar=False).astype("float32")
    del model
    judged: dict[str, set[str]] = {}
    for q, doc, _ in qrels:
        judged.setdefault(q, set()).add(doc)
    rng, examples, short, step = random.Random(t.seed), [], 0, cfg.retrieve.queries_per_call
    for start in range(0, len(ids), step):
        hits = store.search_batch(vectors[start:start + step], k=t.mine_k, index_cfg=cfg.index, exact=True,
                                  columns=[S.ID, S.TITLE, S.TEXT], table=table).to_pylist()
        by_query: dict[int, list[dict]] = {}
        for hit in hits:
            by_query.setdefault(hit["query_index"], []).append(hit)
        for i, q in enumerate(ids[start:start + step]):
            pool = [h for h in by_query.get(i, []) if h[S.ID] not in judged[q]]
            short += len(pool) < t.negatives_per_query
            examples += [{"query_id": q, "doc_id": h[S.ID], "query": queries[q], "document": _doc_text(h, cfg),
                          "label": 0.0}
                         for h in rng.sample(pool, min(t.negatives_per_query, len(pool)))]
    report["queries"]["short_of_negatives"] = short  # fewer than negatives_per_query unjudged docs in the top mine_k
    return examples


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fit(t, examples: list[dict], folder: Path) -> dict[str, Any]:
    """Fine-tune a fresh one-logit head on ``t.base_model`` with binary cross-entropy; save to ``folder``."""
    import tempfile

    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )
    from transformers import PrinterCallback, TrainingArguments, set_seed

    from pipelines.models import configure_threads, pick_device, resolve_model

    configure_threads(_cpus())
    device = pick_device(t.device)
    set_seed(t.seed)  # the new head's initial weights too
    model = CrossEncoder(resolve_model(t.base_model), num_labels=1, max_length=t.max_length, device=device)
    data = Dataset.from_dict({k: [ex[k] for ex in examples] for k in ("query", "document", "label")})
    total = t.max_steps or -(-int(len(examples) * t.epochs) // t.batch_size)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    # transformers 5 dropped warmup_ratio (sentence-transformers still accepts it, with a warning): a float < 1
    # in warmup_steps is the ratio there.
    old_api = "warmup_ratio" in TrainingArguments.__dataclass_fields__
    warmup = {"warmup_ratio": t.warmup_ratio} if old_api else {"warmup_steps": t.warmup_ratio}
    with tempfile.TemporaryDirectory(prefix="batchrank-trainer-") as scratch:  # nothing is saved there
        args = CrossEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
            per_device_train_batch_size=t.batch_size, learning_rate=t.learning_rate, seed=t.seed, **warmup,
            bf16=bf16, fp16=device == "cuda" and not bf16, use_cpu=device == "cpu", report_to="none",
            save_strategy="no", logging_steps=max(1, min(50, total // 20)), dataloader_num_workers=0,
            disable_tqdm=not sys.stderr.isatty())
        callback = _progress_callback(t.batch_size)
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=data,
                                      loss=losses.BinaryCrossEntropyLoss(model), callbacks=[callback])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; our callback writes timed lines
        result = trainer.train()
    model.save(str(folder))
    losses_seen = callback.losses or [result.training_loss]
    return {"device": device, "steps": result.global_step, "epochs": round(trainer.state.epoch or 0, 3),
            "pairs_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 2),
            "loss": {"first": round(losses_seen[0], 4), "final": round(losses_seen[-1], 4),
                     "mean": round(result.training_loss, 4)}}


def _progress_callback(batch_size: int):
    """A line on stderr every ~15 s while training (step/total, last logged loss, pairs/s); silent on a TTY,
    where the Trainer's own bar runs."""
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        def __init__(self):
            self.losses: list[float] = []
            self.quiet = sys.stderr.isatty()
            self.start = self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if not self.quiet and (now - self.last >= EVERY_S or state.global_step == state.max_steps):
                self.last, elapsed = now, now - self.start
                loss = f"{self.losses[-1]:.4f}" if self.losses else "-"
                sys.stderr.write(f"train: step {state.global_step}/{state.max_steps}, loss {loss} "
                                 f"[{elapsed:,.0f}s, {state.global_step * batch_size / elapsed:,.1f} pairs/s]\n")
                sys.stderr.flush()

    return TrainProgress()


def _swap_in(tmp: Path, out: Path, run_id: str) -> None:
    """Replace ``out`` by ``tmp`` with two renames; the old model is deleted only once the new one is in place."""
    old = out.with_name(f"{out.name}.old-{run_id}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _finish(cfg, report: dict[str, Any], timer: Timer, t0: float) -> dict[str, Any]:
    report["finished_at"] = utcnow().isoformat()
    report["seconds"] = dict(timer.seconds, total=round(time.perf_counter() - t0, 3))
    return save_report(report, cfg)


def summary(report: dict[str, Any]) -> str:
    """A few lines for humans at the end of a run."""
    head = f"train run {report['run_id']}: {report['status']}"
    if report["status"] == "cached":
        return (f"{head}\n  reusing the reranker trained at {report.get('trained_at')} in {report['output']} "
                f"(pass --force to retrain)\n  report: {report.get('report_path')}")
    if report["status"] != "succeeded":
        return (f"{head} ({report.get('error')})\n  the previous reranker in {report['output']} (if any) is intact; "
                f"report: {report.get('report_path')}")
    q, j, p, s = report["queries"], report["judgments"], report["pairs"], report["seconds"]
    return "\n".join([
        head,
        (f"  queries: {q['used']:,} used of {q['judged']:,} judged ({q['without_positive_in_passages']:,} without a "
         f"positive in passages, {q['beyond_max_queries']:,} beyond max_queries, {q['not_in_queries_file']:,} "
         "not in the queries file)"),
        f"  judgments: {j['read']:,} read, {j['used']:,} used, {j['skipped_not_in_passages']:,} not in passages",
        f"  pairs: {p['total']:,} = {p['positive']:,} positive + {p['negative']:,} hard negatives",
        (f"  training: {report['steps']:,} steps on {report['device']}, {report['pairs_per_second']} pairs/s, "
         f"loss {report['loss']['first']} → {report['loss']['final']}"),
        "  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()),
        f"  model: {report['output']} (base {report['base_model']}); report: {report['report_path']}",
    ])
