"""Connecting to Ray: a cluster when an address is given (or ``RAY_ADDRESS`` is set, as under
``ray job submit``), else a new local Ray on this machine. Also sizes actor pools so that
reader tasks always keep a slice of CPU (a pool that takes every CPU starves its input)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Set in every Ray worker: torch processes sharing cores must not spin-wait, and model
# libraries must stay quiet and offline-safe.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "LANCE_LOG": "error",
    "LANCEDB_LOG": "error",
}
# Storage credentials never travel in Ray's job or actor metadata: a runtime_env is stored in the control store
# and shown by Ray's state API and dashboard to anyone who can reach the cluster. Workers get credentials the way
# their node provides them: the workers of a local instance inherit this process's environment (Ray's processes
# are started from it); cluster nodes have an instance profile, IRSA / Pod Identity, or their own environment.
# (AWS_ACCESS_KEY_ID and AWS_PROFILE go with the secret: a key id without its secret, or a profile of this
# machine, would break a node's own credential chain.)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
_PASS_THROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "BATCHRANK_FAILPOINTS", "BATCHRANK_WORK_LOG",
                 # object storage settings (pipelines/store/objstore.py), not secrets: actors on other nodes use them
                 "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP")
READ_CPUS = 0.1  # CPUs reserved per reader task; real parsing is cheap next to embedding
LOOPBACK = "127.0.0.1"


def worker_env() -> dict[str, str]:
    """Environment variables for Ray workers (a job's or an actor's ``runtime_env``): never a credential."""
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
    return env


def actor_options() -> dict:
    """Ray options for model actor pools (``map_batches(..., **actor_options())``): only parameters that
    ``map_batches`` names (``ray_remote_args`` is deprecated and removed in Ray 2.64), here the worker
    environment. Ray Data already spreads an actor pool over the cluster's nodes (its default scheduling
    strategy for actors is SPREAD), so that no node's memory and bandwidth are shared by every replica."""
    return {"runtime_env": {"env_vars": worker_env()}}


@dataclass
class Cluster:
    address: str
    local: bool
    cpus: float
    gpus: float
    nodes: int

    def stream(self, ds):
        """``ds``'s output blocks as pyarrow tables, for the driver to consume as they come. Ray Data prefetches
        by holding each block back until the next one has arrived (its window fills first): on one node, where
        every block is already local, that only delays each block by a whole task, so the first embedded row or
        scored pair came one call late. Prefetching one block is kept where blocks cross the network."""
        return ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1 if self.nodes > 1 else 0)


def init_ray(ray_cfg) -> Cluster:
    """Connect to (or start) Ray once per process; return what the cluster offers."""
    import ray

    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            # No runtime_env here: under `ray job submit` it would clash with the job's own; stages
            # pass worker_env() where they are applied instead. Authentication is the cluster's: its own
            # RAY_AUTH_MODE / RAY_AUTH_TOKEN are used as they are.
            if _is_loopback(address):  # this machine's private instance (start_local_ray): connect as one of it
                with _loopback_only():
                    ray.init(address=address, _node_ip_address=LOOPBACK, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        else:
            start_local_ray(num_cpus=ray_cfg.num_cpus, logging_level=logging.WARNING)
    _quiet_known_ray_notes()
    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return Cluster(address or "local", not address, res.get("CPU", 0.0), res.get("GPU", 0.0), len(alive))


def start_local_ray(num_cpus: int | None = None, **init_args):
    """Start a private Ray instance on this machine that listens on the loopback interface only.

    Ray binds a new instance's GCS, raylet, object manager, agents and workers to the node's IP address (every
    interface for its gRPC servers); anyone who can reach the machine could then submit code to it. Ray keeps
    a single node on loopback only where clusters are disabled (the default on macOS and Windows,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): that setting is applied while the instance starts (its processes
    inherit it), and the instance's node address is 127.0.0.1. Nothing outside this machine can connect, so
    token authentication stays off (``RAY_AUTH_MODE=disabled``, unless set otherwise in the environment
    beforehand): with Ray's default, every start warns and writes a token to ~/.ray. ``init_args`` go to
    ``ray.init`` (``include_dashboard`` defaults to False, ``runtime_env`` to the worker environment)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_args.setdefault("include_dashboard", False)
    init_args.setdefault("runtime_env", {"env_vars": worker_env()})
    with _loopback_only():
        return ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, **init_args)


@contextlib.contextmanager
def _loopback_only():
    """While Ray starts (or a driver joins a loopback instance): clusters disabled, so that Ray keeps the node on
    127.0.0.1; the processes Ray starts inherit the variable, this process's flag is restored after."""
    from ray._private import ray_constants

    saved_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read it when Ray was imported
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


def _is_loopback(address: str) -> bool:
    """A GCS address (``host:port``) on this machine's loopback interface; not ``auto`` or ``ray://`` addresses."""
    if "://" in address or ":" not in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


class _ActorArgsNote:
    """Never scheduled: created only so that Ray prints its once-per-process actor-arguments note (see below)."""

    def __init__(self, arg=None):
        pass


_ACTOR_ARGS_NOTE = "has constructor arguments in the object store and max_restarts > 0"
_notes_quieted = False


def _quiet_known_ray_notes() -> None:
    """Keep two of Ray's notes out of a successful run's output, once per driver process; nothing else is hidden.

    - "Progress bars disabled" (Ray Data, once per process): the jobs turn Ray Data's progress bars off on
      purpose and print their own progress line.
    - "Actor ... has constructor arguments in the object store and max_restarts > 0" (Ray core, logged at ERROR
      level once per process, ray-project/ray#57733, open): Ray Data passes every actor pool's own state to its
      actors as object-store references and restarts actors by default, so every actor pool triggers it. Those
      references live as long as the dataset runs, in the driver's object store: a restart can only lose them
      with the driver's node, which ends the run anyway. The note is printed by Ray's C++ core straight to this
      process's stderr, once per process: it is triggered here once, by an actor that is never scheduled (it
      is pinned to a node that does not exist, and killed), with stderr captured for that moment; whatever
      else was written in that moment is passed on.
    """
    global _notes_quieted
    if _notes_quieted:
        return
    _notes_quieted = True
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    try:
        _consume_actor_args_note()
    except Exception as exc:  # noqa: BLE001 - cosmetic: never fails a run
        log.debug("could not pre-empt Ray's actor-arguments note: %s", exc)


def _consume_actor_args_note() -> None:
    import tempfile

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # pinned to a node that does not exist: Ray fails it as unschedulable at once (no pending demand that an
    # autoscaler would try to meet, no worker started)
    nowhere = NodeAffinitySchedulingStrategy(node_id=ray.NodeID.from_random().hex(), soft=False)
    probe = ray.remote(_ActorArgsNote).options(num_cpus=0, max_restarts=1, scheduling_strategy=nowhere)
    arg = ray.put(None)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            actor = probe.remote(arg)  # Ray logs the note here, synchronously
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        ray.kill(actor, no_restart=True)
        captured.seek(0)
        text = captured.read().decode("utf-8", errors="replace")
    rest = "".join(line for line in text.splitlines(keepends=True) if _ACTOR_ARGS_NOTE not in line)
    if rest:
        os.write(2, rest.encode("utf-8"))


def node_label() -> str:
    """The Ray node this process runs on, as ``<ip>/<first 8 hex of the node id>`` (``local`` without Ray):
    reports count work per node, so that a run shows where it ran."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 - a label must never fail a batch
        pass
    return "local"


def count_nodes(counts: dict[str, int], column) -> None:
    """Add a batch's per-row node labels to ``{node: rows}``."""
    import pyarrow.compute as pc

    for item in pc.value_counts(column).to_pylist():
        counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]


def check_not_in_job_package(path: str, key: str) -> None:
    """Refuse a local output path inside Ray's temporary copy of a job's working dir: it vanishes with the job."""
    marker = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep
    if "://" not in path and marker in os.path.abspath(path):
        raise ValueError(
            f"{key} resolves inside Ray's temporary copy of the job's working dir ({path}); what is written there "
            f"is lost when the job ends: set {key} to an absolute path (for example ~/.batchrank/...) or an "
            "object-store URI (s3://...)"
        )


def pool_resources(cluster: Cluster, pools: dict[str, tuple[int, float, float]]) -> dict[str, tuple[float, float]]:
    """Per-actor ``(cpus, gpus)`` for each actor pool of a job, given ``{name: section.pool}`` (the config's
    ``ActorPool``: actors, CPUs and GPUs per actor). The one place actor resources are decided.

    GPUs requested on a local machine without one fall back to CPU. When the pools together ask
    for more CPUs than the cluster has (less a slice kept for reader tasks), every pool's request
    is scaled down by the same factor: the actors still start, and torch threads stay sized to
    the configured CPUs.
    """
    out: dict[str, tuple[float, float]] = {}
    for name, (_, cpus, gpus) in pools.items():
        if gpus > 0 and cluster.gpus == 0:
            if cluster.local:
                log.warning("%s.gpus_per_actor=%s but this machine has no GPU: running on CPU", name, gpus)
                gpus = 0.0
            else:
                log.warning("no GPU in the cluster yet: %s actors wait for the autoscaler to add GPU nodes", name)
        out[name] = (cpus, gpus)
    check_gpus(cluster, {name: (actors, 0.0, out[name][1]) for name, (actors, _, _) in pools.items()})
    headroom = READ_CPUS * 2
    wanted = sum(actors * cpus for actors, cpus, _ in pools.values())
    if cluster.cpus and wanted > cluster.cpus - headroom:
        factor = max(cluster.cpus - headroom, 0.1) / wanted
        out = {name: (max(0.05, round(cpus * factor, 3)), gpus) for name, (cpus, gpus) in out.items()}
        log.info("actors get %s CPUs each so that reader tasks keep %.1f CPU",
                 ", ".join(f"{name} {cpus:.2f}" for name, (cpus, _) in out.items()), headroom)
    return out


def check_gpus(cluster: Cluster, pools: dict[str, tuple[int, float, float]]) -> None:
    """More GPUs asked for (``{pool: (actors, cpus, gpus per actor)}``) than the cluster has: on a local machine the
    extra actors would wait forever (refused); on a cluster they wait for the autoscaler (said). Without any GPU,
    ``pool_resources`` says what happens (a local machine runs them on CPU)."""
    if not cluster.gpus:
        return
    wanted = sum(actors * gpus for actors, _, gpus in pools.values())
    if not wanted or wanted <= cluster.gpus:
        return
    asked = ", ".join(f"{name}: {actors} actors x {gpus:g} GPU" for name, (actors, _, gpus) in pools.items() if gpus)
    fix = ("lower the actors or gpus_per_actor (a fraction, e.g. 0.5, puts two actors on one GPU) so that they "
           f"fit {cluster.gpus:g} GPU(s)")
    if cluster.local:
        raise ValueError(f"the actor pools ask for {wanted:g} GPUs ({asked}) but this machine has "
                         f"{cluster.gpus:g}: the rest would wait forever; {fix}")
    log.warning("the actor pools ask for %g GPUs (%s) and the cluster has %g now: the rest wait until the autoscaler "
                "adds GPU nodes (or forever, without one); else %s", wanted, asked, cluster.gpus, fix)


def actor_device(requested: str, gpus: float) -> str:
    """An actor without a GPU reservation must not pick up a GPU it happens to see."""
    if gpus > 0:
        return "cuda" if requested == "auto" else requested
    return "cpu" if requested in ("auto", "cuda") else requested


def actor_restarts(class_fragment: str) -> dict[str, int]:
    """Actors of this job whose class name contains ``class_fragment`` (e.g. ``Embedder``): how many, and how
    often Ray restarted them after a death (a killed or crashed worker; its task is retried on the new one).
    Read from Ray's control store; empty when that is unavailable (never fails a run)."""
    try:
        import ray
        from ray._private import state as ray_state

        job = ray.get_runtime_context().get_job_id()
        mine = [a for a in ray_state.actors().values()
                if class_fragment in str(a.get("ActorClassName", "")) and str(a.get("JobID", "")) == job]
    except Exception as exc:  # noqa: BLE001 - a private API: best effort
        log.debug("actor restarts unavailable: %s", exc)
        return {}
    return {"actors": len(mine), "restarts": sum(int(a.get("NumRestarts") or 0) for a in mine)}
