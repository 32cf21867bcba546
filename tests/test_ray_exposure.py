"""What a batchrank run exposes through Ray (issue 17, items 10, 11 and the Ray part of 15).

One local Ray is started the way the jobs start it (``pipelines.cluster.runtime.init_ray``), in a separate process with
fake storage credentials in its environment and no RAY_AUTH_MODE: an actor pool runs through ``map_batches``
with ``actor_options()`` as the index and rerank jobs do, and a plain actor stays up. That process reports:

- the listening sockets of every process of its Ray instance (its own child processes, found by PID: other Ray
  instances on this machine are left alone) — all must be on loopback;
- the actors' runtime environments and the raw records of Ray's control store that the state API and the
  dashboard read (actor, job and task-event tables) — no credential may appear there, while the actors still
  get the credentials from the environment they inherit (a local instance's workers are started from the
  driver's environment);
- the warnings and the stderr of the run — none of Ray's notes that a user would have to interpret.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-batchrank-test-secret-0b1d"
SESSION_TOKEN = "FwoGZXIvYXdzEBY-batchrank-test-session-token-9f3c"
KEY_ID = "AKIABATCHRANKTEST000"
MARKER = "BATCHRANK-EXPOSURE-REPORT "
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

_SCRIPT = r'''
import hashlib, json, os, sys, time, warnings
import psutil
import pyarrow as pa
import ray
import ray.data

import pipelines
from pipelines.config import RayConfig
from pipelines.cluster.runtime import actor_options, init_ray


def _digest():
    return hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()


class EnvProbe:
    def __call__(self, batch):
        return batch.append_column("secret_digest", pa.array([_digest()] * batch.num_rows))


class Holder:
    def digest(self):
        return _digest()


ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False  # as the index and rerank jobs set it
cluster = init_ray(RayConfig(num_cpus=2))
holder = ray.remote(Holder).options(num_cpus=0.1, **actor_options()).remote()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = ray.data.from_arrow([pa.table({"i": [i]}) for i in range(4)]).map_batches(
        EnvProbe, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_size=None,
        batch_format="pyarrow", **actor_options())
rows = [r for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
holder_digest = ray.get(holder.digest.remote())
time.sleep(1.0)  # the agents are up by now; let late listeners bind

me = psutil.Process()
procs = [me] + me.children(recursive=True)
listening = []
for proc in procs:
    try:
        conns = proc.net_connections(kind="inet")
        name = proc.name()
    except psutil.Error:
        continue
    for c in conns:
        if c.status == psutil.CONN_LISTEN:
            listening.append({"pid": proc.pid, "name": name, "ip": c.laddr.ip, "port": c.laddr.port})

from ray._private import state as ray_state
from ray.core.generated import gcs_pb2

accessor = ray_state.state._connect_and_get_accessor()
tables = {"actors": list(accessor.get_actor_table(None, None)),
          "jobs": list(accessor.get_job_table(skip_submission_job_info_field=False,
                                              skip_is_running_tasks_field=True)),
          "task_events": list(accessor.get_task_events())}
secrets = [os.environ[k].encode() for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
hits = {name: sum(s in blob for blob in blobs for s in secrets) for name, blobs in tables.items()}
runtime_envs = []
for blob in tables["actors"]:
    actor = gcs_pb2.ActorTableData.FromString(blob)
    env = json.loads(actor.serialized_runtime_env or "{}")
    runtime_envs.append({"class": actor.class_name, "env_vars": sorted(env.get("env_vars", {})), "pid": actor.pid,
                         "state": gcs_pb2.ActorTableData.ActorState.Name(actor.state)})
report = {"pipelines": pipelines.__file__, "cluster": {"local": cluster.local, "cpus": cluster.cpus},
          "rows": len(rows), "actor_digests": sorted({r["secret_digest"] for r in rows} | {holder_digest}),
          "listening": listening, "pids": [p.pid for p in procs], "table_sizes": {k: len(v) for k, v in tables.items()},
          "secret_hits": hits, "runtime_envs": runtime_envs,
          "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}
ray.shutdown()
print("''' + MARKER + r'''" + json.dumps(report), flush=True)
'''


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@pytest.fixture(scope="module")
def local_run():
    """Run the script once; yield (report, stderr). Leftover processes of that Ray are ended by PID."""
    import psutil

    # the driver's environment holds the credentials (never its command line: Ray records that as the job's
    # entrypoint); no RAY_AUTH_MODE or RAY_ADDRESS: init_ray decides
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=SESSION_TOKEN,
               AWS_REGION="eu-west-1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=420)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(lines[-1][len(MARKER):])
    yield report, proc.stderr
    for pid in report["pids"][1:]:  # the script's own Ray processes, if any outlived it
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


@pytest.mark.ray
def test_the_run_used_this_checkout(local_run):
    report, _ = local_run
    assert Path(report["pipelines"]).resolve().is_relative_to(ROOT), report["pipelines"]
    assert report["cluster"]["local"] and report["rows"] == 4


@pytest.mark.ray
def test_local_ray_listens_on_loopback_only(local_run):
    """GCS, raylet, object manager, agents, the driver's and the workers' gRPC servers: nothing another
    machine can reach (item 10)."""
    report, _ = local_run
    listening = report["listening"]
    names = {s["name"] for s in listening}
    assert {"gcs_server", "raylet"} <= names, f"the instance's servers were not found: {listening}"
    assert len({s["pid"] for s in listening}) >= 4, listening  # + the driver, agents and the actor workers
    exposed = [s for s in listening if not _loopback(s["ip"])]
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.ray
def test_no_credential_in_ray_metadata(local_run):
    """The actors' runtime environments and the control-store records behind Ray's state API and dashboard
    hold no credential (item 11); local actors still get them from the environment they inherit."""
    report, _ = local_run
    assert report["table_sizes"]["actors"] >= 2 and report["table_sizes"]["jobs"] >= 1
    envs = report["runtime_envs"]
    assert any("MapWorker" in e["class"] for e in envs) and any("Holder" in e["class"] for e in envs), envs
    for env in envs:
        assert not set(CREDENTIALS) & set(env["env_vars"]), env
    assert report["secret_hits"] == {"actors": 0, "jobs": 0, "task_events": 0}, report["secret_hits"]
    import hashlib

    assert report["actor_digests"] == [hashlib.sha256(SECRET.encode()).hexdigest()], \
        "local actors no longer see the credentials of the environment Ray was started from"


# Lines of Ray's that a successful run must not print (the Ray part of item 15).
NOISE = [r"ray_remote_args", r"RayDeprecationWarning", r"constructor arguments in the object store",
         r"Progress bars disabled", r"Token authentication", r"Traceback", r"\bWARNING\b",
         r"^\[[^\]]* E \d+ \d+\]"]


@pytest.mark.ray
def test_a_successful_run_prints_no_ray_warning(local_run):
    report, stderr = local_run
    noisy = [line for line in stderr.splitlines() if any(re.search(p, line) for p in NOISE)]
    assert not report["warnings"] + noisy, "\n".join(report["warnings"] + noisy)
    # the actor that makes Ray print its once-per-process note while stderr is captured never ran
    probes = [a for a in report["runtime_envs"] if a["class"] == "_ActorArgsNote"]
    assert all(a["state"] == "DEAD" and not a["pid"] for a in probes), probes


# ------------------------------------------------------------------------------------------------
# Without Ray
# ------------------------------------------------------------------------------------------------

def test_worker_env_never_carries_a_credential(monkeypatch):
    """worker_env() feeds every job's and actor's runtime_env (and `batchrank submit`'s)."""
    from pipelines.cluster.runtime import actor_options, worker_env

    for var in CREDENTIALS:
        monkeypatch.setenv(var, "x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = worker_env()
    assert not set(CREDENTIALS) & set(env) and actor_options()["runtime_env"]["env_vars"] == env
    assert env["AWS_ENDPOINT_URL"] == "http://minio.internal:9000" and env["AWS_REGION"] == "eu-west-1"


def test_actor_options_are_named_map_batches_parameters():
    """``**ray_remote_args`` is deprecated (removed in Ray 2.64): actor_options() may only hold parameters that
    map_batches names; and Ray Data still spreads actor pools over the nodes without being asked."""
    import ray.data
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    from pipelines.cluster.runtime import actor_options

    named = {name for name, p in inspect.signature(ray.data.Dataset.map_batches).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(actor_options()) <= named, set(actor_options()) - named
    defaults = ActorPoolMapOperator._apply_default_remote_args({}, ray.data.DataContext.get_current())
    assert defaults["scheduling_strategy"] == "SPREAD"
