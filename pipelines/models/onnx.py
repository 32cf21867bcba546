"""ONNX Runtime backends for the bi-encoder and the cross-encoder (``embed.backend`` / ``rerank.backend``:
``onnx`` or ``onnx-int8``), for CPUs.

sentence-transformers' own ONNX backend needs ``optimum-onnx``, whose releases pin ``transformers<4.58``;
this stack runs transformers 5. So batchrank exports the model itself, once per model and machine:

* the transformer of a sentence-transformers model (``SentenceTransformer`` module 0, or a ``CrossEncoder``'s
  sequence-classification model) with eager attention, through ``torch.onnx.export``; eager attention exports
  as plain MatMul/Softmax nodes, which dynamic quantisation turns into int8 MatMuls (the SDPA export does not
  quantise well: 1.04x against 1.91x here);
* ``onnx-int8``: ONNX Runtime's dynamic quantisation (int8 weights per channel, uint8 activations: the
  settings of sentence-transformers' ``export_dynamic_quantized_onnx_model`` for AVX-512 VNNI);
* pooling (mean, CLS or max, from the model's Pooling module), normalisation and the cross-encoder's
  activation (sigmoid for one label, as ``CrossEncoder.predict``) stay in numpy, exactly as configured.

Exports are cached under ``$BATCHRANK_CACHE`` (default ``~/.cache/batchrank``)/onnx, keyed by the model's files,
the kind, the quantisation and the library versions; a new folder appears atomically (concurrent actors on
one machine export at most a few times, and never read a half-written model).

Batching is ``pipelines.models.batching.BatchRunner``'s: by padded tokens, the next batch tokenised in a thread while
ONNX Runtime runs the current one (it releases the GIL), so the model does not wait for the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnx", "onnx-int8")
OPSET = 17


class BackendError(ValueError):
    """A model the ONNX backend cannot run; the message names the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("BATCHRANK_CACHE", "~/.cache/batchrank")).expanduser() / "onnx"


def _fingerprint(name: str, kind: str, quantize: bool) -> str:
    from importlib.metadata import version  # not imports: an actor with a cached export never loads torch

    h = hashlib.sha256(json.dumps([name, kind, quantize, OPSET, version("onnxruntime"), version("torch"),
                                   version("transformers")]).encode())
    root = Path(name)
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file() and "onnx" not in p.parts:
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def export(name: str, kind: str, *, quantize: bool, trust_remote_code: bool = False) -> Path:
    """The cached export folder of model ``name`` (``kind``: ``bi-encoder`` or ``cross-encoder``), made if needed."""
    from pipelines.models.names import resolve_model

    resolved = resolve_model(name)
    target = cache_root() / f"{Path(str(name)).name}-{kind}-{'int8' if quantize else 'fp32'}-" \
                            f"{_fingerprint(resolved, kind, quantize)}"
    if (target / "meta.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        meta = (_export_bi_encoder if kind == "bi-encoder" else _export_cross_encoder)(resolved, work,
                                                                                     trust_remote_code)
        if quantize:
            _quantize(work / "model.onnx")
        meta.update(quantized=quantize, source=str(name))
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(work, target)  # atomic: another process may have won; its export is as good
        except OSError:
            pass
        log.info("exported %s (%s%s) to %s", name, kind, ", int8" if quantize else "", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _onnx_export(model, sample: dict, path: Path, output: str) -> list[str]:
    import torch

    names = list(sample)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return getattr(self.inner(**dict(zip(names, args))), output)

    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    model = model.float().eval()
    # The tracer's two notes on this export are known and harmless: the branch it freezes compares the attention
    # mask's length with the sequence length, equal for every input this graph is given (the mask comes with its
    # input ids), and the advanced indexing it warns about gets no negative index; the tests check the exported
    # graph against the torch model.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(Wrapped(model), tuple(sample[n] for n in names), str(path), input_names=names,
                          output_names=[output], opset_version=OPSET, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, output: {0: "batch"}})
    return names


def _export_bi_encoder(resolved: str, work: Path, trust_remote_code: bool) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(resolved, device="cpu", trust_remote_code=trust_remote_code)
    modules = list(st)
    kinds = [type(m).__name__ for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise BackendError(f"embed.backend onnx runs Transformer → Pooling (→ Normalize) models; this one is "
                           f"{' → '.join(kinds)}: use embed.backend: torch")
    pooling = getattr(modules[1], "pooling_mode", None)
    if pooling not in ("mean", "cls", "max"):
        raise BackendError(f"embed.backend onnx supports mean, cls and max pooling, not {pooling!r}: use "
                           "embed.backend: torch")
    tok = st.tokenizer
    sample = dict(tok(["a sample", "another sample text"], padding=True, return_tensors="pt"))
    inputs = _onnx_export(modules[0].auto_model, sample, work / "model.onnx", "last_hidden_state")
    tok.save_pretrained(str(work))
    return {"kind": "bi-encoder", "inputs": inputs, "pooling": pooling, "normalize": len(modules) > 2,
            "max_seq_length": st.max_seq_length, "dim": st.get_embedding_dimension()}


def _export_cross_encoder(resolved: str, work: Path, trust_remote_code: bool) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(resolved, device="cpu", trust_remote_code=trust_remote_code)
    activation = type(ce.activation_fn).__name__
    if activation not in ("Sigmoid", "Identity"):
        raise BackendError(f"rerank.backend onnx supports a Sigmoid or Identity activation, not {activation}: use "
                           "rerank.backend: torch")
    tok = ce.tokenizer
    sample = dict(tok([["a query", "a document"], ["q", "another document text"]], padding=True,
                      return_tensors="pt"))
    inputs = _onnx_export(ce.model, sample, work / "model.onnx", "logits")
    tok.save_pretrained(str(work))
    return {"kind": "cross-encoder", "inputs": inputs, "activation": activation, "num_labels": ce.num_labels,
            "max_length": ce.max_length}


def _quantize(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name("model.int8.onnx")
    # onnxruntime advises "pre-processing before quantization" on the root logger for every model without its
    # pre-process metadata; dynamic int8 of a transformer does not need it (sentence-transformers' own export skips
    # it too), so that one advisory is filtered while quantize_dynamic runs and nothing else.
    advisory = _DropMessage("pre-processing before quantization")
    logging.getLogger().addFilter(advisory)
    try:
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
    finally:
        logging.getLogger().removeFilter(advisory)
    os.replace(out, path)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


class _Session:
    """An ONNX Runtime session, its tokenizer and metadata."""

    def __init__(self, folder: Path, threads: int | None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.meta = json.loads((folder / "meta.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads or os.cpu_count() or 1))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def runner(self, length: int, token_budget: int, prepare, finish, pairs: bool):
        from pipelines.models.batching import BatchRunner, token_counter

        def forward(feeds):
            return finish(self.session.run(None, feeds)[0], feeds)

        return BatchRunner(lengths=token_counter(self.tokenizer, length, pairs=pairs), prepare=prepare,
                           forward=forward, token_budget=token_budget)

    def feeds(self, encoded) -> dict[str, np.ndarray]:
        return {n: np.asarray(encoded[n], dtype=np.int64) for n in self.meta["inputs"]}


class OnnxBiEncoder:
    """``encode`` like ``SentenceTransformer.encode`` (numpy out), on an exported model."""

    device = "cpu"

    def __init__(self, folder: Path, *, threads: int | None = None, max_seq_length: int | None = None,
                 batch_tokens: int = 4096):
        self._s = _Session(folder, threads)
        self.max_seq_length = max_seq_length or self._s.meta["max_seq_length"]
        self.normalize = bool(self._s.meta["normalize"])
        self.runner = self._s.runner(self.max_seq_length, batch_tokens, self._tokenize, self._finish, pairs=False)

    def get_embedding_dimension(self) -> int:
        return int(self._s.meta["dim"])

    def _tokenize(self, batch):
        return self._s.feeds(self._s.tokenizer(batch, padding=True, truncation=True, max_length=self.max_seq_length,
                                               return_tensors="np"))

    def _finish(self, hidden, feeds):
        pooling = self._s.meta["pooling"]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        if pooling == "cls":
            emb = hidden[:, 0]
        elif pooling == "max":
            emb = np.where(mask > 0, hidden, -np.inf).max(axis=1)
        else:
            emb = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        if self.normalize:
            emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
        return emb.astype(np.float32)

    def encode(self, texts: list[str], normalize_embeddings: bool = False, convert_to_tensor: bool = False,
               **_: Any):
        from pipelines.models.batching import encode_output

        self.normalize = bool(self._s.meta["normalize"]) or normalize_embeddings
        return encode_output(self.runner, texts, self.get_embedding_dimension(), convert_to_tensor)


class OnnxCrossEncoder:
    """``predict`` like ``CrossEncoder.predict`` (one label, activation applied), on an exported model."""

    device = "cpu"

    def __init__(self, folder: Path, *, threads: int | None = None, max_length: int | None = None,
                 batch_tokens: int = 4096):
        self._s = _Session(folder, threads)
        self.num_labels = self._s.meta["num_labels"]
        self.max_length = max_length or self._s.meta["max_length"]
        self.sigmoid = self._s.meta["activation"] == "Sigmoid"
        self.runner = self._s.runner(self.max_length, batch_tokens, self._tokenize, self._finish, pairs=True)

    def _tokenize(self, batch):
        return self._s.feeds(self._s.tokenizer([p[0] for p in batch], [p[1] for p in batch], padding=True,
                                               truncation=True, max_length=self.max_length, return_tensors="np"))

    def _finish(self, logits, _feeds):
        scores = logits[:, 0].astype(np.float32)
        return 1.0 / (1.0 + np.exp(-scores)) if self.sigmoid else scores

    def predict(self, pairs: list[tuple[str, str]], **_: Any) -> np.ndarray:
        out = self.runner.run([(a, b) for a, b in pairs])
        return np.zeros(0, np.float32) if out is None else out.astype(np.float32)


def load(name: str, kind: str, backend: str, *, threads: int | None = None, trust_remote_code: bool = False,
         length: int | None = None, batch_tokens: int = 4096):
    """An ``OnnxBiEncoder`` or ``OnnxCrossEncoder`` for ``backend`` ``onnx`` or ``onnx-int8``."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendError(f"backend {backend} needs onnxruntime and onnx: pip install 'batchrank[onnx]' (or use "
                           "backend: torch)") from None
    folder = export(name, kind, quantize=backend == "onnx-int8", trust_remote_code=trust_remote_code)
    if kind == "bi-encoder":
        return OnnxBiEncoder(folder, threads=threads, max_seq_length=length, batch_tokens=batch_tokens)
    return OnnxCrossEncoder(folder, threads=threads, max_length=length, batch_tokens=batch_tokens)
