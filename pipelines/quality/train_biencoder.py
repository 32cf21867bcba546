"""Fine-tune the bi-encoder: contrastive training on judged queries, in-batch + mined hard negatives.

Reads top to bottom (the shared steps are in ``pipelines/quality/training.py``)::

    judged queries → train | validation split → Groups (query, positive, mined negatives) [+ self-supervised]
    → (anchor, positive, negative_1..n) rows → SentenceTransformerTrainer, MultipleNegativesRankingLoss, batches
      without duplicates (every other row's positive and negatives are negatives too)
    → evaluated on the validation queries over a small corpus (their top 100 candidates + their positives),
      best checkpoint kept → saved and swapped into ``train_biencoder.output``

The documents read as the index embeds them (``embed.input_fields``). To use the model, set ``embed.model`` to
the output folder and index into a new table (the index job refuses a table built by another model).

Example::

    report = run(load_config("configs/demo.yaml"))
    SentenceTransformer(report["output"]).encode(["query"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.quality import training
from pipelines.quality.trainer import progress_callback, summary_lines, trainer_args
from pipelines.quality.trainer import train as fit_trainer


def run(cfg, *, force: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Fine-tune ``train_biencoder.base_model`` (default ``embed.model``); return the run report (also written as
    JSON). ``force`` retrains even when the output holds a model trained from the same inputs. On failure the
    report is written with ``status: failed`` and the error is raised again; the output is untouched."""
    return training.run(cfg, "train_biencoder", job="train-biencoder", command="batchrank train-biencoder",
                        fit=_train, force=force, run_id=run_id,
                        fingerprint=[list(cfg.embed.input_fields), cfg.embed.separator])


def _train(cfg, data: training.Data, folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    t, n = cfg.train_biencoder, cfg.train_biencoder.negatives.per_query
    fields, sep = cfg.embed.input_fields, cfg.embed.separator
    groups = [g for g in data.groups if len(g.negatives) == n]  # a fixed number of columns
    if not groups:
        raise ValueError(f"no query has {n} eligible negatives; lower train_biencoder.negatives.per_query or the "
                         "margins, or raise train_biencoder.negatives.range_max")
    report["pairs"] = dict(training.count_pairs(groups), left_out_short=len(data.groups) - len(groups))
    data.groups = groups
    text = training.doc_text
    columns = {"anchor": [g.query for g in groups],
               "positive": [text(g, g.row(g.positive, data.docs), fields, sep) for g in groups]}
    for i in range(n):
        columns[f"negative_{i + 1}"] = [text(g, g.row(g.negatives[i][0], data.docs), fields, sep)
                                        for g in groups]
    validation = _validation(cfg, data, fields, sep)
    data.encoder = None  # free the mining model before training
    result = _fit(t, t.base_model or cfg.embed.model, columns, validation, folder)
    checkpoints, before = result.pop("checkpoints", None), result.pop("before", None)
    meta: dict[str, Any] = {"loss": dict(result.pop("loss"), name="mnrl"), "training": result, "validation": None}
    if validation:
        queries, corpus, _ = validation
        meta["validation"] = {"queries": len(queries), "corpus": len(corpus), "source": cfg.retrieve.source,
                              "k": cfg.train_biencoder.validation_k,
                              "ndcg@10": {"before": before, "after": result.pop("after")},
                              "checkpoints": checkpoints}
    report.update(meta)
    return meta


def _validation(cfg, data: training.Data, fields, sep: str):
    """(queries, corpus, relevant docs) for ``InformationRetrievalEvaluator``: the corpus is the union of the
    validation queries' top ``validation_k`` candidates and their positives, so evaluation does not embed the whole
    corpus."""
    from pipelines.rerank.retrieve import document_text

    ids = data.validation_ids
    if not ids:
        return None
    r = cfg.retrieve
    lists = data.candidates([data.queries[q] for q in ids], k=cfg.train_biencoder.validation_k, source=r.source,
                            exact=r.exact)
    corpus = {h["id"]: document_text(h["title"], h["text"], fields, sep) for hits in lists for h in hits}
    for q in ids:  # a positive outside every candidate list is read as its first passage
        for d in data.positives[q]:
            corpus.setdefault(d, document_text(data.docs[d].get("title"), data.docs[d].get("text"), fields, sep))
    return {q: data.queries[q] for q in ids}, corpus, {q: set(data.positives[q]) for q in ids}


def _fit(t, base_model: str, columns: dict[str, list], validation, folder: Path) -> dict[str, Any]:
    """MultipleNegativesRankingLoss on ``columns``; the best checkpoint on ``validation`` kept; saved to ``folder``."""
    import tempfile

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from transformers import set_seed

    from pipelines.models import configure_threads, load_bi_encoder, pick_device

    configure_threads(training.cpus())
    device = pick_device(t.device)
    set_seed(t.seed)
    model = load_bi_encoder(base_model, device=device, dtype="float32", max_seq_length=t.max_seq_length)
    evaluator, metric, before = None, None, None
    if validation:
        evaluator = InformationRetrievalEvaluator(*validation, name="validation", batch_size=t.batch_size,
                                                  mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[10],
                                                  precision_recall_at_k=[10], map_at_k=[100], write_csv=False)
        before = round(evaluator(model)[evaluator.primary_metric], 4)  # also names the metric to pick by
        metric = f"eval_{evaluator.primary_metric}"
    data = Dataset.from_dict(columns)
    with tempfile.TemporaryDirectory(prefix="batchrank-trainer-") as scratch:  # checkpoints, removed at the end
        args = trainer_args(SentenceTransformerTrainingArguments, t, scratch, device, len(data), metric,
                                     batch_sampler=BatchSamplers.NO_DUPLICATES)
        callback = progress_callback(t.batch_size, unit="examples")
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, evaluator=evaluator,
                                             loss=losses.MultipleNegativesRankingLoss(model), callbacks=[callback])
        out = fit_trainer(trainer, callback, metric)
    model.save(str(folder))
    if evaluator:  # the kept model's score, on the same queries and corpus
        out.update(before=before, after=round(trainer.state.best_metric, 4))
    return dict(out, device=device)


def summary(report: dict[str, Any]) -> str:
    """A few lines for humans at the end of a run, with how to use the model."""
    lines = summary_lines(report, "bi-encoder")
    if isinstance(lines, str):
        return lines
    head, body = lines
    v = report.get("validation")
    if v:
        m = v["ndcg@10"]
        body.append(f"  validation ({v['queries']:,} held-out queries over {v['corpus']:,} documents: their top "
                    f"{v['k']} {v['source']} candidates and positives): nDCG@10 {m['before']:.4f} before, "
                    f"{m['after']:.4f} after")
    else:
        body.append("  validation: none (train_biencoder.validation_fraction is 0): last checkpoint kept")
    body += [f"  model: {report['output']} (base {report['base_model']}); report: {report['report_path']}",
             (f"  to use it: set embed.model to {report['output']} and run `batchrank index` into a new table "
              "(e.g. another storage.passages_table): the index job refuses a table built by another model")]
    return "\n".join([head, *body])
