"""The ONNX backends (``embed.backend`` / ``rerank.backend``: onnx, onnx-int8 on ONNX Runtime; openvino,
openvino-int8 on OpenVINO) on the tiny random BERTs:
exported through the real sentence-transformers models, cached, equal to torch in fp32 and close in int8;
the index job records the backend with the model, so vectors of two backends never mix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import good_docs, write_jsonl

pytest.importorskip("onnxruntime", reason="pip install 'batchrank[onnx]'")

from pipelines.models import _onnx_or_torch, load_bi_encoder, load_cross_encoder
from pipelines.models import onnx as onnx_backend

TEXTS = ["cell protein binding", "a much longer text about cancer risk and vitamin studies " * 4, "brain", "gene model"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BATCHRANK_CACHE", str(tmp_path_factory.getbasetemp() / "onnx-cache"))


def test_bi_encoder_fp32_equals_torch_and_int8_is_close(tiny_model):
    ref = load_bi_encoder(tiny_model, device="cpu").encode(TEXTS, batch_size=2, normalize_embeddings=True)
    fp32 = load_bi_encoder(tiny_model, device="cpu", backend="onnx", threads=1)
    out = fp32.encode(TEXTS, batch_size=2, normalize_embeddings=True)
    assert out.shape == ref.shape == (4, fp32.get_embedding_dimension())
    assert np.allclose(out, ref, atol=1e-5)  # same order as given, though run longest first
    int8 = load_bi_encoder(tiny_model, device="cpu", backend="onnx-int8", threads=1)
    cos = (int8.encode(TEXTS, batch_size=3, normalize_embeddings=True) * ref).sum(axis=1)
    assert cos.min() > 0.95, cos
    assert int8.encode([], normalize_embeddings=True).shape == (0, fp32.get_embedding_dimension())
    assert tuple(int8.encode(TEXTS[:1], convert_to_tensor=True).shape) == (1, fp32.get_embedding_dimension())


@pytest.fixture(scope="module")
def spread_cross_encoder(tiny_model) -> str:
    """A tiny random cross-encoder whose scores differ: the tiny BERT initialised with 10x the usual weights (std 0.2,
    not 0.02), so that different pairs get different [CLS] vectors. The default initialisation scores every pair
    within ~1e-4 of 0.5, where any tolerance would hide a wrong score or order."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    raw = Path(tiny_model).parent / "raw"
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(raw, num_labels=1, initializer_range=0.2)
    out = Path(tiny_model).parent / "spread-cross-encoder"
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(raw).save_pretrained(out)
    CrossEncoder(str(out), num_labels=1, max_length=64, device="cpu").save(str(out))
    return str(out)


def test_cross_encoder_fp32_equals_torch_and_int8_is_close(spread_cross_encoder):
    pairs = [(q, d) for q in ("cell protein", "brain data") for d in TEXTS]
    ref = load_cross_encoder(spread_cross_encoder, device="cpu").predict(pairs, batch_size=3, convert_to_numpy=True)
    spread = float(ref.max() - ref.min())
    assert spread > 0.1, ref  # scores far enough apart for the tolerances below to mean something
    gaps = np.abs(ref[:, None] - ref[None, :])
    fp32 = load_cross_encoder(spread_cross_encoder, device="cpu", backend="onnx", threads=1).predict(pairs,
                                                                                                     batch_size=3)
    assert np.abs(fp32 - ref).max() < 1e-4 * spread, fp32 - ref  # the same numbers, to float rounding
    int8 = load_cross_encoder(spread_cross_encoder, device="cpu", backend="onnx-int8", threads=1).predict(pairs)
    assert np.abs(int8 - ref).max() < 0.05 * spread, (int8 - ref) / spread  # measured: ~2% of the spread
    # the order of every two pairs whose torch scores are more than 5% of the spread apart is kept
    apart = gaps > 0.05 * spread
    assert (np.sign(int8[:, None] - int8[None, :]) == np.sign(ref[:, None] - ref[None, :]))[apart].all(), (ref, int8)


def test_openvino_bi_encoder_fp32_equals_torch_and_int8_is_close(tiny_model):
    """OpenVINO compiles the same ONNX graph: f32 gives torch's vectors; its NNCF int8 (calibrated on general
    text, cached as IR in the export) stays close; bf16 (on CPUs that run it natively) closer still."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    ref = load_bi_encoder(tiny_model, device="cpu").encode(TEXTS, batch_size=2, normalize_embeddings=True)
    f32 = load_bi_encoder(tiny_model, device="cpu", dtype="float32", backend="openvino", threads=1)
    assert f32._s.session.precision == "f32"
    # not pinned: OpenVINO pins threads from the first core on, and two 1-thread actors then shared one core
    assert f32._s.session.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert np.allclose(f32.encode(TEXTS, normalize_embeddings=True), ref, atol=1e-5)
    int8 = load_bi_encoder(tiny_model, device="cpu", dtype="float32", backend="openvino-int8", threads=1)
    folder = onnx_backend.export(tiny_model, "bi-encoder", variant="ov-int8")
    meta = __import__("json").loads((folder / "meta.json").read_text())
    assert meta["openvino_model"] == "model.ov-int8.xml" and (folder / "model.ov-int8.bin").is_file()
    cos = (int8.encode(TEXTS, normalize_embeddings=True) * ref).sum(axis=1)
    assert cos.min() > 0.95, cos
    assert cos.min() < 1 - 1e-6  # it is really the quantised model that ran
    auto = load_bi_encoder(tiny_model, device="cpu", dtype="auto", backend="openvino", threads=1)
    from pipelines.models.batching import cpu_supports_bf16

    assert auto._s.session.precision == ("bf16" if cpu_supports_bf16() else "f32")
    assert ((auto.encode(TEXTS, normalize_embeddings=True) * ref).sum(axis=1)).min() > 0.999


def test_openvino_cross_encoder_scores_agree_with_torch(spread_cross_encoder):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pairs = [(q, d) for q in ("cell protein", "brain data") for d in TEXTS]
    ref = load_cross_encoder(spread_cross_encoder, device="cpu").predict(pairs, batch_size=3, convert_to_numpy=True)
    spread = float(ref.max() - ref.min())
    f32 = load_cross_encoder(spread_cross_encoder, device="cpu", dtype="float32", backend="openvino", threads=1)
    assert np.abs(f32.predict(pairs) - ref).max() < 1e-4 * spread
    int8 = load_cross_encoder(spread_cross_encoder, device="cpu", dtype="float32", backend="openvino-int8",
                              threads=1).predict(pairs)
    assert np.abs(int8 - ref).max() < 0.1 * spread, (int8 - ref) / spread
    assert np.corrcoef(int8, ref)[0, 1] > 0.98


def test_exports_are_cached_and_follow_the_model_files(tiny_model, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BATCHRANK_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        first = onnx_backend.export(tiny_model, "bi-encoder", quantize=True)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # onnxruntime's advisory
    stamp = (first / "model.onnx").stat().st_mtime_ns
    assert onnx_backend.export(tiny_model, "bi-encoder", quantize=True) == first  # reused, not exported again
    assert (first / "model.onnx").stat().st_mtime_ns == stamp
    assert onnx_backend.export(tiny_model, "bi-encoder", quantize=False) != first
    assert not [p for p in tmp_path.glob("onnx/.export-*")]  # no half-written folder left


def test_onnx_backends_run_on_cpu_only():
    assert _onnx_or_torch("onnx-int8", "cpu", "embed.backend") == "onnx-int8"
    assert _onnx_or_torch("onnx-int8", "cuda", "embed.backend") == "torch"  # GPUs run torch with bf16/fp16
    assert _onnx_or_torch("openvino-int8", "cuda", "rerank.backend") == "torch"


@pytest.mark.usefixtures("ray_per_module")
def test_index_job_records_the_backend_and_refuses_mixed_vectors(tmp_path, make_config):
    from pipelines.index import job as index
    from pipelines.store import Store, StoreError

    write_jsonl(tmp_path / "docs.jsonl", good_docs(12))
    cfg = make_config(tmp_path / "docs.jsonl", embed={"backend": "onnx-int8"})
    report = index.run(cfg)
    assert report["status"] == "succeeded" and report["rows"]["written"] == 12
    store = Store(cfg.storage)
    assert store.passages_model() == f"{cfg.embed.model} [onnx-int8]"
    torch_cfg = make_config(tmp_path / "docs.jsonl")
    with pytest.raises(StoreError, match="onnx-int8"):  # queries embedded by torch would not match these vectors
        store.passages_for_queries(torch_cfg.embed.identity)


def test_a_cached_export_loads_without_torch(tiny_model, spread_cross_encoder, tmp_path_factory):
    """An ONNX / OpenVINO actor with a cached export imports no torch (~1.3 s), no NNCF (~2 s, torch under it) and no
    transformers config module (which imports torch): its tokenizer is loaded as the generic fast tokenizer, which
    the export checked tokenises as ``AutoTokenizer`` does. Each kind is loaded in a fresh process."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    for model, kind, loader in ((tiny_model, "bi-encoder", "load_bi_encoder"),
                                (spread_cross_encoder, "cross-encoder", "load_cross_encoder")):
        for variant in ("int8", "ov-int8"):
            folder = onnx_backend.export(model, kind, variant=variant)
            assert json.loads((folder / "meta.json").read_text())["tokenizer"] == "fast"
        code = (f"import sys; from pipelines.models import {loader} as load\n"
                f"m = load({model!r}, device='cpu', backend='openvino-int8', threads=1)\n"
                "tok = m._s.tokenizer\n"
                "out = m.encode(['cell protein']) if hasattr(m, 'encode') else m.predict([('cell', 'protein')])\n"
                "print(sorted(n for n in ('torch', 'nncf', 'sentence_transformers', "
                "'transformers.configuration_utils') if n in sys.modules), type(tok).__name__, len(out))")
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(root)})
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-3:] == ["[]", "TokenizersBackend", "1"], (kind, done.stdout, done.stderr[-800:])


def test_an_export_whose_generic_tokenizer_differs_loads_it_with_autotokenizer(tiny_model, tmp_path):
    """The generic fast tokenizer is used only where it gives what AutoTokenizer gives: an export whose tokenizer
    it cannot load (no tokenizer.json: a vocabulary only) is marked ``auto``, and its sessions load AutoTokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.save_pretrained(str(tmp_path))
    check = (["cell protein", "brain"],)
    kwargs = {"padding": True, "truncation": True, "max_length": 16}
    got = tok(*check, return_tensors="np", **kwargs, return_token_type_ids=True)
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    assert onnx_backend._same_without_torch(tmp_path, tok, check, inputs, kwargs, got)
    (tmp_path / "tokenizer.json").unlink()  # the vocabulary only: the generic fast tokenizer cannot load it
    assert not onnx_backend._same_without_torch(tmp_path, tok, check, inputs, kwargs, got)


def test_the_drivers_passage_check_reads_a_cached_exports_tokenizer_without_torch(tiny_model, tmp_path):
    """With an ONNX or OpenVINO backend whose export is cached, the index job's driver checks the passage split with
    the export's tokenizer (no torch: ~1.3 s of its start-up) and finds what AutoTokenizer's check finds."""
    import json
    import os
    import subprocess
    import sys

    from pipelines.config import parse_config
    from pipelines.models.prompts import check_passages

    def config(backend):
        return {"storage": {"uri": str(tmp_path / "db")}, "corpus": {"path": str(tmp_path / "c.jsonl")},
                "embed": {"model": tiny_model, "backend": backend, "document_prompt": "passage: "},
                "chunk": {"overlap": 4}}

    onnx_backend.export(tiny_model, "bi-encoder", variant="fp32")
    expected = check_passages(parse_config(config("torch")))
    code = ("import json, sys; from pipelines.config import parse_config; "
            "from pipelines.models.prompts import check_passages\n"
            f"out = check_passages(parse_config(json.loads({json.dumps(json.dumps(config('onnx')))})))\n"
            "print(json.dumps({'split': out, 'torch': 'torch' in sys.modules}))")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"split": expected, "torch": False}, (got, expected)
