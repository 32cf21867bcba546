"""The performance harness: batchrank against the code a user would write, same texts, same machine, same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf.py            # about 40 minutes on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf.py --quick    # subsets, about 10 minutes

Embedding, on SciFact's abstracts (long texts, ../shared/data/scifact) and on the MS MARCO dev queries (short
texts, ../shared/data/msmarco-passage-dev-queries; each repeated ``--repeat`` times under distinct ids, default 8:
55,840 texts, so that start-up is amortised as in a real corpus), each text set in turn:
1. the baseline: plain ``SentenceTransformer.encode`` in this process, at its best batch size (probed);
2. sentence-transformers' multi-process pool, one worker per CPU (GPU), the same batch size;
3. batchrank's index job end to end (read → embed → staging → one LanceDB commit → indexes), once per
   backend, each in its own driver process on one Ray instance started before any timing (a cluster is up
   before a job), with the peak resident memory of the driver and of the Ray workers sampled throughout;
   on SciFact, the eval job then gives each backend's nDCG@10 (exact vector search over its own table); each
   job's report gives the seconds from its process start to Ray up and to the first embedded row.
Reranking, on SciFact's test claims x top-k candidates (k=20):
4. the baseline: plain ``CrossEncoder.predict`` on the pairs in their natural order, at its best batch size;
5. batchrank's rerank job per backend (pair cache and carry-over off: every pair scored), end to end, and
   with the retrieval stage's time (measured on its own, same candidates) taken out; and the eval job's
   nDCG@10 for each cross-encoder backend on the same candidates.
The cross-encoder is all-MiniLM-L6-v2 fine-tuned by ``jobs.train_reranker`` on SciFact's train judgments
(cached by fingerprint under --work). Prints a table of figures and ratios; writes benchmarks/results/perf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SHARED = ROOT.parent / "shared" / "data"
MODEL = "all-MiniLM-L6-v2"
# (label, embed.backend, embed.dtype): torch at float32 is the like-for-like comparison; auto adds bf16 autocast
# on CPUs with AMX (and bf16/fp16 weights on GPU).
BACKENDS = [("torch fp32", "torch", "float32"), ("torch auto", "torch", "auto"), ("onnx", "onnx", "auto"),
            ("onnx-int8", "onnx-int8", "auto"), ("openvino", "openvino", "auto"),
            ("openvino-int8", "openvino-int8", "auto")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scifact", default=str(SHARED / "scifact"))
    ap.add_argument("--msmarco", default=str(SHARED / "msmarco-passage-dev-queries"))
    ap.add_argument("--work", default=str(Path("~/.batchrank/bench-perf").expanduser()))
    ap.add_argument("--docs", type=int, default=None, help="first N SciFact abstracts (default: all 5,183)")
    ap.add_argument("--queries", type=int, default=None, help="first N MS MARCO queries (default: all 6,980)")
    ap.add_argument("--repeat", type=int, default=8,
                    help="each MS MARCO query this many times, under distinct ids (default 8: 55,840 short texts)")
    ap.add_argument("--claims", type=int, default=None, help="first N SciFact test claims reranked (default: 300)")
    ap.add_argument("--k", type=int, default=20, help="candidates per claim for the rerank comparison")
    ap.add_argument("--max-length", type=int, default=128, help="cross-encoder tokens per pair (as trained)")
    ap.add_argument("--backends", default=",".join(b[0] for b in BACKENDS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="1,000 abstracts, 2,000 queries, 60 claims")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: embed,scifact,short,rerank,pool")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/perf.json"))
    args = ap.parse_args()
    if args.quick:
        args.docs, args.queries, args.claims = args.docs or 1000, args.queries or 2000, args.claims or 60
    gpu = args.device == "cuda"
    backends = [b for b in BACKENDS if b[0] in args.backends.split(",") and not (gpu and b[1] != "torch")]
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    from pipelines.cluster.runtime import worker_env

    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count() if gpu else 0, include_dashboard=False,
             runtime_env={"env_vars": worker_env()}, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict = {"date": datetime.now(UTC).isoformat(), "machine": _machine(gpu), "args": vars(args),
                    "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        docs = _read_jsonl(Path(args.scifact) / "corpus.jsonl")[: args.docs]
        sets = {} if "scifact" in skip else {
            "scifact": ([f"{d.get('title', '')} {d['text']}".strip() for d in docs], docs)}
        if "short" not in skip:
            queries = _read_jsonl(Path(args.msmarco) / "queries.jsonl")[: args.queries]
            # each query --repeat times under distinct ids (a corpus of short passages that amortises start-up as a
            # real one does): the copies share a content hash, and each is embedded (the job embeds per document)
            copies = [(f"{q['_id']}-{k}", q["text"]) for k in range(args.repeat) for q in queries]
            sets["msmarco"] = ([t for _, t in copies], [{"_id": i, "text": t} for i, t in copies])
        if "embed" not in skip:
            result["embedding"] = {name: _embedding(name, texts, rows, args, work, address, backends)
                                   for name, (texts, rows) in sets.items()}
        if "rerank" not in skip:
            result["rerank"] = _rerank(args, work, address, backends, docs)
    finally:
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(_table(result))
    print(f"\nwrote {args.out}")


# --- embedding ----------------------------------------------------------------------------------------------


def _embedding(name: str, texts: list[str], rows: list[dict], args, work: Path, address: str, backends) -> dict:
    from sentence_transformers import SentenceTransformer

    from pipelines.models import resolve_model

    print(f"\n== embedding: {name}, {len(texts):,} texts", flush=True)
    device = args.device
    model = SentenceTransformer(resolve_model(MODEL), device=device)
    best, probe = _best_batch(lambda batch, bs: model.encode(batch, batch_size=bs), texts, (8, 16, 32, 64))
    start = time.perf_counter()
    reference = model.encode(texts, batch_size=best, normalize_embeddings=True)
    plain_s = time.perf_counter() - start
    out: dict = {"texts": len(texts), "plain": {"batch_size": best, "probe": probe, "seconds": round(plain_s, 2),
                                                "per_second": round(len(texts) / plain_s, 2)}}
    print(f"plain encode (batch {best}): {len(texts) / plain_s:.1f}/s", flush=True)
    # The same work as the job: plain encode of the passages the job embeds (a document longer than the model's
    # window is several passages, where encode alone reads its first 256 tokens and drops the rest)
    from pipelines.index.embed import Embedder

    _, inputs, _ = Embedder(MODEL, device="cpu", dtype="float32").chunker.split(
        [r.get("title") or "" for r in rows], [r["text"] for r in rows])
    passages = [t for doc in inputs for t in doc]
    if len(passages) > len(texts):
        start = time.perf_counter()
        model.encode(passages, batch_size=best, normalize_embeddings=True)
        seconds = time.perf_counter() - start
        out["plain_passages"] = {"passages": len(passages), "batch_size": best, "seconds": round(seconds, 2),
                                 "docs_per_second": round(len(texts) / seconds, 2)}
        print(f"plain encode of the job's {len(passages):,} passages: {len(texts) / seconds:.1f} docs/s", flush=True)

    if "pool" in args.skip.split(","):
        del model
        return _index_jobs(name, rows, args, work, address, backends, out, reference)
    workers = ["cuda:0"] * max(1, _gpus()) if device == "cuda" else ["cpu"] * (os.cpu_count() or 1)
    start = time.perf_counter()
    pool = model.start_multi_process_pool(workers)
    try:
        model.encode(texts[: len(workers) * 8], pool=pool, batch_size=best)  # warm the workers
        warm = time.perf_counter()
        model.encode(texts, pool=pool, batch_size=best, normalize_embeddings=True)
        done = time.perf_counter()
    finally:
        model.stop_multi_process_pool(pool)
    out["pool"] = {"workers": len(workers), "start_seconds": round(warm - start, 2),
                   "seconds": round(done - warm, 2), "per_second": round(len(texts) / (done - warm), 2),
                   "per_second_with_start": round(len(texts) / (done - start), 2)}
    print(f"multi-process pool ({len(workers)} workers): {out['pool']['per_second']:.1f}/s "
          f"({out['pool']['per_second_with_start']:.1f}/s with its start)", flush=True)
    del model
    return _index_jobs(name, rows, args, work, address, backends, out, reference)


def _index_jobs(name: str, rows: list[dict], args, work: Path, address: str, backends, out: dict,
                reference: np.ndarray) -> dict:
    """batchrank's index job end to end, once per backend, against ``out``'s plain baseline."""
    texts, device = rows, args.device
    corpus = work / f"{name}-corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    out["index_job"] = {}
    for label, backend, dtype in backends:
        db = work / f"{name}-{label.replace(' ', '-')}"
        _rmtree(db)
        cfg = {"storage": {"uri": str(db)}, "corpus": {"path": str(corpus)}, "ray": {"address": address},
               "embed": {"model": MODEL, "backend": backend, "dtype": dtype, "device": device,
                         **({"gpus_per_actor": 1, "actors": max(1, _gpus())} if device == "cuda" else {})}}
        if name == "scifact":
            cfg["eval"] = {"collection": args.scifact, "sources": ["vector"], "output": str(db / "eval")}
            cfg["retrieve"] = {"exact": True}
        config = _write(work / f"{name}-{label.replace(' ', '-')}.yaml", cfg)
        run = _job("index", config, memory=True)
        report = run["report"]
        figures = {"backend": backend, "dtype": dtype, "seconds": run["wall_seconds"],
                   "per_second": round(len(texts) / run["wall_seconds"], 2),
                   "ratio": round(len(texts) / run["wall_seconds"] / out["plain"]["per_second"], 3),
                   "ratio_same_work": round(out["plain_passages"]["seconds"] / run["wall_seconds"], 3)
                   if "plain_passages" in out else None,
                   "pipeline_per_second": report.get("docs_per_second"), "rows": report["rows"],
                   "memory": run["memory"], "seconds_by_stage": report.get("seconds"),
                   "since_process_start": _firsts(report)}
        figures["vectors_vs_plain"] = _compare_vectors(db, rows, reference)
        if name == "scifact":
            ev = _job("eval", config)["report"]
            figures["ndcg@10"] = next(v["metrics"]["ndcg@10"] for v in ev["variants"] if v["source"] == "vector")
        out["index_job"][label] = figures
        print(f"index job [{label}]: {figures['per_second']:.1f}/s end to end ({figures['ratio']}x plain"
              + (f", {figures['ratio_same_work']}x plain on its passages" if figures["ratio_same_work"] else "") + "); "
              f"peak memory driver {figures['memory']['driver_mib']} MiB, workers {figures['memory']['workers_mib']} "
              f"MiB" + (f"; nDCG@10 {figures['ndcg@10']}" if "ndcg@10" in figures else ""), flush=True)
    return out


def _compare_vectors(db: Path, rows: list[dict], reference: np.ndarray) -> dict:
    """Cosine between the stored vectors and the plain baseline's, per document."""
    import lancedb

    table = lancedb.connect(str(db)).open_table("passages").to_arrow().select(["id", "vector"])
    where = {r["_id"]: i for i, r in enumerate(rows)}
    ids = table["id"].to_pylist()
    stored = np.stack(table["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    ref = reference[[where[i] for i in ids]]
    cos = (stored * ref).sum(1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(ref, axis=1)
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6)}


# --- reranking ----------------------------------------------------------------------------------------------


def _rerank(args, work: Path, address: str, backends, docs: list[dict]) -> dict:
    from sentence_transformers import CrossEncoder

    print(f"\n== reranking: SciFact test claims x top-{args.k}", flush=True)
    data = Path(args.scifact)
    corpus = work / "rerank-corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in _read_jsonl(data / "corpus.jsonl"))
    db, reranker = work / "rerank-db", work / "reranker"
    claims = _test_claims(data)[: args.claims]
    judgments = _judgments(data / "qrels/test.tsv")
    log = work / "claims-log.jsonl"
    now = datetime.now(UTC).isoformat()
    with log.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"query": text, "timestamp": now}) + "\n" for _, text in claims)
    base = {"storage": {"uri": str(db)}, "corpus": {"path": str(corpus)}, "ray": {"address": address},
            "embed": {"model": MODEL, "device": args.device},
            "query_log": {"path": str(log)}, "retrieve": {"k": args.k, "source": "vector", "exact": True},
            "train": {"queries": str(data / "queries.jsonl"), "qrels": str(data / "qrels/train.tsv"),
                      "output": str(reranker), "max_queries": 400, "max_length": 128,
                      "negatives": {"per_query": 3, "range_max": 30}}}
    setup = _write(work / "rerank-setup.yaml", base)
    from pipelines.config import load_config
    from pipelines.store import Store

    cfg = load_config(setup)
    table = Store(cfg.storage).open(cfg.storage.passages_table)
    if table is None or table.count_rows() != sum(1 for _ in corpus.open()):
        _job("index", setup)
    train = _job("train_reranker", setup)["report"]
    out: dict = {"claims": len(claims), "k": args.k, "max_length": args.max_length,
                 "cross_encoder": {"base": MODEL, "trained_on": "SciFact train judgments", "status": train["status"]}}

    # candidates as the rerank job's Retriever makes them, timed on their own (the retrieval stage's cost)
    from pipelines.rerank.query_log import read_query_log
    from pipelines.rerank.retrieve import Retriever

    selected = read_query_log(cfg.query_log).selected
    version = Store(cfg.storage).open(cfg.storage.passages_table).version
    start = time.perf_counter()
    retriever = Retriever(cfg.storage, cfg.index, passages_version=version, model=MODEL, k=args.k, exact=True,
                          device=args.device, num_threads=os.cpu_count())
    loaded = time.perf_counter()
    cands = retriever(selected).to_pylist()
    retrieve_s = time.perf_counter() - loaded
    out["retrieval"] = {"seconds": round(retrieve_s, 2), "model_load_seconds": round(loaded - start, 2)}
    del retriever
    pairs = [(row["query"], text) for row in cands for text in row["_cand_texts"]]
    model = CrossEncoder(str(reranker), device=args.device, max_length=args.max_length)
    best, probe = _best_batch(lambda batch, bs: model.predict(batch, batch_size=bs, show_progress_bar=False), pairs,
                              (8, 16, 32, 64))
    start = time.perf_counter()
    model.predict(pairs, batch_size=best, show_progress_bar=False)
    plain_s = time.perf_counter() - start
    out["plain"] = {"pairs": len(pairs), "batch_size": best, "probe": probe, "seconds": round(plain_s, 2),
                    "per_second": round(len(pairs) / plain_s, 2)}
    print(f"plain CrossEncoder.predict (batch {best}): {len(pairs) / plain_s:.1f} pairs/s", flush=True)
    del model

    out["rerank_job"] = {}
    for label, backend, dtype in backends:
        cfg_b = dict(base, rerank={"model": str(reranker), "top_n": args.k, "max_length": args.max_length,
                                   "backend": backend, "dtype": dtype, "device": args.device, "cache": False,
                                   "carry_over": False, "fusion": "none",
                                   **({"gpus_per_actor": 1, "actors": max(1, _gpus())} if args.device == "cuda"
                                      else {})})
        config = _write(work / f"rerank-{label.replace(' ', '-')}.yaml", cfg_b)
        run = _job("rerank", config, memory=True)
        report = run["report"]
        scored = report["pairs"]["scored"]
        stage_s = max(run["wall_seconds"] - retrieve_s, 1e-9)
        figures = {"backend": backend, "dtype": dtype, "pairs": scored, "seconds": run["wall_seconds"],
                   "per_second_end_to_end": round(scored / run["wall_seconds"], 2),
                   "per_second_without_retrieval": round(scored / stage_s, 2),
                   "ratio_end_to_end": round(scored / run["wall_seconds"] / out["plain"]["per_second"], 3),
                   "ratio_without_retrieval": round(scored / stage_s / out["plain"]["per_second"], 3),
                   "pipeline_per_second": report["pairs"]["per_second"], "memory": run["memory"],
                   "since_process_start": _firsts(report),
                   **_rankings_ndcg(load_config(config), claims, judgments)}
        out["rerank_job"][label] = figures
        print(f"rerank job [{label}]: {figures['per_second_without_retrieval']:.1f} pairs/s without retrieval "
              f"({figures['ratio_without_retrieval']}x), {figures['per_second_end_to_end']:.1f} end to end "
              f"({figures['ratio_end_to_end']}x); nDCG@10 {figures['ndcg@10']}", flush=True)
    return out


# --- helpers ------------------------------------------------------------------------------------------------


def _best_batch(run, items: list, sizes) -> tuple[int, dict]:
    """The fastest batch size of ``run(items, batch_size)`` on a probe of the items (after a warm-up)."""
    probe = items[:: max(1, len(items) // 512)][:512]
    run(probe[:32], sizes[0])
    speeds = {}
    for bs in sizes:
        start = time.perf_counter()
        run(probe, bs)
        speeds[bs] = round(len(probe) / (time.perf_counter() - start), 2)
    print("  batch size probe (items/s): " + ", ".join(f"{k}: {v}" for k, v in speeds.items()), flush=True)
    return max(speeds, key=speeds.get), speeds


class _Memory:
    """Peak resident memory of a job's driver (its process tree) and of the Ray worker processes (``ray::*``) of the
    harness's Ray instance, sampled every 0.25 s. RSS: shared pages count once per process."""

    def __init__(self, pid: int):
        import psutil

        self.psutil, self.driver, self.ray = psutil, psutil.Process(pid), psutil.Process(os.getpid())
        self.peak_driver = self.peak_workers = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                driver = [self.driver, *self.driver.children(recursive=True)]
                d = sum(_rss(p) for p in driver)
            except self.psutil.Error:
                continue
            w, mine = 0, {x.pid for x in driver}
            for p in self.ray.children(recursive=True):  # this harness's Ray: its raylet's workers
                try:
                    cmd = p.cmdline()
                except self.psutil.Error:
                    continue
                if cmd and cmd[0].startswith("ray::") and p.pid not in mine:
                    w += _rss(p)
            self.peak_driver, self.peak_workers = max(self.peak_driver, d), max(self.peak_workers, w)
            self.peak_total = max(self.peak_total, d + w)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mib = 1 << 20
        return {"driver_mib": round(self.peak_driver / mib), "workers_mib": round(self.peak_workers / mib),
                "total_mib": round(self.peak_total / mib)}


def _rss(p) -> int:
    try:
        return p.memory_info().rss
    except Exception:  # noqa: BLE001 - a process that ended between listing and reading
        return 0


def _job(name: str, config: Path, memory: bool = False) -> dict:
    """Run ``python -m jobs.<name> --config <config>``; its report, wall seconds and (optionally) peak memory."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"jobs.{name}", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _Memory(proc.pid) if memory else None
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    mem = sampler.stop() if sampler else None
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        print(stdout[-4000:])
        raise SystemExit(f"jobs.{name} failed ({proc.returncode})")
    path = re.findall(r"reports?: .*?(\S+\.json)", stdout)[-1]  # the summary's last line names the JSON report
    return {"report": json.loads(Path(path).read_text()), "wall_seconds": round(wall, 2), "memory": mem}


def _firsts(report: dict) -> dict:
    """Seconds from the job's process start to its first events (Ray up, first embedded row or scored pair)."""
    return {k: v.get("since_process_start_s") for k, v in report.get("first", {}).items()}


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _test_claims(data: Path) -> list[tuple[str, str]]:
    texts = {q["_id"]: q["text"] for q in _read_jsonl(data / "queries.jsonl")}
    ids = dict.fromkeys(line.split("\t")[0] for line in list((data / "qrels/test.tsv").open())[1:])
    return [(q, texts[q]) for q in ids]


def _judgments(path: Path) -> list[tuple[str, str, int]]:
    rows = [line.rstrip("\n").split("\t") for line in list(path.open(encoding="utf-8"))[1:]]
    return [(q, d, int(r)) for q, d, r in rows]


def _ndcg(ranked: dict[str, list[str]], judgments) -> float:
    """nDCG@10 of ranked lists (best first) over the claims ranked; claims are judged by ``judgments``."""
    from pipelines.quality.metrics import evaluate

    run = {q: {d: float(len(ids) - i) for i, d in enumerate(ids)} for q, ids in ranked.items()}
    return round(evaluate(run, [j for j in judgments if j[0] in ranked], ["ndcg@10"])["ndcg@10"], 4)


def _rankings_ndcg(cfg, claims: list[tuple[str, str]], judgments) -> dict:
    """nDCG@10 of the rankings table the rerank job published, looked up as an online system would; and of the
    first stage's order of the same candidates (every candidate is kept: top_n = k)."""
    from pipelines.lookup import Rankings

    found = Rankings(cfg, with_documents=False).lookup_many([text for _, text in claims])
    ranked = {qid: r.hits for (qid, _), r in zip(claims, found) if r is not None}
    return {"ndcg@10": _ndcg({q: [h.id for h in hits] for q, hits in ranked.items()}, judgments),
            "first_stage_ndcg@10": _ndcg({q: [h.id for h in sorted(hits, key=lambda h: h.retrieval_rank)]
                                          for q, hits in ranked.items()}, judgments),
            "claims_ranked": len(ranked)}


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _machine(gpu: bool) -> dict:
    from benchmarks.common import cpu_model
    from pipelines.models.batching import cpu_supports_bf16

    out = {"cpu": cpu_model(), "cpus": os.cpu_count(), "cpu_bf16": cpu_supports_bf16()}
    if gpu:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _table(result: dict) -> str:
    lines = ["", "| what | texts | per second | ratio to baseline | peak memory (driver / workers) | nDCG@10 |",
             "|---|---|---|---|---|---|"]
    for name, e in result.get("embedding", {}).items():
        base = e["plain"]["per_second"]
        lines.append(f"| {name}: plain encode (batch {e['plain']['batch_size']}) | {e['texts']:,} | {base} | 1.00 | | |")
        if p := e.get("pool"):  # --skip pool
            lines.append(f"| {name}: multi-process pool ({p['workers']}) | {e['texts']:,} | {p['per_second']} "
                         f"({p['per_second_with_start']} with start) | {p['per_second'] / base:.2f} | | |")
        if pp := e.get("plain_passages"):
            lines.append(f"| {name}: plain encode of the job's {pp['passages']:,} passages | {e['texts']:,} | "
                         f"{pp['docs_per_second']} | {pp['docs_per_second'] / base:.2f} | | |")
        for label, f in e["index_job"].items():
            m = f["memory"]
            same = f" ({f['ratio_same_work']:.2f} same work)" if f.get("ratio_same_work") else ""
            lines.append(f"| {name}: index job [{label}], end to end | {e['texts']:,} | {f['per_second']} | "
                         f"{f['ratio']:.2f}{same} | {m['driver_mib']} / {m['workers_mib']} MiB | "
                         f"{f.get('ndcg@10', '')} |")
    r = result.get("rerank")
    if r:
        base = r["plain"]["per_second"]
        lines.append(f"| rerank: plain CrossEncoder.predict (batch {r['plain']['batch_size']}) | "
                     f"{r['plain']['pairs']:,} pairs | {base} | 1.00 | | |")
        for label, f in r["rerank_job"].items():
            m = f["memory"]
            lines.append(f"| rerank job [{label}], retrieval excluded | {f['pairs']:,} pairs | "
                         f"{f['per_second_without_retrieval']} | {f['ratio_without_retrieval']:.2f} | "
                         f"{m['driver_mib']} / {m['workers_mib']} MiB | {f['ndcg@10']} |")
            lines.append(f"| rerank job [{label}], end to end | {f['pairs']:,} pairs | {f['per_second_end_to_end']} "
                         f"| {f['ratio_end_to_end']:.2f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
