"""The architectures users bring (issue 19): tiny random BERT, MPNet, RoBERTa, XLM-RoBERTa, DeBERTa-v2, ModernBERT
and ELECTRA models (``tests/archs.py``), bi-encoders with mean and with CLS pooling and one-logit cross-encoders,
through batchrank's loaders (``load_bi_encoder`` / ``load_cross_encoder``, token-batched, CPU) on each backend,
against plain ``SentenceTransformer.encode`` / ``CrossEncoder.predict``.

Tolerances, with what was measured on these models (2-core AVX-512 CPU, this module's texts and pairs):

* torch (float32) and onnx: the same numbers to float rounding. Unit vectors within 1e-4 per component (measured:
  torch bit-identical, onnx <= 4e-7; two texts' vectors differ by >= 0.05), and the model's own output (raw after
  CLS pooling) within 1e-4 of its scale; cross-encoder scores within 1e-4 of the scores' spread (measured <= 2e-6
  of spreads 0.19-0.43).
* onnx-int8 (dynamic int8 weights and activations): cosine >= 0.98 with the fp32 vector (measured >= 0.9993);
  scores with Pearson correlation >= 0.95 (measured >= 0.998) and within 15% of the spread (measured <= 6%). Looser
  than measured because int8 kernels differ between CPUs (VNNI or not), and int8 is chosen for speed, not identity.

A cell the backend cannot run must be refused when the model is loaded, with a ``BackendError`` naming the model,
the backend and the fix: ``REFUSED`` lists such cells with the message expected (none today: every cell runs).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from archs import ARCHS, WORDS, build_bi_encoder, build_cross_encoder

pytest.importorskip("onnxruntime", reason="pip install 'batchrank[onnx]'")

from pipelines.models import load_bi_encoder, load_cross_encoder
from pipelines.models import onnx as onnx_backend
from pipelines.models.onnx import BackendError

BACKENDS = ("torch", "onnx", "onnx-int8")
# (architecture, "mean" | "cls" | "cross", backend) -> a fragment of the refusal expected when it loads
REFUSED: dict[tuple[str, str, str], str] = {}

TEXTS = ["cell protein binding", "How to learn Machine Learning, for beginners?", "a",
         " ".join(WORDS * 3),  # longer than the models' 64 tokens: truncated
         "the brain data of 2024: a study about gene risk", "xyz qwerty"]
PAIRS = [(q, d) for q in ("cell protein", "what is the cancer risk of vitamin d?") for d in TEXTS]


class Built:
    """Each tiny model built once for the module, with its sentence-transformers reference output."""

    def __init__(self, folder):
        self.folder, self.cache = folder, {}

    def get(self, arch: str, head: str):
        if (arch, head) not in self.cache:
            if head == "cross":
                from sentence_transformers import CrossEncoder

                path = build_cross_encoder(arch, self.folder)
                ref = CrossEncoder(str(path), device="cpu").predict(PAIRS)
            else:
                from sentence_transformers import SentenceTransformer

                path = build_bi_encoder(arch, self.folder, head)
                st = SentenceTransformer(str(path), device="cpu")
                ref = st.encode(TEXTS), st.encode(TEXTS, normalize_embeddings=True)
            self.cache[arch, head] = str(path), ref
        return self.cache[arch, head]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHRANK_CACHE", str(folder / "cache"))  # exports of this module only
        yield Built(folder)


def _refused(arch: str, head: str, backend: str, load):
    """True when this cell is one the backend refuses; asserts the refusal."""
    if (arch, head, backend) not in REFUSED:
        return False
    with pytest.raises(BackendError, match=REFUSED[arch, head, backend]) as err:
        load()
    assert "use " in str(err.value) and "backend: torch" in str(err.value)
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bi_encoder_matches_sentence_transformers(built, arch, pooling, backend):
    path, (raw, unit) = built.get(arch, pooling)

    def load():
        return load_bi_encoder(path, device="cpu", dtype="float32", backend=backend, batch_tokens=0)

    if _refused(arch, pooling, backend, load):
        return
    model = load()
    out = model.encode(TEXTS, normalize_embeddings=True)
    assert out.shape == unit.shape == (len(TEXTS), model.get_embedding_dimension())
    if backend == "onnx-int8":
        cos = (out * unit).sum(axis=1)
        assert cos.min() >= 0.98, cos
        return
    gaps = np.abs(unit[:, None] - unit[None, :]).max(axis=2)[np.triu_indices(len(TEXTS), 1)]
    assert gaps.min() > 100 * 1e-4  # different texts, different vectors: the tolerance below means something
    assert np.abs(out - unit).max() <= 1e-4, np.abs(out - unit).max()
    # without normalize_embeddings: the model's own output (unit after mean pooling's Normalize, raw after CLS)
    assert np.abs(model.encode(TEXTS) - raw).max() <= 1e-4 * max(1.0, float(np.abs(raw).max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cross_encoder_matches_sentence_transformers(built, arch, backend):
    path, ref = built.get(arch, "cross")

    def load():
        return load_cross_encoder(path, device="cpu", dtype="float32", backend=backend, batch_tokens=0)

    if _refused(arch, "cross", backend, load):
        return
    scores = load().predict(PAIRS)
    spread = float(ref.max() - ref.min())
    assert spread > 0.05, ref  # scores apart enough for the tolerances to mean something (see archs.INIT)
    assert scores.shape == ref.shape and scores.dtype == np.float32
    err = float(np.abs(scores - ref).max())
    if backend == "onnx-int8":
        assert np.corrcoef(scores, ref)[0, 1] >= 0.95, (scores, ref)
        assert err <= 0.15 * spread, err / spread
    else:
        assert err <= 1e-4 * spread, err


def test_onnx_bi_encoder_applies_prompts_as_sentence_transformers(built):
    from sentence_transformers import SentenceTransformer

    prompts = {"query": "query: ", "document": "passage: "}
    path = build_bi_encoder("bert", built.folder, "mean", prompts=prompts, default_prompt_name="query")
    st = SentenceTransformer(str(path), device="cpu")
    model = load_bi_encoder(str(path), device="cpu", backend="onnx", batch_tokens=0)
    assert model.prompts == st.prompts and model.default_prompt_name == "query"
    for kwargs in ({}, {"prompt": "passage: "}, {"prompt_name": "document"}, {"prompt": ""}):
        want = st.encode(TEXTS, normalize_embeddings=True, **kwargs)
        assert np.abs(model.encode(TEXTS, normalize_embeddings=True, **kwargs) - want).max() <= 1e-4, kwargs
    assert np.abs(st.encode(TEXTS, prompt="") - st.encode(TEXTS)).max() > 1e-2  # the default prompt mattered
    with pytest.raises(ValueError, match="'summary' is not one of this model's prompts"):
        model.encode(TEXTS, prompt_name="summary")


def test_onnx_feeds_the_graph_only_the_inputs_it_reads(built):
    """A ModernBERT whose tokenizer gives token_type_ids (which ModernBERT does not take): the exported graph has no
    such input, and ONNX Runtime refuses a feed it does not know, so the session gets the graph's inputs only."""
    import json
    import shutil

    from sentence_transformers import SentenceTransformer

    path = built.folder / "modernbert-token-types"
    shutil.copytree(built.get("modernbert", "mean")[0], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    st = SentenceTransformer(str(path), device="cpu")
    assert "token_type_ids" in st.tokenizer(TEXTS[:1])
    model = load_bi_encoder(str(path), device="cpu", backend="onnx", batch_tokens=0)
    assert model._s.inputs == ["input_ids", "attention_mask"]
    assert np.abs(model.encode(TEXTS) - st.encode(TEXTS)).max() <= 1e-4


def test_onnx_refuses_pooling_that_leaves_prompt_tokens_out(built):
    path = build_bi_encoder("bert", built.folder, "mean", include_prompt=False, prompts={"query": "query: "},
                            default_prompt_name="query")
    with pytest.raises(BackendError, match=r"embed.backend onnx-int8 cannot run '.*prompt-excluded'.*include_prompt="
                                           r"False.*; use embed.backend: torch"):
        load_bi_encoder(str(path), device="cpu", backend="onnx-int8", batch_tokens=0)


def test_onnx_refuses_a_model_that_does_not_export(built, monkeypatch):
    import torch

    path, _ = built.get("bert", "cross")

    def fails(*_args, **_kwargs):
        raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", fails)
    monkeypatch.setenv("BATCHRANK_CACHE", str(built.folder / "cache-fails"))
    with pytest.raises(BackendError, match=r"rerank.backend onnx cannot run '.*bert-cross-encoder': its "
                                           r"BertForSequenceClassification does not export to ONNX \(RuntimeError: "
                                           r"Exporting the operator 'aten::made_up'.*supported.\); use "
                                           r"rerank.backend: torch$"):
        load_cross_encoder(path, device="cpu", backend="onnx", batch_tokens=0)


def test_onnx_refuses_a_graph_that_differs_from_torch(built, monkeypatch):
    """A trace that froze something of the sample it was traced with (stood for here by a graph of other weights)
    is caught before the export is kept: refused, not cached, never a wrong vector."""
    import torch

    path, _ = built.get("electra", "mean")
    real = onnx_backend._onnx_export

    def drifted(model, sample, out, output):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.get_input_embeddings().weight.mul_(-1)
        real(other, sample, out, output)

    monkeypatch.setattr(onnx_backend, "_onnx_export", drifted)
    cache = built.folder / "cache-drift"
    monkeypatch.setenv("BATCHRANK_CACHE", str(cache))
    with pytest.raises(BackendError, match=r"embed.backend onnx cannot run '.*electra-mean': its ONNX graph "
                                           r"\(ElectraModel\) gives other outputs than torch .*; use embed.backend: "
                                           r"torch"):
        load_bi_encoder(path, device="cpu", backend="onnx", batch_tokens=0)
    assert not [p for p in (cache / "onnx").iterdir()]  # nothing kept, no half-written folder


def test_token_batched_cross_encoder_applies_the_default_prompt_as_predict(built):
    """``CrossEncoder.predict`` prepends the model's default prompt to the query; the jobs' scorers (torch
    token-batched, ONNX) must too."""
    from sentence_transformers import CrossEncoder

    path, _ = built.get("bert", "cross")
    model = CrossEncoder(path, device="cpu")
    model.prompts, model.default_prompt_name = {"rank": "Judge relevance: "}, "rank"
    prompted = str(built.folder / "prompted-cross")
    model.save(prompted)
    want = CrossEncoder(prompted, device="cpu").predict(PAIRS)
    assert np.abs(want - CrossEncoder(path, device="cpu").predict(PAIRS)).max() > 1e-4  # the prompt matters
    for backend in ("torch", "onnx"):
        got = load_cross_encoder(prompted, device="cpu", dtype="float32", backend=backend,
                                 batch_tokens=0).predict(PAIRS)
        assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min()), backend
