"""Where the index job's table work runs: its commit, the upkeep after it and the ANN training. Each is a Ray task on
a worker (the training with a GPU when LanceDB's GPU build can use one), so that the job's driver never holds their
memory, which grows with the table (writing a 4M-row table, its id B-trees and full-text indexes in one process
grew it 452 → 815 MiB from 250k rows; in a process of their own the driver stayed at 182 MiB: the probe in
docs/benchmarks.md, Memory). Each task's worker process exits after it (``max_calls=1``): glibc keeps a finished step's
freed heap, 160-410 MiB at 250k-4M rows, in a process that lives on. Or all of it in the driver itself
(``maintenance.table_work_on: driver``, or auto and a small run; ``index.ann.build_on: driver`` for the
training alone; or no Ray).

Reads top to bottom::

    committer(cfg, cluster) → None (commit in the driver) or commit(staged, run_id, deletes, replace): one task,
                              returning (version, rows before)
    upkeeper(cfg, cluster)  → None (upkeep in the driver) or run(tag, build_ann): the whole upkeep as one task
    builder(cfg, cluster)   → None (train in the upkeep's process) or build(config): one task, its timing
    _commit / _upkeep / _build: what runs on the worker

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

        task = _task(_build, num_cpus=1, num_gpus=1 if device == "cuda" else 0, max_retries=1)
        return ray.get(task.remote(cfg.storage, config, device))

    return build


def _task(fn, **options):
    """``fn`` as a Ray task in a worker process of its own (it exits after: its heap goes with it)."""
    import ray

    from pipelines.cluster.runtime import worker_env

    return ray.remote(max_calls=1)(fn).options(runtime_env={"env_vars": worker_env()}, **options)


def on_workers(cfg, cluster, small: bool) -> bool:
    """``maintenance.table_work_on``: worker, driver, or auto (the driver for a small run: a task's process takes
    seconds to start, and a small table's memory is no concern)."""
    where = cfg.maintenance.table_work_on
    return cluster is not None and (where == "worker" or (where == "auto" and not small))


def committer(cfg, cluster, small: bool = False) -> Callable[..., int] | None:
    """The commit to passages (``Store.commit_passages``) as a Ray task on a worker (None: in the driver). Not
    retried: a commit is atomic, so a lost worker leaves the previous version, and the rerun resumes the staging."""
    if not on_workers(cfg, cluster, small):
        return None

    def commit(staged, run_id: str, deletes: list[str], replace: bool) -> tuple[int, int]:
        import ray

        task = _task(_commit, num_cpus=1, max_retries=0)
        name, schema = (staged.name, staged.schema) if staged is not None else (None, None)
        return ray.get(task.remote(cfg.storage, name, schema, run_id, deletes, replace))

    return commit


def _commit(storage_cfg, staged_name, schema, run_id: str, deletes: list[str], replace: bool) -> tuple[int, int]:
    """On the worker: the commit; (the new version, the rows passages held before it)."""
    from pipelines.store import Store
    from pipelines.store.staging import StagedTable

    store = Store(storage_cfg)
    staged = None
    if staged_name is not None:
        staged = StagedTable(store, staged_name, schema)
        if not staged.resume():
            raise RuntimeError(f"the staging table {staged_name} is gone: nothing was committed; run the job again")
    before = store.count(storage_cfg.passages_table)
    return store.commit_passages(staged, run_id, deletes=deletes, replace=replace), before


def upkeeper(cfg, cluster, small: bool = False) -> Callable[..., dict[str, Any]] | None:
    """The upkeep after a commit (``Store.upkeep``: compaction, indexes, tags, cleanup) as a Ray task on a worker
    (None: in the driver's own process). A training it starts runs where ``build_ann`` says (a task of its own, or
    in the upkeep's process); a task waiting on it gives its CPU back meanwhile (Ray releases a blocked task's)."""
    if not on_workers(cfg, cluster, small):
        return None

    def run(tag: str | None, build_ann) -> dict[str, Any]:
        import ray

        task = _task(_upkeep, num_cpus=1, max_retries=0)
        return ray.get(task.remote(cfg.storage, cfg.index, cfg.maintenance, tag, build_ann))

    return run


def _upkeep(storage_cfg, index_cfg, maint, tag, build_ann) -> dict[str, Any]:
    """On the worker: the upkeep of passages, and the node it ran on."""
    from pipelines.cluster.runtime import node_label
    from pipelines.store import Store

    done = Store(storage_cfg).upkeep(storage_cfg.passages_table, index_cfg=index_cfg, maint=maint, tag=tag,
                                     build_ann=build_ann, here=node_label())
    return {**done, "ran_on": node_label()}


def _build(storage_cfg, config, device: str) -> dict[str, Any]:
    """On the worker: train and write the vector index of passages; its node, device and seconds."""
    from pipelines.cluster.runtime import node_label
    from pipelines.store import Store
    from pipelines.store.upkeep import train_ann

    if device == "cuda":
        config.accelerator = "cuda"
    seconds = train_ann(Store(storage_cfg).passages(), config)
    return {"built_on": node_label(), "accelerator": device, "build_seconds": seconds}
