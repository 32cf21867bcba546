"""What an index run deletes from ``passages``, and the guards that refuse a deletion a damaged input would cause.

Reads top to bottom::

    deletions              a snapshot: ids it no longer holds; a change feed: ids its rows mark deleted
    rebuild_deletions      a model change's overwrite: documents the new model's set lacks
    check_delete_fraction  more than corpus.max_delete_fraction of the table gone: refused (a truncated file)
    show_id                an id cut for the report and messages
    rebuild_change         whether a run rebuilds passages (another model, chunking or document prompt), and why

``state`` is the index run's state: its id state (ids.py: what passages holds, the ids the input holds), its sink
(delete markers, unreadable rows), the count of documents passages held, and its report.
"""

from __future__ import annotations

import logging

log = logging.getLogger("batchrank.index")


def deletions(cfg, state) -> list[str]:
    """Ids to remove from passages: those a snapshot no longer holds, or those a change feed marks deleted.
    A snapshot missing more than ``corpus.max_delete_fraction`` of the table is refused (a truncated file); one
    with rows that could not be read (no id to be had: a torn line, an unreadable file) proves no absence, so its
    deletions are withheld (``corpus.delete_despite_unreadable`` allows them)."""
    from pipelines.index.ids import id_hash

    c, sink, ids = cfg.corpus, state.sink, state.ids
    if c.mode == "changes":
        marked = sorted(sink.delete_markers)
        return [i for i, held in zip(marked, ids.known_ids([id_hash(i) for i in marked])) if held]
    gone = ids.gone("seen")  # the known ids no input row held (the id state's: actors for a large table)
    check_delete_fraction(cfg, len(gone), state.known, "the corpus snapshot lacks")
    if gone and sink.unidentified and not c.delete_despite_unreadable:
        state.report["deletions_withheld"] = {
            "documents": len(gone), "ids_sample": [show_id(i) for i in gone[:20]],
            "unreadable_rows": sink.unidentified, "reasons": dict(sorted(sink.unidentified_reasons.items()))}
        log.warning("%s document(s) absent from the snapshot were NOT deleted: %s input row(s) could not be read "
                    "(no id), and an absent document may be one of them; fix the input (see the quarantine), or "
                    "set corpus.delete_despite_unreadable: true", f"{len(gone):,}", f"{sink.unidentified:,}")
        return []
    return gone


def rebuild_deletions(cfg, state, gone: list[str], n_table: int) -> list[str]:
    """What a model change's overwrite drops (documents the new model's set lacks, quarantined ones included),
    under the same guards as any deletion; a rebuild cannot withhold them, so it is refused instead."""
    from pipelines.store import StoreError

    sink = state.sink
    check_delete_fraction(cfg, len(gone), n_table, "the model change would drop")
    if gone and sink.unidentified and not cfg.corpus.delete_despite_unreadable:
        raise StoreError(
            f"the model change would drop {len(gone):,} document(s) absent from the new model's set (e.g. "
            f"{show_id(gone[0])!r}), and {sink.unidentified:,} input row(s) could not be read (no id), so they may be "
            "among them; fix the input (see the quarantine table) and run again, or set "
            "corpus.delete_despite_unreadable: true. Nothing was written")
    return gone


def check_delete_fraction(cfg, n_gone: int, n_table: int, what: str) -> None:
    from pipelines.store import StoreError

    c = cfg.corpus
    if n_table and n_gone > c.max_delete_fraction * n_table:
        raise StoreError(
            f"{what} {n_gone:,} of the {n_table:,} documents in '{cfg.storage.passages_table}' "
            f"({n_gone / n_table:.0%}), over corpus.max_delete_fraction={c.max_delete_fraction}; if the corpus really "
            "shrank, raise it (1 allows any deletion); if the input holds only changes, set corpus.mode: changes. "
            "Nothing was written")


def show_id(doc_id: str, limit: int = 200) -> str:
    """An id cut for display only (decisions always use the whole id)."""
    return doc_id if len(doc_id) <= limit else f"{doc_id[:limit]}... [{len(doc_id):,} chars]"


def rebuild_change(cfg, store) -> dict | None:
    """None when ``passages`` can be updated in place; else what makes this run a rebuild (every document embedded
    again, one overwrite): ``model_change`` (another bi-encoder) or ``passage_settings_change`` (other chunking,
    document prompt or input fields). A change feed cannot rebuild (it does not hold every document): refused."""
    from pipelines.config.index import same_passages
    from pipelines.store import StoreError

    built_with, name, identity = store.passages_model(), cfg.storage.passages_table, cfg.embed.identity
    if built_with is None:
        return None
    settings = store.passages_settings()
    if built_with != identity:
        change, what = {"model_change": {"from": built_with, "to": identity}}, \
            f"was built with '{built_with}' and embed.model is now '{identity}'"
    elif not same_passages(settings, cfg.passage_settings):
        change, what = {"passage_settings_change": {"from": settings, "to": cfg.passage_settings}}, \
            f"was split into passages as {settings} and is now to be as {cfg.passage_settings}"
    else:
        return None
    if cfg.corpus.mode == "changes":
        raise StoreError(f"'{name}' {what}: that change re-embeds every document, and a change feed does not hold "
                         "them all; run this once with corpus.mode: snapshot on the full corpus (or set the "
                         "settings back)")
    return change
