"""Cluster runs on this machine: a real two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a
worker node, each with its own raylet and object store), jobs submitted through Ray's job submission API
the way ``batchrank submit`` does it (working dir upload, dependencies declared as pip packages), the
run reports showing work on both nodes, submission ids refused twice, and the scheduler's runs table.
"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from conftest import good_docs, write_jsonl
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.cluster import submit
from pipelines.cluster.schedule import RunsLog, Scheduler, load_schedules, occurrence_id

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
       "RAY_AUTH_MODE": "disabled"}
SESSIONS: dict[str, Path] = {}  # job server address -> the head node's session folder (runtime envs live there)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes (2 CPUs each) with the job server on the head; its address as http://127.0.0.1:<port>."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ENV}
    saved_path = os.environ["PATH"]
    os.environ.update(ENV)  # inherited by the raylets, hence by the job drivers and actors
    # `python` in a job's entrypoint is the cluster's Python: this one, as on a node where batchrank is installed.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved_path}"
    port = _free_port()
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": port,
                                "dashboard_agent_listen_port": _free_port(),  # not the default: another Ray may hold it
                                "object_store_memory": 300 * 2**20})
    # The second node gets its own temp dir, as a second machine would: nodes sharing one would also share (and
    # race on) the runtime environments they build.
    node_dir = tempfile.mkdtemp(prefix="rn-", dir="/tmp")  # short: socket paths live under it
    c.add_node(num_cpus=2, object_store_memory=300 * 2**20, temp_dir=node_dir)
    address = f"http://127.0.0.1:{port}"
    SESSIONS[address] = Path(c.head_node.get_session_dir_path())  # not /tmp/ray/session_latest: any Ray's latest
    deadline = time.monotonic() + 60
    while True:  # the job server answers once the head's dashboard and job agent are up
        try:
            submit.client(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    yield address
    c.shutdown()
    # Each node's session holds the pip environment the jobs were given (~2.4 GB with torch): Ray leaves it there.
    shutil.rmtree(node_dir, ignore_errors=True)
    shutil.rmtree(SESSIONS.pop(address), ignore_errors=True)
    os.environ["PATH"] = saved_path
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory, minilm_path) -> str:
    """all-MiniLM-L6-v2's weights with a new one-logit head: a real-sized cross-encoder, slow enough that one
    scoring actor cannot keep up with retrieval alone (a tiny model's blocks all go to the first actor free)."""
    from sentence_transformers import CrossEncoder

    out = tmp_path_factory.mktemp("ce") / "minilm-ce"
    CrossEncoder(minilm_path, num_labels=1, max_length=128, device="cpu").save(str(out))
    return str(out)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model, cross_encoder):
    """A copy of the batchrank project with a config reading data inside it, plus things that must not be uploaded
    (a fake virtualenv, an unused dataset) and tables outside it."""
    root = tmp_path_factory.mktemp("project")
    for name in ("pipelines", "jobs"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    (root / ".venv").mkdir()
    (root / ".venv" / "big.bin").write_bytes(os.urandom(4 * 2**20))
    (root / "data" / "unused").mkdir(parents=True)
    (root / "data" / "unused" / "big.bin").write_bytes(os.urandom(4 * 2**20))
    for name in ("docs", "logs"):
        (root / "data" / name).mkdir()
    write_jsonl(root / "data" / "docs" / "docs.jsonl", good_docs(64))
    queries = ["cell protein", "cancer risk", "vitamin study", "brain data", "gene model", "protein gene"]
    write_jsonl(root / "data" / "logs" / "log.jsonl",
                [{"query": f"{q} {i}", "timestamp": "2026-11-20T10:00:00Z"} for i in range(8) for q in queries])
    config = {
        "storage": {"uri": str(tmp_path_factory.mktemp("tables") / "db")},
        "corpus": {"path": "../data/docs/docs.jsonl", "rows_per_block": 8},
        "embed": {"model": tiny_model, "actors": 2, "cpus_per_actor": 1, "batch_size": 8, "rows_per_call": 8,
                  "local_max_rows": 0},  # every document goes through the actor pool
        "query_log": {"path": "../data/logs/log.jsonl"},
        "retrieve": {"k": 8, "actors": 1, "cpus_per_actor": 1, "queries_per_call": 4},
        "rerank": {"model": cross_encoder, "top_n": 5, "actors": 2, "cpus_per_actor": 1, "batch_size": 16,
                   "queries_per_call": 4, "carry_over": False, "cache": False,
                   "local_max_pairs": 0},  # the actor pools, on both nodes
        "ray": {"num_cpus": 2},
    }
    (root / "configs").mkdir()
    (root / "configs" / "cluster.yaml").write_text(yaml.safe_dump(config))
    return root


def _run(address: str, job: str, project: Path) -> dict:
    """Submit a job, wait for it, return its run report (the job's logs on failure). The nodes have batchrank's
    dependencies (as cluster.yaml installs them): no pip environment (test_forced_resubmission builds one)."""
    # Tiny models finish 64 documents before a second actor has started; Ray Data's knob to start only once every
    # actor of a pool is up makes the split across the two nodes deterministic.
    sub = submit.submit(job, project / "configs" / "cluster.yaml", address=address, working_dir=project, pip=False,
                        env={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"})
    t0 = time.monotonic()
    final = submit.wait(address, sub.submission_id, timeout=300, poll=1)
    print(f"{job}: {final} in {time.monotonic() - t0:.1f}s")
    logs = submit.client(address).get_job_logs(sub.submission_id)
    assert final == "SUCCEEDED", logs[-4000:]
    report = json.loads(Path(sub.report).read_text())
    return {"sub": sub, "report": report, "logs": logs}


def test_runtime_env_is_built_from_the_project(project, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "submitters-own-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    sub = submit.prepare("index", project / "configs" / "cluster.yaml", working_dir=project)
    env = sub.runtime_env
    assert env["working_dir"] == str(project)
    assert {".git", ".venv", "**/__pycache__", "data/unused"} <= set(env["excludes"])
    assert "data/docs" not in env["excludes"]  # the config reads it: it travels with the job
    packages = env["pip"]["packages"]
    assert any(p.startswith("lancedb") for p in packages) and any(p.startswith("torch") for p in packages)
    assert not any(p.split("[")[0].startswith("ray") for p in packages)  # the cluster's own Ray runs the job
    assert env["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio.internal:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]  # job info is public on the dashboard
    assert sub.entrypoint == f"python -m jobs.index --config configs/cluster.yaml --run-id {sub.run_id}"
    assert sub.submission_id == f"index-cluster-{datetime.now().astimezone():%Y%m%d}"
    assert sub.upload["bytes"] < 2 * 2**20, sub.upload  # the 8 MiB of venv and unused data stay home


def test_config_outside_the_project_or_with_relative_storage_is_refused(project, tmp_path):
    outside = tmp_path / "x.yaml"
    shutil.copy(project / "configs" / "cluster.yaml", outside)
    with pytest.raises(submit.SubmitError, match="outside the project folder"):
        submit.prepare("index", outside, working_dir=project)
    rel = project / "configs" / "relative.yaml"
    rel.write_text(yaml.safe_dump({"storage": {"uri": "./db"}}))
    with pytest.raises(submit.SubmitError, match="relative path"):
        submit.prepare("index", rel, working_dir=project)
    with pytest.raises(submit.SubmitError, match="unknown job"):
        submit.prepare("reindex", project / "configs" / "cluster.yaml", working_dir=project)
    rel.unlink()


def test_index_and_rerank_jobs_run_on_both_nodes(cluster, project):
    index = _run(cluster, "index", project)
    r = index["report"]
    assert r["status"] == "succeeded" and r["rows"]["written"] == 64 and r["rows"]["reconciled"]
    embed_nodes = r["nodes"]["embed"]
    assert len(embed_nodes) == 2, embed_nodes  # both nodes embedded
    assert sum(embed_nodes.values()) == 64
    assert r["run_id"] == index["sub"].run_id
    assert "nodes: embed on 2" in index["logs"]

    # The same run again the same day, from the command line: refused by id, with the way out named.
    sid = index["sub"].submission_id
    again = CliRunner().invoke(app, ["submit", "index", "--config", str(project / "configs" / "cluster.yaml"),
                                     "--address", cluster, "--working-dir", str(project)])
    assert again.exit_code == 2 and f"submission id {sid} was already submitted" in again.output
    assert "--force" in again.output
    # `batchrank jobs logs` streams the job's output (here: all of it, the job has ended); `jobs status`.
    logs = CliRunner().invoke(app, ["jobs", "logs", sid, "--address", cluster])
    assert logs.exit_code == 0 and f"index run {r['run_id']}: succeeded" in logs.output
    status = CliRunner().invoke(app, ["jobs", "status", sid, "--address", cluster, "--json"])
    assert json.loads(status.output)["status"] == "SUCCEEDED"
    out = io.StringIO()
    assert submit.logs(cluster, sid, out=out, follow=False) == "SUCCEEDED" and out.getvalue() in logs.output

    rerank = _run(cluster, "rerank", project)
    rr = rerank["report"]
    assert rr["queries"]["ranked"] == rr["queries"]["selected"] == 48
    assert len(rr["nodes"]["score"]) == 2, rr["nodes"]  # both nodes scored
    assert sum(rr["nodes"]["score"].values()) == 48


def _dist(spec: str) -> str:
    """A requirement's distribution name, normalised (``ray[data]>=2`` -> ``ray``; ``PyYAML`` -> ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;@]", spec.strip(), maxsplit=1)[0]).lower()


def _installed_by(requirements: list[str]) -> set[str]:
    """Every distribution pip installs for ``requirements``: them and, transitively, what they require (with the
    extras asked for, on this platform), read from the metadata of the packages installed here."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (_dist(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.distribution(req.name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: its own requirements are unknown (the name itself still counts)
        for sub in map(Requirement, requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(sub)
    return {name for name, _ in seen}


def undeclared_imports(root: Path) -> dict[str, list[str]]:
    """{distribution: files} of what batchrank's code (``pipelines/``, ``jobs/``) imports that an install of the
    declared dependencies would not bring: neither in ``[project.dependencies]``, nor required by one of them, nor in
    an extra a user opts into (``models``, ``onnx``: not ``dev``, which only the test machines install)."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    allowed = _installed_by(project["dependencies"]) | {_dist(s) for name, specs in extras.items() if name != "dev"
                                                         for s in specs}
    owners = importlib.metadata.packages_distributions()  # top-level module -> the distributions providing it
    missing: dict[str, set[str]] = {}
    for path in sorted([*(root / "pipelines").rglob("*.py"), *(root / "jobs").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"pipelines", "jobs"}:
                for dist in map(_dist, owners.get(top, [f"{top} (not installed here)"])):
                    if dist not in allowed:
                        missing.setdefault(dist, set()).add(str(path.relative_to(root)))
    return {dist: sorted(files) for dist, files in missing.items()}


def test_the_declared_dependencies_cover_what_the_code_imports():
    """The check the cluster test below makes of the project it submits, on this checkout (no cluster needed)."""
    missing = undeclared_imports(ROOT)
    assert not missing, (f"imported but not installed by pyproject.toml's dependencies: {missing}; add them to "
                         "[project.dependencies] (or to an extra, imported behind an error naming the install line)")


def test_forced_resubmission_gets_a_new_id_and_declared_dependencies_install(cluster, project):
    """Two submissions under one id: the second only with force, as <id>-2. Both run in the default runtime env,
    whose pip environment is built from exactly the project's declared dependencies (less Ray, the cluster's own)
    and the eval job's own group (``eval``: matplotlib), which cover every package batchrank's code imports: pip
    builds that environment on the head node of this cluster, every declared package resolves in it, and the job
    imports batchrank there and stops at the config (it has no eval section)."""
    missing = undeclared_imports(project)  # the job's environment would lack them (first: no cluster time spent)
    assert not missing, f"imported but not installed by the declared dependencies: {missing}"
    declared = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dependencies = declared["dependencies"] + declared["optional-dependencies"]["eval"]
    expected = [d for d in dependencies if _dist(d) != "ray"]
    config = project / "configs" / "cluster.yaml"
    first = submit.submit("eval", config, address=cluster, working_dir=project, submission_id="eval-forced")
    second = submit.submit("eval", config, address=cluster, working_dir=project, submission_id="eval-forced",
                           force=True)
    assert (first.submission_id, second.submission_id) == ("eval-forced", "eval-forced-2")
    for s in (first, second):
        assert submit.wait(cluster, s.submission_id, timeout=240, poll=0.5) == "FAILED"
        logs = submit.client(cluster).get_job_logs(s.submission_id)
        assert "needs the config section(s) eval" in logs, logs[-3000:]
        assert submit.client(cluster).get_job_info(s.submission_id).runtime_env["pip"]["packages"] == expected
    envs = list((SESSIONS[cluster] / "runtime_resources" / "pip").glob("*/virtualenv/bin/python"))
    assert len(envs) == 1, envs  # one environment for both submissions (the same declared packages)
    names = [_dist(d) for d in expected]
    check = subprocess.run([str(envs[0]), "-c", "import importlib.metadata as m, sys; "
                            "print({n: m.version(n) for n in sys.argv[1:]})", *names], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]  # every declared package resolves in the job's environment


def test_schedule_never_overlaps_and_records_every_occurrence(cluster, project, tmp_path):
    """Every 3 s, an index run that takes longer (a Ray driver starting, nothing to embed): occurrences that fall due while it runs are recorded as skipped;
    the next one after it finished is submitted; no two runs of the schedule overlap."""
    spec = {"address": cluster, "runs": {"uri": str(tmp_path / "runs")}, "poll_seconds": 0.5,
            "schedules": [{"name": "often", "cron": "* * * * * */3", "timezone": "Europe/Berlin", "job": "index",
                           "config": str(project / "configs" / "cluster.yaml"), "pip": False}]}
    (tmp_path / "schedules.yaml").write_text(yaml.safe_dump(spec))
    sched = load_schedules(tmp_path / "schedules.yaml")
    scheduler = Scheduler(sched)
    deadline = time.monotonic() + 240
    submitted: list[str] = []
    while len(submitted) < 2 and time.monotonic() < deadline:
        submitted += scheduler.tick().submitted
        time.sleep(0.5)
    assert len(submitted) == 2, scheduler.runs.rows()
    for sid in submitted:
        assert submit.wait(cluster, sid, timeout=180, poll=0.5) == "SUCCEEDED", \
            submit.client(cluster).get_job_logs(sid)[-4000:]
    scheduler.refresh()
    rows = RunsLog(sched.runs).rows("often")
    ran = [r for r in rows if r["submission_id"]]
    skipped = [r for r in rows if r["status"] == "SKIPPED"]
    assert [r["submission_id"] for r in ran] == submitted
    assert all(r["status"] == "SUCCEEDED" and r["duration_s"] > 3 and r["report"] for r in ran), ran
    assert skipped and all("still" in r["message"] for r in skipped)
    assert ran[0]["finished_at"] <= ran[1]["started_at"]  # never two at once
    # every occurrence between the first and the last is a row: 3 s apart, none lost
    times = [r["scheduled_for"] for r in rows]
    assert all(b - a == timedelta(seconds=3) for a, b in zip(times, times[1:])), times
    assert Path(ran[0]["report"]).is_file()
    listed = CliRunner().invoke(app, ["runs", "--config", str(tmp_path / "schedules.yaml")])
    assert listed.exit_code == 0 and all(sid in listed.output for sid in submitted) and "SKIPPED" in listed.output


def test_catch_up_runs_once_after_downtime(cluster, project, tmp_path):
    """The scheduler was down for five occurrences of an hourly schedule (last run 01:00, restarted at 06:30): its
    first tick submits one run to the cluster, for 06:00 only, recorded with the four occurrences it stands for
    (02:00..05:00) in ``missed``; the next tick submits nothing; the record follows the run to its end. (The job,
    eval, stops at once: the config has no eval section.)"""
    spec = {"address": cluster, "runs": {"uri": str(tmp_path / "runs")}, "poll_seconds": 0.5,
            "schedules": [{"name": "hourly", "cron": "0 * * * *", "timezone": "UTC", "job": "eval",
                           "config": str(project / "configs" / "cluster.yaml"), "pip": False}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    sched = load_schedules(tmp_path / "s.yaml")
    last, six = datetime(2026, 11, 30, 1, 0, tzinfo=UTC), datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    RunsLog(sched.runs).upsert([{"key": f"hourly@{last.isoformat()}", "schedule": "hourly", "job": "eval",
                                 "scheduled_for": last, "status": "SUCCEEDED", "timezone": "UTC", "missed": 0}])
    scheduler = Scheduler(sched, now=lambda: datetime(2026, 11, 30, 6, 30, tzinfo=UTC))

    tick = scheduler.tick()
    sid = "eval-hourly-20261130T0600"
    assert (tick.submitted, tick.skipped) == ([sid], []), RunsLog(sched.runs).rows()
    rows = RunsLog(sched.runs).rows("hourly")
    assert [(r["scheduled_for"], r["missed"], r["submission_id"]) for r in rows] == [(last, 0, None), (six, 4, sid)]
    assert rows[-1]["status"] == "SUBMITTED" and rows[-1]["message"] == "caught up: 4 earlier occurrence(s) not run"
    assert submit.wait(cluster, sid, timeout=180, poll=0.5) == "FAILED"  # it reached the cluster and ran there
    assert "needs the config section(s) eval" in submit.client(cluster).get_job_logs(sid)

    again = scheduler.tick()  # still 06:30: nothing else is due, and the run's end is recorded
    assert (again.submitted, again.skipped, again.updated) == ([], [], 1)
    rows = RunsLog(sched.runs).rows("hourly")
    assert len(rows) == 2 and (rows[-1]["status"], rows[-1]["missed"], rows[-1]["submission_id"]) == ("FAILED", 4, sid)
    listed = CliRunner().invoke(app, ["runs", "--config", str(tmp_path / "s.yaml")])
    assert listed.exit_code == 0 and sid in listed.output and "caught up 4 missed" in listed.output, listed.output
    daily = sched.schedules[0].model_copy(update={"cron": "30 2 * * *"})  # a daily schedule's ids carry the day
    assert occurrence_id(daily, datetime(2026, 11, 30, 2, 30, tzinfo=UTC)) == "eval-hourly-20261130"


def test_bad_schedules_are_refused_with_the_fix(tmp_path, project):
    from pipelines.cluster.schedule import ScheduleError

    def load(entry):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({"schedules": [entry]}))
        return load_schedules(tmp_path / "s.yaml")

    good = {"name": "n", "cron": "30 2 * * *", "timezone": "UTC", "job": "nightly",
            "config": str(project / "configs" / "cluster.yaml")}
    with pytest.raises(ScheduleError, match="cron.*not a valid cron expression"):
        load({**good, "cron": "61 2 * * *"})
    with pytest.raises(ScheduleError, match="timezone.*IANA"):
        load({**good, "timezone": "Mars/Olympus"})
    with pytest.raises(ScheduleError, match="job.*use one of"):
        load({**good, "job": "reindex"})
    with pytest.raises(ScheduleError, match="not found"):
        load({**good, "config": "nope.yaml"})
    with pytest.raises(ScheduleError, match="crn: unknown key; did you mean .cron."):
        load({**good, "crn": "x"})
