"""`jobs.index` and `jobs.rerank` submitted through the Ray Jobs API to a cluster started with `ray start --head`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import good_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path_factory):
    """A real head node with the job server on loopback; stopped by PID (never a machine-wide `ray stop`)."""
    temp = Path("/tmp") / f"brj{os.getpid()}"  # short: Ray's unix sockets have a path length limit
    port, dash = _free_port(), _free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    client = None
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            break
        except Exception:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(2)
    else:
        pytest.fail("the Ray job server did not come up within 120 s")
    yield client, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    _kill_leftovers(str(temp))
    shutil.rmtree(temp, ignore_errors=True)


def _kill_leftovers(marker: str) -> None:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _run_job(client, entrypoint: str) -> str:
    """Submit one job with the repository as its working dir; return its logs once it has ended."""
    from ray.job_submission import JobStatus

    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(ROOT),
                     "excludes": [".git", ".venv", ".batchrank", "*.lance", "data", "benchmarks/results"],
                     "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
    )
    deadline = time.time() + 300
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


def test_index_rerank_and_eval_jobs_through_the_jobs_api(ray_head, tmp_path, tiny_model, tiny_cross_encoder):
    client, env = ray_head
    write_jsonl(tmp_path / "c.jsonl", good_docs(40))
    beir = tmp_path / "beir"  # a judged collection over the same corpus, for the eval job
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": t} for i, t in enumerate(["cell protein", "brain"])])
    (beir / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td3\t1\n")
    write_jsonl(tmp_path / "log.jsonl", [{"query": q, "timestamp": "2026-11-28T10:00:00Z"}
                                         for q in ("cell protein", "brain data", "Cell  Protein")])
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({
        "storage": {"uri": str(tmp_path / "db")},
        "corpus": {"path": str(tmp_path / "c.jsonl"), "rows_per_block": 16},
        "embed": {"model": tiny_model, "actors": 1, "batch_size": 8, "rows_per_call": 16},
        "query_log": {"path": str(tmp_path / "log.jsonl")},
        "retrieve": {"k": 10},
        "rerank": {"model": tiny_cross_encoder, "top_n": 5, "actors": 1},
        "eval": {"collection": str(beir), "depths": [5], "output": str(tmp_path / "eval")},
    }))
    logs = _run_job(client, f"python -m jobs.index --config {cfg}")
    assert "40 read = 40 written + 0 quarantined" in logs
    report = json.loads(next((tmp_path / "db/_reports").glob("index-*.json")).read_text())
    assert report["cluster"]["address"] != "local"  # it joined the cluster instead of starting its own
    assert report["rows"]["written"] == 40

    logs = _run_job(client, f"python -m jobs.rerank --config {cfg}")
    assert "2 selected, 2 ranked" in logs
    report = json.loads(next((tmp_path / "db/_reports").glob("rerank-*.json")).read_text())
    assert report["cluster"]["address"] != "local" and report["queries"]["reconciled"]
    assert report["tables"]["rankings"]["current"]["rows"] == 2

    logs = _run_job(client, f"python -m jobs.eval --config {cfg}")
    assert "passages v" in logs and "reused" in logs  # the corpus is already indexed: no second index run
    report = json.loads((tmp_path / "eval/eval.json").read_text())
    assert report["status"] == "succeeded" and report["queries"]["evaluated"] == 2
    assert [v["name"] for v in report["variants"]] == ["vector", "fts", "hybrid", "vector → CE@5"]
    assert (tmp_path / "eval/eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
