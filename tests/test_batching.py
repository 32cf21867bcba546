"""Token-budget batching: the plan, the runner's ordering and errors, and the torch wrappers against plain
sentence-transformers (same numbers in fp32), with the real loaders on tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.models.batching import BatchRunner, plan

TEXTS = ["cell", "a much longer text about proteins binding to the membrane of a cell in the brain " * 3,
         "gene", "", "  leading and trailing spaces  ", "brain model " * 40, "Upper CASE Words", "x " * 300]


def test_plan_respects_the_budget_and_covers_every_row_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = plan(lengths, token_budget=1024, max_rows=64)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or lengths[b].max() * len(b) <= 1024
    firsts = [int(lengths[b].max()) for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first: neighbours pad little
    assert plan(np.array([5000]), token_budget=1024) [0].tolist() == [0]  # too long alone: a batch of its own



def test_cpu_batches_are_capped_in_rows_and_gpu_batches_are_not():
    from pipelines.models.batching import CPU_MAX_ROWS, MAX_ROWS, default_max_rows

    assert default_max_rows("cpu") == CPU_MAX_ROWS < MAX_ROWS == default_max_rows("cuda:0")
    same = np.full(1000, 10)  # equal lengths: only the row cap ends a batch
    assert max(len(b) for b in plan(same, 4096, default_max_rows("cpu"))) == CPU_MAX_ROWS
    assert max(len(b) for b in plan(same, 65536, default_max_rows("cuda"))) == 1000

def test_runner_returns_rows_in_the_callers_order_and_raises_producer_errors():
    seen_batches = []

    def forward(items):
        seen_batches.append(items)
        return np.array([[len(x)] for x in items])

    runner = BatchRunner(lengths=lambda items: [len(x) for x in items], prepare=list, forward=forward,
                         token_budget=20, chunk=3)
    out = runner.run(TEXTS)
    assert out[:, 0].tolist() == [len(t) for t in TEXTS]
    assert runner.batches == len(seen_batches) and sum(map(len, seen_batches)) == len(TEXTS)
    assert runner.run([]) is None

    def bad(items):
        raise ValueError("tokenizer broke")

    with pytest.raises(ValueError, match="tokenizer broke"):
        BatchRunner(lengths=bad, prepare=list, forward=forward, token_budget=20).run(TEXTS)


def test_token_batched_bi_encoder_equals_plain_encode(tiny_model):
    from sentence_transformers import SentenceTransformer

    from pipelines.models import TokenBatchedBiEncoder, load_bi_encoder

    plain = SentenceTransformer(tiny_model, device="cpu").encode(TEXTS, batch_size=3, normalize_embeddings=True)
    for budget in (16, 64, 4096):
        ours = load_bi_encoder(tiny_model, device="cpu", dtype="float32", batch_tokens=budget)
        assert isinstance(ours, TokenBatchedBiEncoder)
        out = ours.encode(TEXTS, normalize_embeddings=True)
        np.testing.assert_allclose(out, plain, atol=1e-5)
    assert ours.encode([], normalize_embeddings=True).shape == (0, plain.shape[1])


def test_token_batched_cross_encoder_equals_plain_predict(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    from pipelines.models import load_cross_encoder

    pairs = [(q, d) for q in TEXTS[:4] for d in TEXTS]
    plain = CrossEncoder(tiny_cross_encoder, device="cpu", max_length=64).predict(pairs, batch_size=5)
    ours = load_cross_encoder(tiny_cross_encoder, device="cpu", dtype="float32", max_length=64, batch_tokens=128)
    np.testing.assert_allclose(ours.predict(pairs), plain, atol=1e-5)
    assert ours.runner.batches > 1 and ours.runner.padded_tokens <= ours.runner.batches * 128 + 64


def test_identical_pairs_are_scored_once(tiny_cross_encoder):
    from pipelines.rerank.score import Scorer

    calls = []

    class Counting:
        def predict(self, pairs, **_):
            calls.append(list(pairs))
            return np.array([len(q) + len(d) for q, d in pairs], dtype=np.float32)

    stage = Scorer(Counting(), top_n=3)
    pairs = [("q", "same text"), ("q", "other"), ("q", "same text"), ("r", "same text")]
    scores = stage.predict(pairs)
    assert calls == [[("q", "same text"), ("q", "other"), ("r", "same text")]]
    assert scores.tolist() == [10.0, 6.0, 10.0, 10.0] and stage.duplicates == 1


def test_sentence_transformers_loads_without_sklearn_until_a_function_needs_it(tiny_model):
    """scikit-learn (~1 s of every model actor's start) stays unloaded while a model loads and embeds; the one
    sentence-transformers function that uses it (sparse Manhattan similarity) still works, with the real one."""
    import subprocess
    import sys

    code = f"""
import sys
from pipelines.models import load_bi_encoder
model = load_bi_encoder({tiny_model!r}, device="cpu", dtype="float32", batch_tokens=0)
vectors = model.encode(["a short text", "another one"], batch_size=2)
assert vectors.shape[0] == 2, vectors.shape
assert "sklearn" not in sys.modules, "scikit-learn was imported on the model's start-up path"
import torch
from sentence_transformers import util
dense = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
got = util.manhattan_sim(dense.to_sparse(), dense.to_sparse())
assert torch.allclose(got, util.manhattan_sim(dense, dense)), got
assert "sklearn.metrics" in sys.modules and hasattr(sys.modules["sklearn.metrics"], "roc_auc_score")
from sklearn.metrics import ndcg_score  # a later import gets the real module
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_token_ids_equals_the_tokenizers_own_padding(tiny_model, side):
    """The ONNX and OpenVINO backends tokenise each text once and pad a batch from its ids: the same arrays as the
    tokenizer's ``padding=True`` (pairs with their token type ids; either padding side)."""
    from transformers import AutoTokenizer

    from pipelines.models.batching import pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side=side)
    queries, docs = ["cell protein", "a", "brain data in 2024"], ["a long text " * 9, "b", "gene model"]
    want = tok(queries, docs, padding=True, truncation=True, max_length=16, return_tensors="np")
    enc = tok(queries, docs, truncation=True, max_length=16, return_attention_mask=False)
    rows = [{"input_ids": i, "token_type_ids": t} for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
    got = pad_batch(rows, tok.pad_token_id, left=side == "left")
    assert set(got) == {"input_ids", "token_type_ids", "attention_mask"}
    for name in got:
        assert np.array_equal(got[name], want[name]), name
