"""The eval job: a BEIR collection's test queries through every candidate source and rerank depth → quality and cost.

Reads top to bottom::

    collection files → judged queries of the split (first ``max_queries``, qrels order)
    → leak check: no evaluated query (by text) and not the eval judgments file reached any trained model in play
    → passages: reused when it holds exactly the corpus (same ids and content hashes), else the index job
    → queries encoded once → per source (vector, fts, hybrid): top max(100, max K) candidates, timed
    → per reranked source: pairs scored in depth order (ranks 1..K1, then K1+1..K2, ...), each slice timed,
      so the cost at depth K is the real cumulative time and no pair is scored twice
    → runs per variant → ir-measures: nDCG@10, MRR@10, recall@100 → eval.json, eval.md, eval.png

The run at depth K is the top K re-ordered by the cross-encoder (or its fusion with the first stage), then
the rest of the first-stage list in its order, so recall@100 stays comparable across depths.

Example::

    report = run(load_config("configs/scifact-eval.yaml"))
    print(summary(report))
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pipelines import runs
from pipelines import schema as S
from pipelines.quality.leaks import LeakError, check_leaks  # noqa: F401  (LeakError: part of this module's API)
from pipelines.report import Progress, Timer, utcnow

log = logging.getLogger("batchrank.eval")
MEASURES = ("ndcg@10", "mrr@10", "recall@100")
SCORE_CHUNK = 4096  # pairs per predict call: progress stays live, predict still sorts each chunk by length


def run(cfg, *, run_id: str | None = None) -> dict[str, Any]:
    """Evaluate every configured variant on ``eval.collection``; return the report (also eval.json/.md/.png).

    On failure the run report is written with ``status: failed`` and the error is raised again.
    """
    job = runs.start(cfg, "eval", sections=("eval",), command="batchrank eval", run_id=run_id,
                     collection=cfg.eval and cfg.eval.collection, split=cfg.eval and cfg.eval.split)
    return runs.guarded(job, cfg, body=lambda: _evaluate(cfg, job.report, job.timer), finish=lambda: _finish(cfg, job),
                        on_saved=_write_json)


def _evaluate(cfg, report: dict[str, Any], timer: Timer) -> None:
    from pipelines.registry import require_extra

    require_extra("matplotlib", "eval", "batchrank eval (its eval.png)")
    from pipelines.quality.beir import read_qrels, read_queries

    e = cfg.eval
    with timer("read"):
        files = _files(cfg)
        texts, qrels = read_queries(files["queries"], "eval.queries"), read_qrels(files["qrels"], "eval.qrels")
        judged = list(dict.fromkeys(q for q, _, _ in qrels))
        with_text = [q for q in judged if q in texts]
        if not with_text:
            raise ValueError(f"none of the {len(judged)} judged query ids of {files['qrels']} is in {files['queries']}"
                             f" (e.g. {judged[:3]}); use the queries file of the same collection")
        chosen = with_text[:e.max_queries]
        keep = set(chosen)
        judgments = [j for j in qrels if j[0] in keep]
    report["files"] = files
    report["queries"] = {"judged": len(judged), "without_text": len(judged) - len(with_text),
                         "beyond_max_queries": len(with_text) - len(chosen), "evaluated": len(chosen)}
    with timer("leak_check"):
        report["leak_check"] = check_leaks(cfg, {q: texts[q] for q in chosen}, files["qrels"], files["queries"])
    if leaked := report["leak_check"].get("excluded"):  # eval.leaked_queries: exclude; listed in the report
        chosen = [q for q in chosen if q not in leaked]
        if not chosen:
            raise ValueError(f"every evaluated query's text was seen in training ({len(leaked)}); evaluate on "
                             "another split or retrain without them")
        keep = set(chosen)
        judgments = [j for j in qrels if j[0] in keep]
        report["queries"].update(excluded_as_leaked=len(leaked), evaluated=len(chosen))

    sources = list(dict.fromkeys([*e.sources, *_rerank_sources(cfg)]))
    with timer("passages"):
        report["passages"] = ensure_passages(cfg, files["corpus"], needs_fts=any(s != "vector" for s in sources))

    from pipelines.rerank.retrieve import CandidateSearch
    from pipelines.store import Store

    store = Store(cfg.storage)
    table = store.passages_for_queries(cfg.embed.identity)
    report["passages"].update(table=cfg.storage.passages_table, version=table.version)
    query_texts = [texts[q] for q in chosen]
    k = max([100, *e.depths])
    report.update(candidates_k=k, depths=list(e.depths) if cfg.rerank else [])
    vectors, encode_s = None, 0.0
    report["models"] = {"bi_encoder": cfg.embed.model, "cross_encoder": cfg.rerank.model if cfg.rerank else None}
    if any(s != "fts" for s in sources):
        with timer("encode"):
            vectors, report["models"]["bi_encoder_device"], encode_s = _encode(cfg, query_texts)
    candidates, first_stage, reranked = {}, {}, _rerank_sources(cfg)
    for source in sources:
        columns = (S.TITLE, S.TEXT) if source in reranked else ()  # texts only where the cross-encoder reads them
        search = CandidateSearch.from_config(store, table, cfg, k=k, source=source, columns=columns)
        with timer(f"retrieve_{source}"), search:
            start = time.perf_counter()
            hits = search(vectors, query_texts)
            search_s = time.perf_counter() - start
        candidates[source] = [h.to_pydict() for h in hits]
        seconds = search_s + (encode_s if source != "fts" else 0.0)  # what this source alone would cost
        first_stage[source] = {"seconds": round(seconds, 3), "search_seconds": round(search_s, 3),
                               "queries_per_second": round(len(chosen) / seconds, 1) if seconds else None,
                               "queries_short_of_k": sum(len(c[S.ID]) < k for c in candidates[source])}
    report["first_stage"] = first_stage

    variants = [_variant(source, None, None, [c[S.ID] for c in candidates[source]], chosen, judgments, 0,
                         first_stage[source]["seconds"], 0.0) for source in sources]
    if cfg.rerank:
        variants += _rerank(cfg, chosen, query_texts, candidates, first_stage, judgments, report, timer)
    report["variants"] = variants
    report["best"] = _best(variants)
    report["status"] = "succeeded"


def _rerank_sources(cfg) -> list[str]:
    if cfg.rerank is None:
        return []
    return list(cfg.eval.rerank_sources or [cfg.retrieve.source])


def _rerank(cfg, chosen, query_texts, candidates, first_stage, judgments, report, timer) -> list[dict[str, Any]]:
    """Score each reranked source's pairs slice by slice in depth order; one variant (two with fusion) per depth."""
    import numpy as np

    from pipelines.rerank.fusion import blend, resolve_weight
    from pipelines.rerank.retrieve import document_text
    from pipelines.rerank.score import Scorer, scorer_settings

    rr = cfg.rerank
    weight, origin = resolve_weight(rr)
    with timer("load_cross_encoder"):
        scorer = Scorer(**scorer_settings(rr))
    report["models"].update(cross_encoder_device=str(getattr(scorer.model, "device", "?")),
                            fusion={"weight": weight, "origin": origin})
    variants = []
    for source in _rerank_sources(cfg):
        cands = candidates[source]
        ce: list[list[float]] = [[] for _ in cands]
        previous, pairs_done, score_s = 0, 0, 0.0
        with timer(f"score_{source}"), Progress(f"score {source}", unit="pairs") as progress:
            for depth in cfg.eval.depths:
                owners, pairs = [], []
                for qi, (query, c) in enumerate(zip(query_texts, cands)):
                    for r in range(previous, min(depth, len(c[S.ID]))):
                        owners.append(qi)
                        pairs.append((query, document_text(c[S.TITLE][r], c[S.TEXT][r], rr.input_fields,
                                                           rr.separator)))
                start = time.perf_counter()
                for i in range(0, len(pairs), SCORE_CHUNK):
                    scores = scorer.predict(pairs[i:i + SCORE_CHUNK])
                    for qi, s in zip(owners[i:i + SCORE_CHUNK], scores.tolist()):
                        ce[qi].append(s)
                    progress.update(len(scores))
                score_s += time.perf_counter() - start
                pairs_done += len(pairs)
                previous = depth
                total = first_stage[source]["seconds"] + score_s
                ranked = [_reorder(c[S.ID], np.asarray(s)) for c, s in zip(cands, ce)]
                variants.append(_variant(source, depth, None, ranked, chosen, judgments, pairs_done, total, score_s))
                if weight is not None:
                    fused = [_reorder(c[S.ID], blend(s, c["score"][:len(s)], weight)) for c, s in zip(cands, ce)]
                    variants.append(_variant(source, depth, weight, fused, chosen, judgments, pairs_done, total,
                                             score_s))
    return variants


def _reorder(ids: list[str], scores) -> list[str]:
    """The first len(scores) ids by descending score (ties keep first-stage order), then the rest unchanged."""
    import numpy as np

    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [ids[i] for i in order] + list(ids[len(order):])


def _variant(source, depth, fusion, ranked, chosen, judgments, pairs, seconds, score_seconds) -> dict[str, Any]:
    from pipelines.quality.metrics import evaluate

    # Scores from ranks: ir-measures sorts by score, and first-stage ties (BM25, RRF) must keep our order. A document
    # ranked more than once (retrieve.level: passage) counts at its best rank.
    ranked = [list(dict.fromkeys(ids)) for ids in ranked]
    run = {q: {d: float(len(ids) - i) for i, d in enumerate(ids)} for q, ids in zip(chosen, ranked)}
    name = source if depth is None else f"{source} → CE@{depth}" + ("" if fusion is None else f" + fusion (w={fusion:g})")
    return {"name": name, "source": source, "depth": depth, "fusion": fusion,
            "metrics": {m: round(v, 6) for m, v in evaluate(run, judgments, MEASURES).items()},
            "pairs": pairs, "seconds": round(seconds, 3), "rerank_seconds": round(score_seconds, 3),
            "pairs_per_second": round(pairs / score_seconds, 1) if pairs and score_seconds else None}


def _best(variants: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest nDCG@10 (the cheaper one on a tie), with its gain and cost over its own first stage."""
    if not variants:
        return None
    best = min(variants, key=lambda v: (-v["metrics"]["ndcg@10"], v["seconds"]))
    base = next((v for v in variants if v["source"] == best["source"] and v["depth"] is None), None)
    out = {"name": best["name"], "source": best["source"], "depth": best["depth"], "ndcg@10": best["metrics"]["ndcg@10"],
           "pairs": best["pairs"], "seconds": best["seconds"], "reranked": any(v["depth"] for v in variants)}
    if base is not None and best["depth"] is not None:
        out.update(first_stage=base["name"], **{"first_stage_ndcg@10": base["metrics"]["ndcg@10"]},
                   gain=round(best["metrics"]["ndcg@10"] - base["metrics"]["ndcg@10"], 6),
                   first_stage_seconds=base["seconds"], extra_seconds=round(best["seconds"] - base["seconds"], 3))
    return out


def _encode(cfg, texts: list[str]) -> tuple[Any, str, float]:
    """Query vectors, the device, and the seconds encoding took (model loading excluded)."""
    import numpy as np

    from pipelines.models import load_bi_encoder
    from pipelines.models.prompts import query_prompt

    e = cfg.embed
    model = load_bi_encoder(e.model, device=e.device, dtype=e.dtype, max_seq_length=e.max_seq_length,
                            trust_remote_code=e.trust_remote_code, backend=e.backend, batch_tokens=e.batch_tokens)
    prompt = query_prompt(model, e)
    start = time.perf_counter()  # the cost of a source: encoding the queries, not loading the model
    vectors = model.encode(texts, batch_size=e.batch_size, normalize_embeddings=e.normalize, convert_to_numpy=True,
                           show_progress_bar=False, prompt=prompt)
    return np.asarray(vectors, dtype=np.float32), str(model.device), time.perf_counter() - start


def _files(cfg) -> dict[str, str]:
    """The collection's corpus, queries and qrels files (``eval.queries``/``eval.qrels``/``corpus`` override)."""
    e = cfg.eval
    files = {"queries": e.queries or os.path.join(e.collection, "queries.jsonl"),
             "qrels": e.qrels or os.path.join(e.collection, "qrels", f"{e.split}.tsv"),
             "corpus": cfg.corpus.path if cfg.corpus else os.path.join(e.collection, "corpus.jsonl")}
    missing = [p for k, p in files.items() if not (k == "corpus" and cfg.corpus) and not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"eval.collection {e.collection} is not a BEIR collection: missing {', '.join(missing)}"
                                " (expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv; or set eval.queries, "
                                "eval.qrels and a corpus section)")
    return files


def ensure_passages(cfg, corpus_path, *, needs_fts: bool) -> dict[str, Any]:
    """Reuse ``passages`` when it holds exactly the corpus as the index job would write it; else run the index job."""
    from pipelines.config import CorpusConfig
    from pipelines.config.index import same_passages
    from pipelines.store import Store

    corpus = cfg.corpus or CorpusConfig(path=corpus_path, format="jsonl")
    icfg = cfg.model_copy(update={"corpus": corpus})
    store = Store(cfg.storage)
    if _no_local_table(cfg) or store.passages_model() is None:  # the first test before LanceDB loads
        reason = "no passages table yet"
    else:
        table = store.passages_for_queries(cfg.embed.identity)  # refuses a table of another bi-encoder
        from pipelines.index.corpus import corpus_fingerprint

        expected = corpus_fingerprint(icfg)
        if expected is None:
            reason = f"a {corpus.format} corpus is not fingerprinted here; the index job checks it (unchanged rows stay)"
        elif expected != store.content_fingerprint(table):
            reason = "passages differs from the corpus (ids or content hashes)"
        elif not same_passages(store.passages_settings(), cfg.passage_settings):
            reason = "passages was split into passages with other settings (chunk, embed.document_prompt)"
        else:
            same = "passages holds exactly the corpus (same ids and content hashes)"
            if needs_fts and not store.has_fts_index(cfg.index.fts.columns, table=table):
                built = store.ensure_indexes(cfg.index)  # the vectors are right: only the index is missing
                return {"action": "reused", "reason": f"{same}; built the missing full-text index",
                        "indexes": built}
            return {"action": "reused", "reason": same}
    from pipelines.index import job as index

    log.info("indexing %s: %s", corpus.path, reason)
    _start_ray(cfg)
    done = index.run(icfg)
    return {"action": "indexed", "reason": reason, "index_run_id": done["run_id"], "rows": done["rows"]}


def _no_local_table(cfg) -> bool:
    """True when the passages table surely does not exist (a local database without its folder): known without
    loading LanceDB, so that Ray, which the index job then needs, starts first (see ``_start_ray``)."""
    uri = cfg.storage.uri
    if "://" in uri:
        return False
    return not os.path.isdir(os.path.join(os.path.expanduser(uri), f"{cfg.storage.passages_table}.lance"))


def _start_ray(cfg) -> None:
    """Start (or join) Ray for the index job, before it runs.

    Ray starts its processes (GCS, raylet, log monitor, ...) with ``subprocess.Popen(preexec_fn=...)``: fork, then
    exec. Once LanceDB is loaded, each such fork runs LanceDB's at-fork hook in the child for the moment before
    exec, and the hook warns "lancedb fork support is experimental" (five lines per start). Where the passages
    table did not exist, LanceDB is not loaded yet and nothing is hooked. Where it was loaded (to find that
    passages must be rebuilt), the warning is spurious: it is about children that go on using LanceDB, and these
    exec Ray's binaries at once. It is silenced for Ray's start only; any other fork still warns."""
    import sys
    import warnings

    from pipelines.cluster.runtime import init_ray

    if "lancedb" not in sys.modules:
        init_ray(cfg.ray)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lancedb fork support is experimental", category=RuntimeWarning)
        init_ray(cfg.ray)


def summary(report: dict[str, Any]) -> str:
    """The one-screen table and where the reports are."""
    from pipelines.quality.eval_report import table, verdict

    head = f"eval run {report['run_id']}: {report['status']}"
    if report["status"] != "succeeded":
        return f"{head} ({report.get('error')})\n  report: {report.get('report_path')}"
    q, p = report["queries"], report["passages"]
    title = (f"{head}: {report['collection']} ({report['split']}), {q['evaluated']:,} queries; passages "
             f"v{p['version']} {p['action']} ({p['reason']})")
    lines = [title, "", table(report), "", verdict(report)]
    out = report.get("outputs") or {}
    lines.append(f"reports: {', '.join(out.values())}" if out else f"report: {report.get('report_path')}")
    return "\n".join(lines)


def _finish(cfg, job: runs.Run) -> dict[str, Any]:
    """Timings; on success eval.png and eval.md in ``eval.output`` (eval.json once the run report is saved)."""
    from pipelines.quality.eval_report import write_outputs

    report = job.report
    report["finished_at"] = utcnow().isoformat()
    report["seconds"] = dict(job.timer.seconds, total=job.elapsed())
    if report["status"] == "succeeded":
        report["outputs"] = write_outputs(report, cfg.eval.output)
    return report


def _write_json(report: dict[str, Any]) -> None:
    from pipelines.quality.eval_report import write_json

    if report["status"] == "succeeded":
        write_json(report, report["outputs"]["json"])
