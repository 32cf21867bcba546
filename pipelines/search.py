"""Ad-hoc search over ``passages``: one query embedded with the table's bi-encoder, then vector, full-text or hybrid
search (``CandidateSearch``, through the store).

Example::

    hits = search(cfg, "How to learn machine learning?", k=5)
    hits[0]["id"], hits[0]["score"]
"""

from __future__ import annotations

import functools
from typing import Any

from pipelines import schema as S


@functools.lru_cache(maxsize=2)
def _encoder(model: str, device: str, dtype: str, max_seq_length: int | None, trust_remote_code: bool,
             backend: str = "torch", batch_tokens: int | None = 0):
    from pipelines.models import load_bi_encoder

    return load_bi_encoder(model, device=device, dtype=dtype, max_seq_length=max_seq_length,
                           trust_remote_code=trust_remote_code, backend=backend, batch_tokens=batch_tokens)


def search(cfg, query: str, *, k: int = 10, source: str = "vector", exact: bool = False) -> list[dict[str, Any]]:
    """Top ``k`` documents for ``query`` from ``source`` (vector, fts or hybrid), best first, each with its best
    passage (``passage_id``, offsets, text) and a ``score`` (``retrieve.level: passage``: the top k passages)."""
    from pipelines.rerank.retrieve import CandidateSearch
    from pipelines.store import Store

    if not query.strip():
        raise ValueError("the query is empty; pass some text to search for")
    store = Store(cfg.storage)
    table = store.passages_for_queries(cfg.embed.identity)
    vectors = None
    if source != "fts":
        e = cfg.embed
        model = _encoder(e.model, e.device, e.dtype, e.max_seq_length, e.trust_remote_code, e.backend, e.batch_tokens)
        from pipelines.models.prompts import query_prompt

        vectors = model.encode([query], normalize_embeddings=e.normalize, convert_to_numpy=True,
                               prompt=query_prompt(model, e)).astype("float32")
    with CandidateSearch.from_config(store, table, cfg, k=k, source=source, exact=exact, columns=(S.TITLE, S.TEXT),
                                     threads=1) as candidates:
        return candidates(vectors, [query])[0].to_pylist()
