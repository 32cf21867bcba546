"""Resuming a killed index run: its staging table taken over, and each id published once.

A killed run leaves its staged rows in the resumable staging table ``_staging-<passages>``. The next run (holding
the lock) takes them over instead of embedding them again; ``state`` is the index run's state (its sink, report and
run id). Reads top to bottom::

    resume              at startup: the staging table, and sink.done = the (id, content hash) pairs it holds
    skip_resumed        a single pass blanks the model input of rows already staged (the sink counts them)
    keep_planned        an incremental run's second pass keeps the rows the plan embeds
    resume_planned      an incremental run's plan: staged rows with the planned content are done
    drop_stale_resumed  staged rows this run did not take over (the corpus changed since) are deleted
    keep_one_row_per_id before the commit: one staged row per id (two killed runs may have staged two versions)
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S

log = logging.getLogger("batchrank.index")


def resume(cfg, state, store):
    """The staging table a killed run left (when its rows are this model's), with ``sink.done`` set to its
    {id: content hash}; None when there is none. Per-run staging tables of older releases are dropped."""
    name = cfg.storage.passages_table
    dead = store.drop_dead_staging(name)
    existing = f"_staging-{name}"
    if existing not in store.table_names():
        return None
    try:
        dim = store.open(existing).schema.field(S.VECTOR).type.list_size
    except (KeyError, AttributeError):
        dim = 0
    staged = store.stage(name, state.run_id, S.passages_schema(dict(cfg.corpus.metadata_fields), dim),
                         resumable=True)
    if not staged.resume():
        return None
    cols = staged.columns([S.ID, S.CONTENT_HASH, S.MODEL, S.PASSAGE_SETTINGS, S.RUN_ID])
    models = set(cols[S.MODEL].to_pylist())
    settings = set(cols[S.PASSAGE_SETTINGS].to_pylist())
    from pipelines.config.index import same_passages

    if models - {cfg.embed.identity} or not all(same_passages(x, cfg.passage_settings) for x in settings):
        log.warning("dropping %s: staged with %s %s, and the run embeds with %s %s", existing, sorted(models),
                    sorted(map(str, settings)), cfg.embed.identity, cfg.passage_settings)
        staged.drop()
        return None
    state.sink.done = set(zip(cols[S.ID].to_pylist(), cols[S.CONTENT_HASH].to_pylist()))
    state.report["resume"] = {"staged_rows": staged.rows, "from_runs": sorted(set(cols[S.RUN_ID].to_pylist())),
                              "dropped_dead_staging": dead}
    log.info("resuming: %s row(s) staged by killed run(s) %s are not embedded again", f"{staged.rows:,}",
             ", ".join(state.report["resume"]["from_runs"]))
    return staged


def skip_resumed(batch: pa.Table, done: set[tuple[str, str]]) -> pa.Table:
    """In the read tasks of a resumed run: blank the model input of rows a killed run already staged (same id,
    same content), so that the embedding actors pass them through; the sink counts them."""
    skip = [(i, h) in done for i, h in zip(batch[S.ID].to_pylist(), batch[S.CONTENT_HASH].to_pylist())]
    if not any(skip):
        return batch
    at = batch.schema.get_field_index(S.EMBED_INPUT)
    return batch.set_column(at, S.EMBED_INPUT, pc.if_else(pa.array(skip, pa.bool_()), pa.scalar(None, pa.string()),
                                                          batch[S.EMBED_INPUT].cast(pa.string())))


def keep_planned(batch: pa.Table, todo: dict[str, str]) -> pa.Table:
    """Second pass of an incremental run (in the read tasks, or here): keep the rows the plan embeds, by id and
    content hash (a later duplicate with other content was quarantined by the plan; the sink drops a later
    duplicate with the same content)."""
    keep = [i in todo and todo[i] == h for i, h in zip(batch[S.ID].to_pylist(), batch[S.CONTENT_HASH].to_pylist())]
    return batch.filter(pa.array(keep, pa.bool_()))


def resume_planned(state, staged, todo: dict[str, str]) -> None:
    """Incremental run: planned documents a killed run already staged (same content) are done; staged rows the
    plan no longer wants (unchanged since, changed again, or gone) leave the staging table."""
    sink = state.sink
    if not sink.done:
        return
    resumed = sorted({i for i, h in sink.done if todo.get(i) == h})
    hashes = [todo.pop(i) for i in resumed]
    sink.resume(resumed, hashes)
    drop_stale_resumed(state, staged)


def drop_stale_resumed(state, staged) -> None:
    """Staged rows of a killed run that this run did not take over (the corpus changed since) are deleted."""
    sink = state.sink
    stale = sorted({i for i, _ in sink.done if i not in sink.resumed})
    if stale:
        staged.delete_ids(stale, not_run=state.run_id)
    if sink.done:
        state.report["resume"].update(taken_over=sink.rows_resumed, dropped=len(stale))


def keep_one_row_per_id(state, staged) -> None:
    """Before the commit of a resumed run: exactly one staged version per document id (its passages), the one with
    the content this run took over (or embedded). Two killed runs can leave two versions of a changed document in
    the staging table; publishing both would mix their passages."""
    cols = staged.columns([S.ID, S.CONTENT_HASH, S.RUN_ID])
    rows: dict[str, list[tuple[str, str]]] = {}
    seen: set[tuple[str, str, str]] = set()
    for i, h, r in zip(cols[S.ID].to_pylist(), cols[S.CONTENT_HASH].to_pylist(), cols[S.RUN_ID].to_pylist()):
        if (i, h, r) not in seen:  # one entry per (document, content, run): a document's passages share them
            seen.add((i, h, r))
            rows.setdefault(i, []).append((h, r))
    keep = {}
    for i, versions in rows.items():
        if len(versions) < 2:
            continue
        mine = [v for v in versions if v[1] == state.run_id]  # embedded by this run: the corpus's content now
        wanted = mine or [v for v in versions if v[0] == state.sink.resumed.get(i)] or versions
        keep[i] = max(wanted, key=lambda v: v[1])
    if keep:
        staged.keep_only(keep)
        state.report.setdefault("resume", {})["duplicates_dropped"] = sum(len(rows[i]) - 1 for i in keep)
