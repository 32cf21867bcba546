"""Connecting to Ray: a cluster when an address is given (or ``RAY_ADDRESS`` is set, as under
``ray job submit``), else a new local Ray on this machine. Also sizes actor pools so that
reader tasks always keep a slice of CPU (a pool that takes every CPU starves its input)."""

from __future__ import annotations

import logging
import os
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
_PASS_THROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "BATCHRANK_FAILPOINTS", "BATCHRANK_WORK_LOG",
                 # object storage (pipelines/objstore.py): actors on other nodes open the tables with these
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "AWS_PROFILE")
READ_CPUS = 0.1  # CPUs reserved per reader task; real parsing is cheap next to embedding


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
    return env


def actor_options() -> dict:
    """Ray options for model actor pools (``map_batches(..., **actor_options())``): the worker environment, and
    replicas spread over the cluster's nodes (Ray would otherwise pack them onto the first node with room,
    leaving the others idle while one node's memory and bandwidth are shared by every replica)."""
    return {"runtime_env": {"env_vars": worker_env()}, "scheduling_strategy": "SPREAD"}


@dataclass
class Cluster:
    address: str
    local: bool
    cpus: float
    gpus: float
    nodes: int


def init_ray(ray_cfg) -> Cluster:
    """Connect to (or start) Ray once per process; return what the cluster offers."""
    import ray

    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            # No runtime_env here: under `ray job submit` it would clash with the job's own; stages
            # pass worker_env() where they are applied instead.
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no token
            ray.init(address="local", num_cpus=ray_cfg.num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING, runtime_env={"env_vars": worker_env()})
    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return Cluster(address or "local", not address, res.get("CPU", 0.0), res.get("GPU", 0.0), len(alive))


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


def actor_resources(cluster: Cluster, actors: int, cpus_per_actor: float, gpus_per_actor: float):
    """CPUs and GPUs to request per actor, adjusted so that the job can always make progress."""
    return pool_resources(cluster, {"embed": (actors, cpus_per_actor, gpus_per_actor)})["embed"]


def pool_resources(cluster: Cluster, pools: dict[str, tuple[int, float, float]]) -> dict[str, tuple[float, float]]:
    """Per-actor ``(cpus, gpus)`` for each actor pool of a job, given ``{name: (actors, cpus, gpus)}``.

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
    headroom = READ_CPUS * 2
    wanted = sum(actors * cpus for actors, cpus, _ in pools.values())
    if cluster.cpus and wanted > cluster.cpus - headroom:
        factor = max(cluster.cpus - headroom, 0.1) / wanted
        out = {name: (max(0.05, round(cpus * factor, 3)), gpus) for name, (cpus, gpus) in out.items()}
        log.info("actors get %s CPUs each so that reader tasks keep %.1f CPU",
                 ", ".join(f"{name} {cpus:.2f}" for name, (cpus, _) in out.items()), headroom)
    return out


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
