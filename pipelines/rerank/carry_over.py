"""Carry-over: a query whose current ranking this run would compute again unchanged keeps it.

Reads top to bottom::

    cross_encoder_key   what scores a pair: the cross-encoder's files, max_length and the precision it runs at
                        (the pair cache's keys and the settings digest both start from it)
    settings_key        a digest of everything besides the query and the passages that a ranking depends on
    unchanged_rankings  the current rankings' rows with the same query (and normalisation), passages version and
                        settings digest; their count, last_seen and run id become this run's

Example::

    sink.settings = settings_key(cfg, ce_id, fusion_weight, passages_version=version)
    carried = unchanged_rankings(store, cfg, selected, sink)  # rows in RANKINGS_SCHEMA, ready to stage
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S


def precision(rr, device: str) -> str:
    """What runs the cross-encoder, for the pair cache's key: scores from another precision are not reused."""
    return precision_of(rr.backend, rr.dtype, device)


def precision_of(backend: str, dtype: str, device: str) -> str:
    """``precision`` from its parts: an ONNX backend runs on CPU only (on a GPU the torch backend runs, and is
    recorded as such); torch's label says its device and dtype, as resolved where this runs."""
    from pipelines.models import precision_label

    if backend != "torch" and device == "cpu":
        if backend.startswith("openvino"):  # its inference precision follows dtype and the CPU
            from pipelines.models.onnx_runtime import openvino_precision

            return f"cpu/{backend}/{openvino_precision(dtype)}"
        return f"cpu/{backend}"
    return precision_label(dtype, device)


def cross_encoder_key(rr, device: str) -> str:
    """The cross-encoder's identity (``pipelines.rerank.pair_cache.cross_encoder_id``) as ``rr`` (``cfg.rerank``) runs it
    on ``device``; hashes the model's weights, so the key changes when they do."""
    from pipelines.rerank import pair_cache

    return pair_cache.cross_encoder_id(rr.model, rr.max_length, precision=precision(rr, device))


def settings_key(cfg, cross_encoder_id: str, fusion_weight: float | None, passages_version: int | None = None) -> str:
    """A digest of everything besides the query and the passages that a ranking depends on: equal keys on the same
    passages version give the same ranking, so the previous run's can be carried over. The vector search counts
    as the method it resolves to on passages (``passages_version``, default the latest): ``retrieve.exact``
    changes candidates only through it (ANN recall)."""
    import hashlib
    import json

    from pipelines.rerank.exact_search import configured_method

    rt, rr, e, ix = cfg.retrieve, cfg.rerank, cfg.embed, cfg.index
    settings = {"bi_encoder": e.identity, "normalize": e.normalize, "max_seq_length": e.max_seq_length,
                "k": rt.k, "source": rt.source, "rrf_k": rt.rrf_k, "hybrid_fusion": rt.hybrid_fusion,
                "vector_weight": rt.vector_weight, "level": rt.level, "passage_hits": rt.passage_hits,
                "query_prompt": e.query_prompt,
                "method": configured_method(cfg, passages_version)[0],
                "metric": ix.metric, "ann": ix.ann.model_dump(mode="json"), "fts": ix.fts.columns,
                "cross_encoder": cross_encoder_id, "top_n": rr.top_n, "input_fields": rr.input_fields,
                "separator": rr.separator, "fusion_weight": fusion_weight}
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def unchanged_rankings(store, cfg, selected: pa.Table, sink) -> pa.Table:
    """Rows of the current rankings that this run would compute again unchanged: the same query (and
    normalisation), passages version and settings (``sink.passages_version``, ``sink.settings``,
    ``sink.normalizer``). Count, last_seen and run_id are this run's."""
    table = store.open(cfg.storage.rankings_table)
    if table is None or set(S.RANKINGS_SCHEMA.names) - set(table.schema.names):  # an older release's table
        return S.RANKINGS_SCHEMA.empty_table()
    rows = store.rows_by_id(table, selected[S.QUERY_ID].to_pylist(), S.RANKINGS_SCHEMA.names, key=S.QUERY_ID)
    same = pc.and_(pc.and_(pc.equal(rows[S.PASSAGES_VERSION], sink.passages_version),
                           pc.equal(rows[S.SETTINGS], sink.settings)),
                   pc.equal(rows[S.NORMALIZER], sink.normalizer))
    rows = rows.filter(pc.fill_null(same, False))
    if rows.num_rows == 0:
        return S.RANKINGS_SCHEMA.empty_table()
    today = pc.index_in(rows[S.QUERY_ID], value_set=selected[S.QUERY_ID])  # this run's count and last_seen
    for name in (S.COUNT, S.LAST_SEEN):
        rows = rows.set_column(rows.schema.get_field_index(name), name, selected[name].take(today))
    rows = rows.set_column(rows.schema.get_field_index(S.RUN_ID), S.RUN_ID, pa.array([sink.run_id] * rows.num_rows))
    return rows.select(S.RANKINGS_SCHEMA.names).cast(S.RANKINGS_SCHEMA)
