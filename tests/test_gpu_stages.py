"""benchmarks/gpu_stages.py runs as on the lent GPU machines, where Ray and LanceDB are not installed: here in a
subprocess that cannot import them, on CPU (--quick) with the tiny models. Its JSON has every section with positive
throughputs, the machine it ran on, and the stages agreeing with plain encode / predict at fp32; the agreement
figures themselves tell wrong vectors and scores apart."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_stages.py"
# Loaded first by every Python started with this folder on PYTHONPATH (the spawned stages too): importing any of
# these then raises ImportError, as where they are not installed.
BLOCK = "import sys\n\nfor name in ('ray', 'lancedb', 'lance'):\n    sys.modules[name] = None\n"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_stages", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tiny_model, tiny_cross_encoder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-stages")
    (tmp / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("OUT", None)
    for name in ("ray", "lancedb"):  # the block works: the run below really is without them
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True,
                               timeout=60, check=False)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, probe.stderr
    out = tmp / "gpu_stages.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--model", tiny_model,
                           "--cross-encoder", tiny_cross_encoder, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"gpu_stages --quick: {time.perf_counter() - start:.1f} s")
    return json.loads(out.read_text()), proc.stdout


def test_runs_without_ray_and_lancedb_and_reports_every_section(run):
    report, stdout = run
    machine = report["machine"]
    assert machine["cpu"] and machine["torch"] and machine["transformers"] and machine["sentence_transformers"]
    assert machine["gpu"] is None and report["settings"]["device"] == "cpu" and report["gpu_util_note"]
    bf16 = [("embed", "bfloat16"), ("score", "bfloat16")] if machine["cpu_bf16"] else []
    sections = {(r["kind"], r["dtype"]): r for r in report["sections"]}
    assert set(sections) == {("embed", "float32"), ("score", "float32"), *bf16}
    if not bf16:
        assert any(s.get("dtype") == "bfloat16" and s["why"] for s in report["skipped"])
    for rec in sections.values():
        assert "error" not in rec, rec.get("error")
        base, stage = rec["baseline"], rec["stage"]
        assert base["items"] == stage["items"] == rec["agreement"]["n"] > 0  # the same passages / pairs
        assert base["items_per_s"] > 0 and stage["items_per_s"] > 0 and stage["rows_per_s"] > 0
        assert str(base["batch_size"]) in base["probe_items_per_s"]  # the best of those probed
        assert stage["ratio_vs_baseline"] == pytest.approx(stage["items_per_s"] / base["items_per_s"], rel=0.01)
        for r in (base, stage):
            assert 0 < r["tokenize_s"] and 0 < r["tokenize_share"] <= 1.5 and r["gpu"] is None
    assert sections[("embed", "float32")]["stage"]["items"] >= 300  # --quick: 300 passages
    groups = {(r["kind"], r["dtype"]): r for r in report["stages_at_once"]}
    assert set(groups) == {("embed", "float32"), ("score", "float32")}  # CPU: fp32 only
    for rec in groups.values():
        assert "error" not in rec and rec["stages"] == 2 and rec["items_per_s"] > 0 and rec["ratio_vs_baseline"] > 0
    assert set(report["verdicts"]) >= {"embed_bf16_stage_ge_encode", "score_bf16_stage_ge_predict",
                                       "embed_100k_passages_per_s"}
    assert all(v is None for k, v in report["verdicts"].items() if k != "note")  # no aims judged on a CPU
    assert "verdicts:" in stdout and "stage" in stdout  # the human table


def test_stage_agrees_with_plain_sentence_transformers_at_fp32(run):
    report, _ = run
    sections = {(r["kind"], r["dtype"]): r for r in report["sections"]}
    embed = sections[("embed", "float32")]["agreement"]
    # random tiny weights put different texts at cosine ~0.99: agreement must be far above that
    assert embed["min"] > 0.9999 > embed["other_mean"]
    score = sections[("score", "float32")]["agreement"]
    assert score["max_abs_diff"] < 1e-4 and score["spearman"] > 0.99 and score["top10_overlap"] > 0.9


def test_agreement_figures_tell_wrong_outputs_apart():
    gs = _module()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    same = gs.cosine_agreement(vectors + 1e-6, vectors)
    assert same["min"] > 0.9999 and same["other_mean"] < 0.5
    assert gs.cosine_agreement(np.roll(vectors, 3, axis=0), vectors)["min"] < 0.9  # shifted by 3 passages
    scores = rng.normal(size=200).astype(np.float32)
    good = gs.score_agreement(scores, scores, 20)
    assert good["max_abs_diff"] == 0 and good["spearman"] == 1 and good["top10_overlap"] == 1
    bad = gs.score_agreement(rng.permutation(scores), scores, 20)
    assert bad["spearman"] < 0.5 and bad["top10_overlap"] < 0.9 and bad["max_abs_diff"] > 0.1


def test_tokenizer_timer_wraps_without_changing_output(tiny_model):
    from transformers import AutoTokenizer

    gs = _module()
    tok = AutoTokenizer.from_pretrained(str(Path(tiny_model).parent / "raw"))
    before = tok(["cell protein data", "a gene"], truncation=True, max_length=8)["input_ids"]
    spent = gs.time_tokenizer(tok)
    assert tok(["cell protein data", "a gene"], truncation=True, max_length=8)["input_ids"] == before
    assert spent["s"] > 0 and type(tok).__name__ == type(AutoTokenizer.from_pretrained(
        str(Path(tiny_model).parent / "raw"))).__name__
