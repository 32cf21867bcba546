"""The index job's Ray Data side: the corpus read in blocks, and the embedding actor pool they stream through.

    read            the corpus as validated blocks of one embedding call's rows in a first run (Ray Data may still
                    merge them up to BLOCK_BYTES or split them for read parallelism: the pool gathers its calls),
                    CHECK_ROWS for the plan
    pool            the actors' CPUs, GPUs and rows per call, sized once per run
    embed_actors    map_batches(Embedder, actor pool): one model per actor, GPUs when configured

Example::

    ds = embed_actors(cfg, read(cfg, rows=pool(cfg, state)[2]), state)
"""

from __future__ import annotations

from pipelines.cluster.runtime import READ_CPUS
from pipelines.index.sink import CHECK_ROWS

# Small blocks (Ray Data's default is 128 MiB) keep every embedding actor fed, progress live and
# driver memory flat; a block of 64 rows with 384-d vectors is about 100 KiB.
BLOCK_BYTES = 256 * 1024
PLAN_BLOCK_BYTES = 16 << 20  # the plan's blocks (CHECK_ROWS rows each): no actor to feed evenly
# The plan's read tasks each take a whole CPU: nothing else runs beside them, and with 0.1 CPU each every file was
# parsed at once, the first (which the ordered stream waits for) at a tenth of a core
PLAN_READ_CPUS = 1.0


def read(cfg, plan: bool = False, rows: int = 0):
    """The corpus as a Ray Dataset of validated rows, in blocks of ``max(corpus.rows_per_block, rows)`` rows; of
    CHECK_ROWS for the ``plan`` (no model: small blocks cost the plan ~4x its time in per-block overhead)."""
    from pipelines.index.corpus import read_corpus
    from pipelines.index.validate import RowSpec

    rows = max(cfg.corpus.rows_per_block, CHECK_ROWS if plan else rows)
    ds = read_corpus(cfg.corpus, RowSpec.from_config(cfg), read_cpus=PLAN_READ_CPUS if plan else READ_CPUS,
                     storage_options=cfg.storage.storage_options, rows=rows)
    if plan:
        ds.context.target_max_block_size = PLAN_BLOCK_BYTES
    return ds


def pool(cfg, state) -> tuple[float, float, int]:
    """The embedding actors' CPUs and GPUs each, and the rows of one call; sized once per run (``state.pool``)."""
    from pipelines.cluster.runtime import pool_resources

    if state.pool is None:
        cpus, gpus = pool_resources(state.cluster, {"embed": cfg.embed.pool})["embed"]
        state.pool = cpus, gpus, cfg.embed.call_rows(gpus, state.mean_chars)
    return state.pool


def embed_actors(cfg, ds, state):
    """The embedding actor pool (one model per actor; GPUs when configured) over ``ds``, in calls of the pool's
    rows."""
    import ray.data

    from pipelines.cluster.runtime import actor_device, actor_options
    from pipelines.index.embed import Embedder

    e, (cpus, gpus, rows) = cfg.embed, pool(cfg, state)
    state.report["cluster"].update(actors=e.actors, cpus_per_actor=cpus, gpus_per_actor=gpus, rows_per_call=rows)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs=Embedder.config_kwargs(cfg, device=actor_device(e.device, gpus),
                                                     num_threads=e.cpus_per_actor),
        # One task in flight per actor: a killed driver's actors finish at most one task each, wasted, and with
        # preserve_order no finished block waits behind a second task (measured: same speed as two; 2k SciFact).
        compute=ray.data.ActorPoolStrategy(size=e.actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus,
        num_gpus=gpus,
        batch_size=rows,
        batch_format="pyarrow",
        **actor_options(),
    )
