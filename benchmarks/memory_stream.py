"""Streaming memory: peak resident memory of an index run, all processes together, against corpus size.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE RAY_AUTH_MODE=disabled \
        .venv/bin/python benchmarks/memory_stream.py [--docs 250000 1000000] [--night 0.01] [--work DIR]

The issue's criterion: a synthetic corpus of 1,000,000 short documents indexed with a tiny model uses at most
4 GiB of resident memory, all processes together, and memory does not grow between 250k and 1M documents.
With ``--night``, also issue 20's: an incremental night on the 1M table with 1% of the documents changed keeps
the driver's peak within 10% of the 250k full run's, and takes at most 5% of the full run's wall time.

For each N (each run in a fresh process, on a fresh LanceDB folder):
1. a synthetic corpus of N short documents (8-30 words from a fixed vocabulary, a 2-6 word title, fixed seed) is
   streamed to ``--files`` JSONL files under the work dir (never all in memory; reused when already there);
2. a tiny random BERT (hidden 32, 2 layers, saved with a word-piece tokenizer and loaded through the real
   sentence-transformers loader, as tests/conftest.py builds it) is the bi-encoder;
3. ``pipelines.index.job.run(cfg)`` runs in a child process, starting its own local Ray, with the default index
   settings (ANN ivf_hnsw_sq from 50k rows, BM25 on title and text);
4. a thread here samples, every ``--interval`` seconds, every process of that run: the child (the driver), its
   descendants (gcs_server, raylet, agents, Ray workers and actors) and any process whose command line names the
   run's Ray session folder. RSS is summed, and so is PSS (``psutil.memory_full_info``, from smaps_rollup);
5. with ``--night FRACTION``, after the full run: a copy of the corpus (``corpus-N-night<FRACTION>``), streamed
   line by line, with round(FRACTION × N) documents (drawn with a fixed seed, across all files) given a few more
   vocabulary words and every other line byte-identical, is indexed in a fresh child against the same LanceDB
   folder, with the same settings: an incremental run that compares content hashes and embeds only the changed
   documents (every document is in the copy: the snapshot deletes nothing). It is sampled as in 4.

Which figure the criterion uses: **PSS summed over the processes**. Ray's object store and the shared libraries
(torch is ~0.5 GiB of shared text per process) are mapped by several processes; summed RSS counts each shared page
once per process that maps it, summed PSS splits it between them, so summed PSS is the memory the run really
holds. Summed RSS is reported too, as a conservative upper bound, and the verdict is given for both.

Writes ``benchmarks/results/memory_stream.json`` (per N: peaks in total and per process kind, per job phase
and per quarter of the run, a downsampled timeline, wall time, docs/s, rows from the job report, the driver's
per-document structures; and the growth ratio largest N / smallest N) and prints a table. With ``--night``, each
N's entry holds ``night``: the same fields for the incremental run, plus ``changed_docs``, ``wall_ratio_to_full``
(night wall / full wall), ``driver_peak_ratio_to_smallest_full`` (night driver peak PSS / the smallest N's full
run's), ``rows_reconcile`` (read = written + unchanged + quarantined) and ``written_matches_changed``; a second
table and verdict lines give them. The full timeline of each run is kept as CSV in the work dir (the night's
under ``run-N/night``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MIB = 1 << 20
LIMIT_GIB = 4.0

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
               "RAY_AUTH_MODE": "disabled", "LANCE_LOG": "error", "LANCEDB_LOG": "error"}.items():
    os.environ.setdefault(_k, _v)

# The tiny model's vocabulary is these words (plus letters and digits): every corpus word is a real token.
_WORDS = ("the a of and to in is for on with how learn machine learning guide study studying ml cooking recipes "
         "beginners cell cells protein gene cancer risk vitamin brain data model effect patients clinical trial "
         "dose response analysis method results increase decrease level expression pathway mouse human tissue "
         "blood heart liver kidney lung signal growth factor receptor binding activity function structure "
         "network training memory sleep diet exercise age sex group control sample test rate time")
VOCAB = tuple(_WORDS.split())


# ---------------------------------------------------------------------------------------------------------------
# corpus and model
# ---------------------------------------------------------------------------------------------------------------
def write_corpus(folder: Path, n: int, files: int, seed: int = 0, words: tuple[int, int] = (8, 30)) -> dict:
    """N documents in ``files`` JSONL files, written line by line (nothing held); reused if complete."""
    marker = folder / "_COMPLETE.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("docs") == n and meta.get("files") == files and meta.get("seed") == seed and \
                meta.get("words") == list(words):
            return meta
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    per_file = -(-n // files)
    written, size, t0 = 0, 0, time.perf_counter()
    for f in range(files):
        path = folder / f"part-{f:04d}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for i in range(f * per_file, min(n, (f + 1) * per_file)):
                title = " ".join(rng.choices(VOCAB, k=rng.randint(2, 6)))
                text = " ".join(rng.choices(VOCAB, k=rng.randint(*words)))
                out.write(json.dumps({"_id": f"doc{i:08d}", "title": title, "text": text}) + "\n")
                written += 1
        size += path.stat().st_size
    meta = {"docs": written, "files": files, "seed": seed, "words": list(words), "bytes": size,
            "seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(meta))
    return meta


def write_night_corpus(source: Path, folder: Path, fraction: float, seed: int = 1) -> dict:
    """A copy of the corpus in ``source`` with round(``fraction`` × N) documents changed (a few vocabulary words
    appended to their text; which ones drawn with a fixed seed, across all files), every other line byte-identical;
    streamed line by line, every document kept (a snapshot: nothing is deleted). Reused if complete."""
    src = json.loads((source / "_COMPLETE.json").read_text())
    marker = folder / "_COMPLETE.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("source") == src and meta.get("fraction") == fraction and meta.get("seed") == seed:
            return meta
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    n = src["docs"]
    changed_at = set(rng.sample(range(n), max(1, round(fraction * n))))  # positions in the corpus: ~1% of 1M ints
    i = changed = size = 0
    t0 = time.perf_counter()
    for path in sorted(source.glob("*.jsonl")):
        with path.open(encoding="utf-8") as inp, (folder / path.name).open("w", encoding="utf-8") as out:
            for line in inp:
                if i in changed_at:
                    doc = json.loads(line)
                    doc["text"] += " " + " ".join(rng.choices(VOCAB, k=3))
                    line = json.dumps(doc) + "\n"
                    changed += 1
                out.write(line)
                i += 1
        size += (folder / path.name).stat().st_size
    if i != n:
        raise SystemExit(f"{source} holds {i:,} documents, its _COMPLETE.json says {n:,}: delete the folder so "
                         "that the corpus is written again")
    meta = {"docs": n, "changed": changed, "fraction": fraction, "seed": seed, "source": src, "files": src["files"],
            "words": src["words"], "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(meta))
    return meta


def build_tiny_model(folder: Path, hidden: int = 32) -> Path:
    """A random 2-layer BERT with a word-piece tokenizer, saved as a sentence-transformers folder (the approach of
    tests/conftest.py ``build_tiny_bi_encoder``, with this corpus's vocabulary)."""
    import string

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = folder / "tiny-bi-encoder"
    if (out / "modules.json").exists():
        return out
    torch.manual_seed(0)
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
                                *string.digits, *(f"##{c}" for c in string.ascii_lowercase + string.digits),
                                *VOCAB]))
    # the vocabulary as a dict: transformers 5 ignores vocab_file= (see tests/conftest.py)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out))
    return out


def make_config(work: Path, corpus: Path, model: Path, args) -> dict:
    return {
        "storage": {"uri": str(work / "db")},
        "corpus": {"path": str(corpus / "*.jsonl"), "format": "jsonl", "id_field": "_id", "text_field": "text",
                   "title_field": "title", "mode": "snapshot"},
        "embed": {"model": str(model), "actors": args.actors, "cpus_per_actor": 1, "gpus_per_actor": 0,
                  "batch_size": args.batch_size, "rows_per_call": args.rows_per_call},
        "index": {"metric": "cosine", "ann": {"type": "auto", **({"min_rows": args.ann_min_rows}
                                                                  if args.ann_min_rows is not None else {})},
                  "fts": {"enabled": True}},
        "ray": {"num_cpus": args.num_cpus},
        "report": {"dir": str(work / "reports")},
    }


# ---------------------------------------------------------------------------------------------------------------
# the child: one index run (the driver)
# ---------------------------------------------------------------------------------------------------------------
def child_main(config_path: str, result_path: str) -> None:
    """Run the index job here; phase markers and progress lines go to stderr for the sampler to read."""
    import logging

    import yaml

    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from pipelines import report, runs
    from pipelines.config import parse_config
    from pipelines.index import job as index
    from pipelines.index import sink as index_sink

    def mark(text: str) -> None:
        sys.stderr.write(f"@@{text} {time.time():.3f}\n")
        sys.stderr.flush()

    class MarkedTimer(report.Timer):
        def __call__(self, name):
            inner = super().__call__(name)

            class _Ctx:
                def __enter__(self_):
                    mark(f"phase {name} begin")
                    return inner.__enter__()

                def __exit__(self_, *exc):
                    mark(f"phase {name} end")
                    return inner.__exit__(*exc)

            return _Ctx()

    class FastProgress(report.Progress):  # a progress line every 2 s (the job's default is 15 s)
        def __init__(self, label, unit="rows", every=2.0):
            super().__init__(label, unit=unit, every=2.0)

    sizes: dict = {}
    original_finish, original_plan, original_start = index.finish_report, index._plan, runs.start

    def plan(*a, **k):  # the plan's {id: content hash} of documents to embed (local to index._index)
        todo = original_plan(*a, **k)
        sizes["todo (index._index: plan)"] = {"items": len(todo), "mib": round(_deep_size(todo) / MIB, 1)}
        return todo

    def marked(fn, label):
        def wrapper(self, *a, **k):
            name = label(a, k)
            mark(f"phase {name} begin")
            try:
                return fn(self, *a, **k)
            finally:
                mark(f"phase {name} end")
        return wrapper

    from lancedb.table import LanceTable

    LanceTable.create_index = marked(LanceTable.create_index, lambda a, k: f"index:{a[0] if a else k.get('metric')}")
    LanceTable.compact_files = marked(LanceTable.compact_files, lambda a, k: "compact")
    index._plan = plan

    def finish(cfg, state):  # the driver's per-document structures, measured at the end of the run
        sizes.update(_driver_structures(state))
        return original_finish(cfg, state)

    def start(*a, **k):  # the run's stage timer marks each phase's begin and end
        run = original_start(*a, **k)
        run.timer = MarkedTimer()
        return run

    runs.start, index.finish_report = start, finish
    index.Progress = index_sink.Progress = FastProgress
    threading.Thread(target=_object_store_sampler, args=(mark,), daemon=True).start()
    cfg = parse_config(yaml.safe_load(Path(config_path).read_text()), config_path)
    mark("run begin")
    rep = index.run(cfg)
    mark("run end")
    Path(result_path).write_text(json.dumps({"report": rep, "driver_structures": sizes}, default=str))


def _object_store_sampler(mark, every: float = 2.0) -> None:
    """Ray's object store in use, asked of the raylet every ``every`` s: its pages live in shared memory, counted
    in the PSS of the processes that map them; this says how much of the total they are."""
    import contextlib

    import ray

    while True:
        time.sleep(every)
        with contextlib.suppress(Exception):  # Ray starting or stopping: try again later
            if not ray.is_initialized():
                continue
            from ray._private.internal_api import get_memory_info_reply
            from ray._private.state import state  # this driver's own connection (not a search for clusters)

            st = get_memory_info_reply(state, timeout_seconds=5).store_stats
            mark(f"plasma {st.object_store_bytes_used} {st.object_store_bytes_fallback} {st.spilled_bytes_total}")


def _deep_size(obj) -> int:
    """Bytes of a dict/set of str (containers and their strings; strings shared between them counted each time)."""
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in obj.items())
    elif isinstance(obj, set | list | tuple):
        size += sum(sys.getsizeof(x) for x in obj)
    return size


def _driver_structures(state) -> dict:
    sink = state.sink
    out = {}
    # the per-document state is the id state's (pipelines/index/ids.py): in the driver for a small corpus, else
    # Ray actors (its counts are in the report's id_state); these are the delta-sized sets the driver keeps
    table = getattr(state.ids, "table", None)  # LocalIds: the state is in the driver
    held = [("ids.first", table.first), ("ids.known", table.known), ("ids.seen", table.seen)] if table else []
    for name, obj in (*held, ("sink.written_ids", sink.written_ids), ("sink.changed", sink.changed),
                      ("sink.delete_markers", sink.delete_markers)):
        out[name] = {"items": len(obj), "mib": round(_deep_size(obj) / MIB, 1)}
    out["sink._bad (quarantine rows held)"] = {"items": sum(t.num_rows for t in sink._bad),
                                               "mib": round(sum(t.nbytes for t in sink._bad) / MIB, 1)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------------
KINDS = ("driver", "embed_actors", "ray_workers", "raylet", "gcs_server", "ray_agents", "other")


def process_kind(proc, driver_pid: int) -> str | None:
    """What a process of the run is, from its name and command line (None: unreadable, e.g. exiting)."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone
        return None
    if not cmd:
        return None
    if "raylet" in name or "/raylet" in cmd.split(" ")[0]:
        return "raylet"
    if "gcs_server" in name or "gcs_server" in cmd.split(" ")[0]:
        return "gcs_server"
    if cmd.startswith("ray::") and ("Agent" in cmd or "Dashboard" in cmd):  # agents rename themselves too
        return "ray_agents"
    if cmd.startswith("ray::"):
        return "embed_actors" if ("Embedder" in cmd or "MapWorker" in cmd) else "ray_workers"
    if "default_worker.py" in cmd or "setup_worker.py" in cmd:
        return "ray_workers"
    if any(s in cmd for s in ("dashboard/agent.py", "runtime_env/agent", "log_monitor.py", "monitor.py",
                              "dashboard.py", "ray_client_server", "ray/_private/")):
        return "ray_agents"
    return "other"


class Sampler(threading.Thread):
    """Samples the run's processes every ``interval`` s: RSS and PSS, in total and per kind."""

    def __init__(self, driver_pid: int, interval: float, events: Events):
        super().__init__(daemon=True, name="memory-sampler")
        import psutil

        self.psutil = psutil
        self.driver_pid, self.interval, self.events = driver_pid, interval, events
        self.samples: list[dict] = []
        self.session_dir: str | None = None
        self.per_process: dict[int, dict] = {}  # pid -> kind, command, peak RSS / PSS
        self._stop_evt = threading.Event()
        self.t0 = time.time()

    def stop(self) -> None:
        self._stop_evt.set()

    def processes(self):
        ps = self.psutil
        procs = {}
        try:
            root = ps.Process(self.driver_pid)
            procs[root.pid] = root
            for c in root.children(recursive=True):
                procs[c.pid] = c
        except ps.NoSuchProcess:
            pass
        if self.session_dir is None:  # the raylet names the run's session folder: find reparented Ray processes
            for p in list(procs.values()):
                try:
                    m = re.search(r"--session[-_]dir=(\S+)", " ".join(p.cmdline()))
                except ps.Error:
                    continue
                if m:
                    self.session_dir = m.group(1)
                    break
        if self.session_dir:
            for p in ps.process_iter(["cmdline"]):
                if p.pid not in procs and self.session_dir in " ".join(p.info["cmdline"] or ()):
                    procs[p.pid] = p
        return procs.values()

    def sample(self) -> dict:
        ps = self.psutil
        rss = dict.fromkeys(KINDS, 0)
        pss = dict.fromkeys(KINDS, 0)
        uss_kind = dict.fromkeys(KINDS, 0)  # pages no other process maps: growth without PSS's shared-page share
        uss = 0
        n = 0
        for p in self.processes():
            try:
                # every time: a worker becomes an actor and renames itself; an exiting one keeps its last kind
                known = self.per_process.get(p.pid)
                kind = process_kind(p, self.driver_pid) or (known["kind"] if known else "other")
                m = p.memory_full_info()
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess, FileNotFoundError, ProcessLookupError):
                continue
            rss[kind] += m.rss
            pss[kind] += getattr(m, "pss", m.rss)
            top = self.per_process.get(p.pid)
            if top is None or top["kind"] != kind:
                try:
                    cmd = " ".join(p.cmdline())[:120] or p.name()
                except ps.Error:
                    cmd = "?"
                top = self.per_process[p.pid] = {"pid": p.pid, "kind": kind, "cmd": cmd, "rss": top and top["rss"] or 0,
                                                 "pss": top and top["pss"] or 0}
            try:  # CPU seconds (user + system) the process has used so far; its last sample is its total
                t = p.cpu_times()
                top["cpu_s"] = t.user + t.system
            except ps.Error:
                pass
            top["rss"] = max(top["rss"], m.rss)
            top["pss"] = max(top["pss"], getattr(m, "pss", m.rss))
            uss += getattr(m, "uss", m.rss)
            uss_kind[kind] += getattr(m, "uss", m.rss)
            n += 1
        phase, docs, plasma = self.events.now()
        return {"t": round(time.time() - self.t0, 2), "procs": n, "rss": sum(rss.values()), "pss": sum(pss.values()),
                "uss": uss, "rss_kind": rss, "pss_kind": pss, "uss_kind": uss_kind, "phase": phase, "docs": docs,
                "plasma": plasma}

    def run(self) -> None:
        while not self._stop_evt.is_set():
            start = time.time()
            s = self.sample()
            if s["procs"]:
                self.samples.append(s)
            self._stop_evt.wait(max(0.05, self.interval - (time.time() - start)))


class Events:
    """Reads the child's stderr: phase markers and progress lines (docs done), tees everything to a log file."""

    PROGRESS = re.compile(r"^(compare|index): ([\d,]+) docs")

    def __init__(self, stream, log_path: Path, echo: bool):
        self.stream, self.log_path, self.echo = stream, log_path, echo
        self.phase, self.docs = "start", {"compare": 0, "index": 0}
        self.phase_times: list[tuple[str, str, float]] = []
        self.open: list[str] = []
        self.plasma = 0
        self.plasma_peak = {"used": 0, "fallback": 0, "spilled": 0}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def now(self) -> tuple[str, int, int]:
        with self.lock:
            return self.phase, self.docs["index"], self.plasma

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for line in iter(self.stream.readline, ""):
                log.write(line)
                if line.startswith("@@"):
                    parts = line[2:].split()
                    if parts[0] == "plasma":
                        used, fallback, spilled = (int(x) for x in parts[1:4])
                        with self.lock:
                            self.plasma = used
                            for k, v in (("used", used), ("fallback", fallback), ("spilled", spilled)):
                                self.plasma_peak[k] = max(self.plasma_peak[k], v)
                    if parts[0] == "phase" and parts[1] != "stage_writes":  # short, inside pipeline: not a phase
                        with self.lock:  # nested sections read outer/inner (upkeep/index:vector)
                            if parts[2] == "begin":
                                self.open.append(parts[1])
                            elif parts[1] in self.open:
                                self.open.remove(parts[1])
                            self.phase = "/".join(self.open) if self.open else f"after_{parts[1]}"
                            self.phase_times.append((parts[1], parts[2], float(parts[3])))
                    continue
                m = self.PROGRESS.match(line)
                if m:
                    with self.lock:
                        self.docs[m.group(1)] = int(m.group(2).replace(",", ""))
                if self.echo and (m or "ERROR" in line or "Traceback" in line or "Error" in line):
                    sys.stdout.write("    | " + line)
                    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------
# one measured run
# ---------------------------------------------------------------------------------------------------------------
def measure(n: int, args, model: Path) -> dict:
    """The full run of N documents, on a fresh LanceDB folder."""
    work = Path(args.work)
    corpus = work / f"corpus-{n}"
    print(f"[{n:,} docs] corpus ...", flush=True)
    meta = write_corpus(corpus, n, args.files, words=tuple(args.words))
    print(f"[{n:,} docs] corpus: {meta['bytes'] / MIB:,.0f} MiB in {meta['files']} files", flush=True)
    run_dir = work / f"run-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    sampler, events, result, wall = _run_child(f"[{n:,} docs]", run_dir, make_config(run_dir, corpus, model, args),
                                               args)
    return summarise(n, meta, sampler, events, result, wall, run_dir)


def measure_night(n: int, args, model: Path, full: dict, seed: int = 1) -> dict:
    """The incremental night after the full run of N: the same settings and LanceDB folder (``run-N/db``), on a
    copy of the corpus with ``--night`` of its documents changed; sampled as the full run is."""
    work, run_dir = Path(args.work), Path(args.work) / f"run-{n}"
    corpus = work / (f"corpus-{n}-night{args.night:g}" + (f"-seed{seed}" if seed != 1 else ""))
    label = f"[{n:,} docs, night {args.night:g}]"
    print(f"{label} corpus ...", flush=True)
    # a later night (another seed) starts from the first night's corpus: what the table holds after it
    source = work / (f"corpus-{n}" if seed == 1 else f"corpus-{n}-night{args.night:g}")
    meta = write_night_corpus(source, corpus, args.night, seed=seed)
    print(f"{label} corpus: {meta['changed']:,} of {meta['docs']:,} documents changed", flush=True)
    night_dir = run_dir / ("night" if seed == 1 else f"night-seed{seed}")
    shutil.rmtree(night_dir, ignore_errors=True)
    night_dir.mkdir(parents=True)
    # make_config(run_dir, ...): the full run's storage and report folders; only the corpus path differs
    sampler, events, result, wall = _run_child(label, night_dir, make_config(run_dir, corpus, model, args), args)
    r = summarise(n, meta, sampler, events, result, wall, night_dir)
    rows = r["rows"]
    r["changed_docs"] = meta["changed"]
    r["wall_ratio_to_full"] = round(wall / full["wall_seconds"], 4) if full["wall_seconds"] else None
    r["rows_reconcile"] = rows["read"] == rows["written"] + rows["unchanged"] + rows["quarantined"]
    r["written_matches_changed"] = rows["written"] == meta["changed"]
    return r


def _run_child(label: str, run_dir: Path, cfg: dict, args) -> tuple[Sampler, Events, dict, float]:
    """One index run in a fresh child process (config.yaml, result.json, child.log, timeline.csv in ``run_dir``),
    every process of it sampled; returns (sampler, events, the child's result, wall seconds)."""
    import yaml

    cfg_path, result_path = run_dir / "config.yaml", run_dir / "result.json"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(cfg_path), str(result_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    events = Events(proc.stderr, run_dir / "child.log", echo=not args.quiet)
    sampler = Sampler(proc.pid, args.interval, events)
    sampler.start()
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{label} timed out after {args.timeout}s: stopping the run", flush=True)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait()
    wall = time.time() - t0
    sampler.stop()
    sampler.join()
    events.thread.join(timeout=5)
    _reap(sampler)
    if rc != 0 or not result_path.exists():
        tail = (run_dir / "child.log").read_text().splitlines()[-30:]
        raise SystemExit(f"{label} the index run failed (exit {rc}); log {run_dir / 'child.log'}:\n"
                         + "\n".join(tail))
    _write_csv(run_dir / "timeline.csv", sampler.samples)
    return sampler, events, json.loads(result_path.read_text()), wall


def _reap(sampler: Sampler) -> None:
    """Ray processes of this run still alive a few seconds after the driver exited are ended, by pid."""
    ps = sampler.psutil
    deadline = time.time() + 10
    while time.time() < deadline:
        left = []
        if sampler.session_dir:
            left = [p for p in ps.process_iter(["cmdline"]) if sampler.session_dir in " ".join(p.info["cmdline"] or ())]
        if not left:
            return
        time.sleep(1)
    for p in left:
        try:
            p.kill()
        except ps.Error:
            pass


def _write_csv(path: Path, samples: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "phase", "docs", "procs", "rss_mib", "pss_mib", "uss_mib", "object_store_mib",
                    *(f"rss_{k}" for k in KINDS), *(f"pss_{k}" for k in KINDS)])
        for s in samples:
            w.writerow([s["t"], s["phase"], s["docs"], s["procs"], _mib(s["rss"]), _mib(s["pss"]), _mib(s["uss"]),
                        _mib(s["plasma"]),
                        *(_mib(s["rss_kind"][k]) for k in KINDS), *(_mib(s["pss_kind"][k]) for k in KINDS)])


def _mib(b: float) -> float:
    return round(b / MIB, 1)


def _peaks(samples: list[dict]) -> dict:
    if not samples:
        return {}
    top_rss = max(samples, key=lambda s: s["rss"])
    top_pss = max(samples, key=lambda s: s["pss"])
    return {"rss_mib": _mib(top_rss["rss"]), "pss_mib": _mib(top_pss["pss"]),
            "uss_mib": _mib(max(s["uss"] for s in samples)),
            "at_s": top_pss["t"], "phase_at_peak": top_pss["phase"]}


def _cpu_by_kind(per_process: dict[int, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in per_process.values():
        out[p["kind"]] = out.get(p["kind"], 0.0) + p.get("cpu_s", 0.0)
    return {"total": round(sum(out.values()), 1), **{k: round(v, 1) for k, v in sorted(out.items())}}


def summarise(n, meta, sampler, events, result, wall, run_dir) -> dict:
    rep, samples = result["report"], sampler.samples
    peak = _peaks(samples)
    per_kind = {k: {"rss_mib": _mib(max(s["rss_kind"][k] for s in samples)),
                    "pss_mib": _mib(max(s["pss_kind"][k] for s in samples)),
                    "uss_mib": _mib(max(s["uss_kind"][k] for s in samples))} for k in KINDS}
    phases: dict[str, dict] = {}
    for s in samples:
        phases.setdefault(s["phase"], []).append(s)
    by_phase = {ph: {**_peaks(ss), "seconds": round(ss[-1]["t"] - ss[0]["t"], 1),
                     "driver_pss_mib": _mib(max(x["pss_kind"]["driver"] for x in ss)),
                     "driver_uss_mib": _mib(max(x["uss_kind"]["driver"] for x in ss))} for ph, ss in phases.items()}
    end = samples[-1]["t"] if samples else 0
    quarters = []
    for q in range(4):
        ss = [s for s in samples if q * end / 4 <= s["t"] <= (q + 1) * end / 4]
        quarters.append({"from_s": round(q * end / 4, 1), "to_s": round((q + 1) * end / 4, 1), **_peaks(ss),
                         "docs_done": ss[-1]["docs"] if ss else None})
    step = max(1, len(samples) // 300)
    timeline = [{"t": s["t"], "phase": s["phase"], "docs": s["docs"], "rss_mib": _mib(s["rss"]),
                 "pss_mib": _mib(s["pss"]), "driver_pss_mib": _mib(s["pss_kind"]["driver"]),
                 "driver_uss_mib": _mib(s["uss_kind"]["driver"]),
                 "embed_actors_pss_mib": _mib(s["pss_kind"]["embed_actors"]),
                 "ray_workers_pss_mib": _mib(s["pss_kind"]["ray_workers"]), "object_store_mib": _mib(s["plasma"]),
                 "procs": s["procs"]} for s in samples[::step]]
    written = rep["rows"]["written"]
    return {
        "docs": n,
        "corpus": {"files": meta["files"], "mib": round(meta["bytes"] / MIB, 1), "words": meta["words"]},
        "status": rep["status"],
        "mode": rep.get("mode"),
        "wall_seconds": round(wall, 1),
        "docs_per_second_wall": round(written / wall, 1) if wall else None,
        "docs_per_second_pipeline": rep.get("docs_per_second"),
        "job_seconds": rep.get("seconds"),
        "rows": rep["rows"],
        "documents": rep.get("documents"),
        "plan": rep.get("plan"),
        "indexes": rep.get("indexes"),
        "peak": peak,
        "peak_per_kind": per_kind,
        "peak_per_phase": by_phase,
        "peak_per_quarter": quarters,
        "max_processes": max((s["procs"] for s in samples), default=0),
        "processes_seen": len(sampler.per_process),
        "ray_session_dir": sampler.session_dir,
        # CPU seconds per kind (every process sampled at least once; a process's use after its last sample, and
        # processes living under one sampling interval, are missed): the floor on wall time is their sum / cores
        "cpu_seconds": _cpu_by_kind(sampler.per_process),
        "peak_per_process_top": [{**p, "rss_mib": _mib(p.pop("rss")), "pss_mib": _mib(p.pop("pss"))} for p in
                                 sorted(sampler.per_process.values(), key=lambda p: -p["pss"])[:12]],
        "object_store_peak_mib": {k: _mib(v) for k, v in events.plasma_peak.items()},
        "samples": len(samples),
        "driver_structures": result.get("driver_structures"),
        "timeline": timeline,
        "timeline_csv": str(run_dir / "timeline.csv"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[250_000, 1_000_000])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "batchrank-memory-stream"),
                    help="corpus, model, tables and logs (not /tmp)")
    ap.add_argument("--files", type=int, default=16, help="JSONL files per corpus")
    ap.add_argument("--words", type=int, nargs=2, default=[8, 30], metavar=("MIN", "MAX"),
                    help="words per document text (a 2-6 word title comes on top)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rows-per-call", type=int, default=256)
    ap.add_argument("--ann-min-rows", type=int, default=None,
                    help="index.ann.min_rows (default: the job's, 50,000): lower it to build the ANN index at "
                         "small sizes too")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run before it is stopped")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_stream.json"))
    ap.add_argument("--quiet", action="store_true", help="do not echo the runs' progress lines")
    ap.add_argument("--night", type=float, default=0.0, metavar="FRACTION",
                    help="after each full run, an incremental run on the same table with this share of the "
                         "documents changed (e.g. 0.01); 0: none")
    ap.add_argument("--night-only", type=int, metavar="N",
                    help="only a night (another --night-seed) on run-N's table, which an earlier run built; its "
                         "wall time is compared with --full-wall")
    ap.add_argument("--night-seed", type=int, default=2)
    ap.add_argument("--full-wall", type=float, default=None, help="the full run's wall seconds (with --night-only)")
    args = ap.parse_args()
    if args.night_only:
        model = Path(args.work) / "model" / "tiny-bi-encoder"
        night = measure_night(args.night_only, args, model, {"wall_seconds": args.full_wall}, seed=args.night_seed)
        Path(args.out).write_text(json.dumps({"benchmark": "memory_stream --night-only", "command": " ".join(sys.argv),
                                              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                              "night": night}, indent=2, default=str))
        print(f"night on run-{args.night_only}: driver peak PSS {night['peak_per_kind']['driver']['pss_mib']:,.0f} MiB, "
              f"{night['wall_seconds']:,.0f} s ({night['wall_ratio_to_full']})")
        return
    if not 0 <= args.night < 1:
        ap.error(f"--night is the share of documents changed, 0 <= FRACTION < 1 (got {args.night}); e.g. 0.01")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "tiny-bi-encoder" / "modules.json").exists():  # in a child: torch stays out of this process
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "_model", str(model_dir)], check=True)
    model = model_dir / "tiny-bi-encoder"

    runs = []
    for n in args.docs:
        r = measure(n, args, model)
        runs.append(r)
        print(f"[{n:,} docs] {r['status']}: peak PSS {r['peak']['pss_mib']:,.0f} MiB, RSS {r['peak']['rss_mib']:,.0f} "
              f"MiB, {r['wall_seconds']:,.0f} s, {r['docs_per_second_wall']:,.0f} docs/s", flush=True)
        if args.night:
            night = r["night"] = measure_night(n, args, model, r)
            print(f"[{n:,} docs, night {args.night:g}] {night['status']} ({night['mode']}): {night['changed_docs']:,} "
                  f"changed, {night['rows']['written']:,} written; driver peak PSS "
                  f"{night['peak_per_kind']['driver']['pss_mib']:,.0f} MiB, {night['wall_seconds']:,.0f} s "
                  f"({night['wall_ratio_to_full']:.1%} of the full run)", flush=True)

    small, big = min(runs, key=lambda r: r["docs"]), max(runs, key=lambda r: r["docs"])
    growth = {
        "from_docs": small["docs"], "to_docs": big["docs"],
        "pss": round(big["peak"]["pss_mib"] / small["peak"]["pss_mib"], 3),
        "rss": round(big["peak"]["rss_mib"] / small["peak"]["rss_mib"], 3),
        "driver_pss": round(big["peak_per_kind"]["driver"]["pss_mib"] / small["peak_per_kind"]["driver"]["pss_mib"], 3),
        "per_kind_pss_mib_delta": {k: round(big["peak_per_kind"][k]["pss_mib"]
                                            - small["peak_per_kind"][k]["pss_mib"], 1) for k in KINDS},
    }
    verdict = {
        "criterion": f"peak resident memory, all processes together (summed PSS) <= {LIMIT_GIB} GiB at every N, "
                     "and no growth from the smallest to the largest N (ratio <= 1.10, sampling noise allowed)",
        "pss_within_limit": all(r["peak"]["pss_mib"] <= LIMIT_GIB * 1024 for r in runs),
        "rss_within_limit": all(r["peak"]["rss_mib"] <= LIMIT_GIB * 1024 for r in runs),
        "no_growth_pss": growth["pss"] <= 1.10,
        "no_growth_rss": growth["rss"] <= 1.10,
    }
    nights = [r["night"] for r in runs if "night" in r]
    small_driver = small["peak_per_kind"]["driver"]["pss_mib"]
    for night in nights:
        night["driver_peak_ratio_to_smallest_full"] = round(night["peak_per_kind"]["driver"]["pss_mib"]
                                                            / small_driver, 3)
    if nights:
        verdict.update({
            "night_criterion": f"an incremental night with {args.night:g} of the documents changed: driver peak "
                               f"PSS within 10% of the smallest full run's ({small['docs']:,} docs), wall time "
                               "<= 5% of its own full run's; rows read = written + unchanged + quarantined, and "
                               "written = the changed documents",
            "night_driver_within_10pct": all(x["driver_peak_ratio_to_smallest_full"] <= 1.10 for x in nights),
            "night_wall_within_5pct": all(x["wall_ratio_to_full"] <= 0.05 for x in nights),
            "night_rows_reconcile": all(x["rows_reconcile"] and x["written_matches_changed"] for x in nights),
        })

    out = {
        "benchmark": "memory_stream",
        "command": "python benchmarks/memory_stream.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": "tiny random BERT (hidden 32, 2 layers, 32-d vectors)",
        "settings": {"ann_min_rows": args.ann_min_rows, "actors": args.actors, "batch_size": args.batch_size,
                     "rows_per_call": args.rows_per_call,
                     "num_cpus": args.num_cpus, "interval_s": args.interval, "files": args.files,
                     "words": args.words, "night": args.night},
        "measure": "every process of the run (driver, its descendants, and any process naming the run's Ray "
                   "session folder) sampled every interval; PSS from smaps_rollup (shared pages split between the "
                   "processes that map them), RSS summed (shared pages counted once per process: an upper bound)",
        "runs": runs,
        "growth_ratio": growth,
        "verdict": verdict,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")

    print()
    print(f"{'docs':>10} {'peak PSS MiB':>13} {'peak RSS MiB':>13} {'driver PSS':>11} {'embed actors':>13} "
          f"{'ray workers':>12} {'obj store':>10} {'wall s':>8} {'docs/s':>8} {'written':>10} {'peak phase':>14}")
    for r in runs:
        k = r["peak_per_kind"]
        print(f"{r['docs']:>10,} {r['peak']['pss_mib']:>13,.0f} {r['peak']['rss_mib']:>13,.0f} "
              f"{k['driver']['pss_mib']:>11,.0f} {k['embed_actors']['pss_mib']:>13,.0f} "
              f"{k['ray_workers']['pss_mib']:>12,.0f} "
              f"{r['object_store_peak_mib']['used']:>10,.0f} "
              f"{r['wall_seconds']:>8,.0f} {r['docs_per_second_wall']:>8,.0f} {r['rows']['written']:>10,} "
              f"{r['peak']['phase_at_peak']:>14}")
    print(f"growth {small['docs']:,} -> {big['docs']:,}: PSS x{growth['pss']}, RSS x{growth['rss']}, "
          f"driver PSS x{growth['driver_pss']}")
    if nights:
        print()
        print(f"{'night of':>10} {'changed':>8} {'mode':>12} {'driver PSS':>11} {'x smallest':>11} "
              f"{'peak PSS MiB':>13} {'wall s':>8} {'x full':>7} {'read':>10} {'written':>8} {'unchanged':>10} "
              f"{'quar.':>6} {'reconciled':>10} {'w=changed':>10}")
        for r in runs:
            if x := r.get("night"):
                w = x["rows"]
                print(f"{r['docs']:>10,} {x['changed_docs']:>8,} {x['mode']!s:>12} "
                      f"{x['peak_per_kind']['driver']['pss_mib']:>11,.0f} "
                      f"{x['driver_peak_ratio_to_smallest_full']:>11.3f} "
                      f"{x['peak']['pss_mib']:>13,.0f} {x['wall_seconds']:>8,.1f} {x['wall_ratio_to_full']:>7.1%} "
                      f"{w['read']:>10,} {w['written']:>8,} {w['unchanged']:>10,} {w['quarantined']:>6,} "
                      f"{x['rows_reconcile']!s:>10} {x['written_matches_changed']!s:>10}")
        print(f"night driver peak within 10% of the {small['docs']:,}-doc full run's "
              f"({small_driver:,.0f} MiB): {verdict['night_driver_within_10pct']}")
        print(f"night wall <= 5% of the full run's: {verdict['night_wall_within_5pct']}")
    print("verdict:", json.dumps(verdict))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_model":
        build_tiny_model(Path(sys.argv[2]))
    else:
        main()
