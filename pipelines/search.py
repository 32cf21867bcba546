"""Ad-hoc search over ``passages``: embed one query with the table's bi-encoder, then vector or hybrid search.

Example::

    hits = search(cfg, "How to learn machine learning?", k=5)
    hits[0]["id"], hits[0]["score"]
"""

from __future__ import annotations

import functools
from typing import Any

from pipelines import schema as S


@functools.lru_cache(maxsize=2)
def _encoder(model: str, device: str, dtype: str, max_seq_length: int | None, trust_remote_code: bool):
    from pipelines.models import load_bi_encoder

    return load_bi_encoder(model, device=device, dtype=dtype, max_seq_length=max_seq_length,
                           trust_remote_code=trust_remote_code)


def search(cfg, query: str, *, k: int = 10, hybrid: bool = False, exact: bool = False) -> list[dict[str, Any]]:
    from pipelines.store import Store

    if not query.strip():
        raise ValueError("the query is empty; pass some text to search for")
    store = Store(cfg.storage)
    table = store.passages_for_queries(cfg.embed.model)
    e = cfg.embed
    model = _encoder(e.model, e.device, e.dtype, e.max_seq_length, e.trust_remote_code)
    vector = model.encode([query], normalize_embeddings=e.normalize, convert_to_numpy=True)[0].astype("float32")
    hits = store.search(vector, k=k, index_cfg=cfg.index, text=query, hybrid=hybrid, exact=exact,
                        table=table).to_pylist()
    for hit in hits:
        if "_relevance_score" in hit:
            hit["score"] = hit.pop("_relevance_score")
        else:
            distance = hit.pop("_distance")
            hit["score"] = 1.0 - distance if cfg.index.metric == "cosine" else -distance
        hit.pop(S.VECTOR, None)
    return hits
