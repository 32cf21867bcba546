"""Train a reranker: judged (query, passage) pairs + hard negatives mined from ``passages`` → a CrossEncoder.

Reads top to bottom (the shared steps are in ``pipelines/quality/training.py``)::

    judged queries → train | validation split → Groups (query, positive, mined negatives) [+ self-supervised]
    → BCE pairs or listwise (query, positive, negative_1..n) rows
    → CrossEncoderTrainer from train.base_model (a cross-encoder keeps its head; a bi-encoder gets a new one),
      evaluated on the validation queries' top validation_k candidates, best checkpoint kept
    → the kept model scores those candidates → fusion weight fitted → saved and swapped into ``output``

Validation reranks what the first stage really returns: a positive outside the top ``validation_k`` is not
added (it counts as missed), so the numbers are those the rerank job would get.

Example::

    report = run(load_config("configs/demo.yaml"))
    CrossEncoder(report["output"]).predict([("query", "passage")])
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from pipelines.quality import training
from pipelines.quality.beir import read_qrels, read_queries  # noqa: F401 - kept importable from here
from pipelines.quality.trainer import progress_callback, summary_lines, trainer_args
from pipelines.quality.trainer import train as fit_trainer
from pipelines.quality.training import META, PAIRS  # noqa: F401 - the files written next to the model

AT = "ndcg@10"


def run(cfg, *, force: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Fine-tune ``train.base_model`` on ``train.qrels``; return the run report (also written as JSON).

    ``force`` retrains even when ``train.output`` holds a model trained from the same inputs. On failure
    the report is written with ``status: failed`` and the error is raised again; ``output`` is untouched.
    """
    return training.run(cfg, "train", job="train", command="batchrank train-reranker", fit=_train, force=force,
                        run_id=run_id, fingerprint=list(_fields(cfg)))


def _fields(cfg) -> tuple[list[str], str]:
    """The document text the cross-encoder reads: as the rerank job builds it (``rerank.input_fields``)."""
    return (list(cfg.rerank.input_fields), cfg.rerank.separator) if cfg.rerank else (["title", "text"], " ")


def _train(cfg, data: training.Data, folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    t, (fields, sep) = cfg.train, _fields(cfg)
    groups, n = data.groups, t.negatives.per_query
    if t.loss == "listwise":  # a fixed number of columns: groups short of negatives are left out
        groups = [g for g in groups if len(g.negatives) == n]
        if not groups:
            raise ValueError(f"no query has {n} eligible negatives for the listwise loss; lower "
                             "train.negatives.per_query or the margins, or raise train.negatives.range_max")
    report["pairs"] = dict(training.count_pairs(groups), left_out_short=len(data.groups) - len(groups))
    data.groups = groups
    columns = _columns(t.loss, groups, data.docs, fields, sep, n)
    samples, candidates = _validation(cfg, data, fields, sep)
    data.encoder = None  # free the mining model before training
    result = _fit(t, columns, samples, folder)
    scores, checkpoints = result.pop("validation_scores", None), result.pop("checkpoints", None)
    meta: dict[str, Any] = {"head": result.pop("head"), "loss": dict(result.pop("loss"), name=t.loss),
                            "training": result, "validation": None}
    if samples:
        meta.update(_fusion(cfg, data, candidates, scores))
        # the evaluator's nDCG@10 at each evaluation (its ideal ranking knows only the positives among the
        # candidates: fine to compare checkpoints; the ir-measures numbers above count every judged document)
        meta["validation"]["checkpoints"] = checkpoints
    report.update(meta)
    return meta


def _columns(loss: str, groups, docs: dict, fields, sep: str, n: int) -> dict[str, list]:
    text = training.doc_text
    if loss == "listwise":
        cols = {"query": [g.query for g in groups],
                "positive": [text(g, g.row(g.positive, docs), fields, sep) for g in groups]}
        for i in range(n):
            cols[f"negative_{i + 1}"] = [text(g, g.row(g.negatives[i][0], docs), fields, sep) for g in groups]
        return cols
    cols: dict[str, list] = {"query": [], "document": [], "label": []}
    for g in groups:
        for doc, label in [(g.positive, 1.0)] + [(d, 0.0) for d, _, _ in g.negatives]:
            cols["query"].append(g.query)
            cols["document"].append(text(g, g.row(doc, docs), fields, sep))
            cols["label"].append(label)
    return cols


def _validation(cfg, data: training.Data, fields, sep: str):
    """Evaluator samples (query, positives, the first stage's top ``validation_k`` in order) and the candidates
    ({query id: (doc ids, first-stage scores)}) of the validation queries; (None, None) without a split."""
    from pipelines.rerank.retrieve import document_text

    ids = data.validation_ids
    if not ids:
        return None, None
    r = cfg.retrieve
    lists = data.candidates([data.queries[q] for q in ids], k=cfg.train.validation_k, source=r.source, exact=r.exact)
    samples, candidates = [], {}
    for q, hits in zip(ids, lists):
        samples.append({"query": data.queries[q],
                        "positive": [document_text(data.docs[d].get("title"), data.docs[d].get("text"), fields, sep)
                                     for d in data.positives[q]],
                        "documents": [document_text(h["title"], h["text"], fields, sep) for h in hits]})
        candidates[q] = ([h["id"] for h in hits], [h["score"] for h in hits])
    return samples, candidates


def _fusion(cfg, data: training.Data, candidates: dict, scores: list) -> dict[str, Any]:
    """Validation nDCG@10 of the first stage, the kept model and their blend, and the blend's weight fitted on
    the validation queries (held-out *training* judgments; the fused number is the one it was fitted on)."""
    from pipelines.quality.metrics import evaluate
    from pipelines.rerank.fusion import fit_weight

    judged = [j for j in data.judgments if j[0] in candidates]
    full = {q: (ids, ce, fs) for (q, (ids, fs)), ce in zip(candidates.items(), scores)}
    weight, curve = fit_weight(full, judged)
    first = evaluate({q: dict(zip(ids, fs)) for q, (ids, _, fs) in full.items()}, judged, [AT])[AT]
    alone = evaluate({q: dict(zip(ids, ce)) for q, (ids, ce, _) in full.items()}, judged, [AT])[AT]
    source, k, n = cfg.retrieve.source, cfg.train.validation_k, len(candidates)
    return {"validation": {"queries": n, "source": source, "k": k,
                           AT: {"first_stage": round(first, 4), "reranker": round(alone, 4),
                                "fused": round(curve[weight], 4)}},
            "fusion": {"cross_encoder": weight, "source": source, "k": k,
                       "curve": {str(w): round(v, 4) for w, v in curve.items()}, "validation_queries": n}}


@contextlib.contextmanager
def _quiet_logger(name: str, level: int):
    """Raise one library logger's level for a block (its expected messages are said by batchrank itself)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _head(path: str) -> str:
    """``kept`` for a one-label cross-encoder (its trained head goes on training), ``new`` for anything else (a
    bi-encoder's or a plain encoder's weights: a fresh one-logit head)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return "new"  # CrossEncoder names what is wrong
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if classifier and config.num_labels != 1:
        raise ValueError(f"train.base_model {path} is a classifier with {config.num_labels} labels; start from a "
                         "reranker (one label) or from a bi-encoder")
    return "kept" if classifier else "new"


def _fit(t, columns: dict[str, list], samples: list[dict] | None, folder: Path) -> dict[str, Any]:
    """Fine-tune ``t.base_model`` with ``t.loss``; keep the best checkpoint on ``samples``; save to ``folder``."""
    import tempfile

    from datasets import Dataset
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from transformers import set_seed

    from pipelines.models import configure_threads, pick_device, resolve_model

    configure_threads(training.cpus())
    device, path = pick_device(t.device), resolve_model(t.base_model)
    head = _head(path)
    set_seed(t.seed)  # a new head's initial weights too
    if head == "new":  # expected, and said in the summary ("head new"): not a warning a user must interpret
        logging.getLogger(__name__).info("starting the cross-encoder from %s's encoder with a new one-logit head",
                                         path)
    with _quiet_logger("sentence_transformers.base.model", logging.ERROR):
        model = CrossEncoder(path, num_labels=None if head == "kept" else 1, max_length=t.max_length, device=device)
    listwise = t.loss == "listwise"
    loss = losses.MultipleNegativesRankingLoss(model) if listwise else losses.BinaryCrossEntropyLoss(model)
    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, always_rerank_positives=False, name="validation",
                                               batch_size=t.batch_size, write_csv=False) if samples else None
    metric = f"eval_validation_{AT}" if evaluator else None
    data = Dataset.from_dict(columns)
    sampler = {"batch_sampler": BatchSamplers.NO_DUPLICATES} if listwise else {}
    with tempfile.TemporaryDirectory(prefix="batchrank-trainer-") as scratch:  # checkpoints, removed at the end
        args = trainer_args(CrossEncoderTrainingArguments, t, scratch, device, len(data), metric, **sampler)
        pairs_per_row = 1 + t.negatives.per_query if listwise else 1  # a listwise row is a whole group
        callback = progress_callback(t.batch_size * pairs_per_row)
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=data, loss=loss,
                                      evaluator=evaluator, callbacks=[callback])
        out = fit_trainer(trainer, callback, metric)
    model.save(str(folder))
    if samples:  # the kept model's scores of the validation candidates, for the fusion weight
        model.eval()
        out["validation_scores"] = [
            model.predict([(s["query"], d) for d in s["documents"]], batch_size=t.batch_size,
                          show_progress_bar=False, convert_to_numpy=True).tolist() if s["documents"] else []
            for s in samples]
    return dict(out, device=device, head=head)


def summary(report: dict[str, Any]) -> str:
    """A few lines for humans at the end of a run."""
    lines = summary_lines(report, "reranker")
    if isinstance(lines, str):
        return lines
    head, body = lines
    v, f = report.get("validation"), report.get("fusion")
    if v:
        m = v[AT]
        body.append(f"  validation ({v['queries']:,} held-out queries, top {v['k']} {v['source']}): nDCG@10 first "
                    f"stage {m['first_stage']:.4f}, reranker {m['reranker']:.4f}, fused {m['fused']:.4f} "
                    f"(cross-encoder weight {f['cross_encoder']}, used by rerank.fusion: auto)")
    else:
        body.append("  validation: none (train.validation_fraction is 0): last checkpoint kept, no fusion weight")
    body.append(f"  model: {report['output']} (base {report['base_model']}, head {report['head']}, loss "
                f"{report['loss']['name']}); report: {report['report_path']}")
    return "\n".join([head, *body])
