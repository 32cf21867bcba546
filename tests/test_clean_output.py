"""What a user reads (issue 17, item 15): a successful index and rerank run, each as its own process on its own
local Ray (as `make demo` and `python -m jobs.<job>` run), prints no warning, error-looking line or traceback
that a user would have to interpret; a failed run ends with one line naming the error, and no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import good_docs, write_jsonl

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
# what users reported seeing on successful runs, and the general shapes of alarming lines
ALARMING = re.compile(r"Traceback|WARNING|Warning|ERROR|\bError\b|fork support is experimental|Progress bars "
                      r"disabled|ray_remote_args|constructor arguments|_del_library|deprecated")


def _job(job: str, config: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BATCHRANK_FAILPOINTS")} | (env or {})
    return subprocess.run([sys.executable, "-m", f"jobs.{job}", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_successful_runs_print_nothing_alarming_and_a_failed_one_one_line(tmp_path, make_config, tiny_cross_encoder):
    write_jsonl(tmp_path / "docs.jsonl", good_docs(40))
    write_jsonl(tmp_path / "log.jsonl", [{"query": q, "timestamp": "2026-11-28T10:00:00Z"}
                                         for q in ("cell protein", "cancer risk", "brain data")])
    cfg = make_config(tmp_path / "docs.jsonl", query_log={"path": str(tmp_path / "log.jsonl")}, retrieve={"k": 5},
                      rerank={"model": tiny_cross_encoder, "top_n": 5, "actors": 1, "local_max_pairs": 0},
                      embed={"local_max_rows": 0})  # the actor pools: the path of a real corpus and query log
    config = tmp_path / "job.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))

    for job in ("index", "rerank"):
        done = _job(job, config)
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout + done.stderr
        alarming = [line for line in out.splitlines() if ALARMING.search(line)]
        assert not alarming, f"{job}: " + "\n".join(alarming[:20])
        assert f"{job} run " in done.stdout and "succeeded" in done.stdout  # the summary

    # an incremental run that dies before its commit, its small delta embedded on the driver (the model loads in a
    # background thread while the corpus is compared: it must not print tracebacks as the process exits)
    write_jsonl(tmp_path / "docs.jsonl", good_docs(45))
    small = tmp_path / "small.json"
    small.write_text(json.dumps(make_config(tmp_path / "docs.jsonl").model_dump(mode="json")))
    failed = _job("index", small, {"BATCHRANK_FAILPOINTS": "before_commit"})
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "before_commit" in errors[0]
