"""Where the ANN index is trained: a Ray task on a worker (with a GPU when LanceDB's GPU build can use one), so that
the job's driver never holds the training's memory; or the driver itself (``index.ann.build_on: driver``, or no Ray).

Reads top to bottom::

    builder(cfg, cluster)  → None (build in-process) or build(config): one Ray task, ray.get's its timing
    _build(storage, config, accelerator) → on the worker: upkeep.train_ann(passages, config), timed

Only a (re)training moves: adding new rows to a trained index, the full-text and id indexes stay in the upkeep.

Example::

    build = builder(cfg, state.cluster)
    store.upkeep(name, index_cfg=cfg.index, maint=cfg.maintenance, build_ann=build)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def accelerator(ann, cluster_gpus: float) -> str:
    """``index.ann.accelerator`` resolved: cuda only for ivf_pq (LanceDB's GPU build) on a cluster with a GPU."""
    if ann.accelerator == "cuda":
        return "cuda"
    if ann.accelerator == "auto" and ann.type == "ivf_pq" and cluster_gpus >= 1:
        return "cuda"
    return "cpu"


def builder(cfg, cluster) -> Callable[[Any], dict[str, Any]] | None:
    """The ANN training as a Ray task (None: train it in the driver's own process)."""
    ann = cfg.index.ann
    if ann.build_on == "driver" or cluster is None:
        return None
    device = accelerator(ann, cluster.gpus)
    if device == "cuda" and cluster.gpus < 1:
        raise ValueError("index.ann.accelerator: cuda, but the Ray cluster has no GPU; add a GPU node or set "
                         "index.ann.accelerator: auto")

    def build(config) -> dict[str, Any]:
        import ray

        from pipelines.cluster.runtime import worker_env

        task = ray.remote(_build).options(num_cpus=1, num_gpus=1 if device == "cuda" else 0, max_retries=1,
                                          runtime_env={"env_vars": worker_env()})
        return ray.get(task.remote(cfg.storage, config, device))

    return build


def _build(storage_cfg, config, device: str) -> dict[str, Any]:
    """On the worker: train and write the vector index of passages; its node, device and seconds."""
    from pipelines.cluster.runtime import node_label
    from pipelines.store import Store
    from pipelines.store.upkeep import train_ann

    if device == "cuda":
        config.accelerator = "cuda"
    seconds = train_ann(Store(storage_cfg).passages(), config)
    return {"built_on": node_label(), "accelerator": device, "build_seconds": seconds}
