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

Encoding sorts texts by length and tokenises the next batch in a thread while ONNX Runtime runs the current
one (it releases the GIL), so the model does not wait for the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
    import onnxruntime
    import torch
    import transformers

    h = hashlib.sha256(json.dumps([name, kind, quantize, OPSET, onnxruntime.__version__, torch.__version__,
                                   transformers.__version__]).encode())
    root = Path(name)
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file() and "onnx" not in p.parts:
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def export(name: str, kind: str, *, quantize: bool, trust_remote_code: bool = False) -> Path:
    """The cached export folder of model ``name`` (``kind``: ``bi-encoder`` or ``cross-encoder``), made if needed."""
    from pipelines.models import resolve_model

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
    with torch.inference_mode():
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
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
    os.replace(out, path)


class _Session:
    """An ONNX Runtime session, its tokenizer and metadata; batches tokenised one ahead of the model."""

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
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrank-tokenize")

    def run_sorted(self, items: list, lengths: list[int], batch_size: int, tokenize, finish) -> list[np.ndarray]:
        """Run ``items`` longest first in batches; ``tokenize(batch)`` → feeds, ``finish(output, feeds)`` → rows.
        Returns the rows in the original order."""
        order = np.argsort(-np.asarray(lengths), kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        out: list[np.ndarray | None] = [None] * len(items)
        pending = self._pool.submit(tokenize, [items[j] for j in batches[0]]) if batches else None
        for i, idx in enumerate(batches):
            feeds = pending.result()
            if i + 1 < len(batches):  # the tokenizer works on the next batch while the model runs this one
                pending = self._pool.submit(tokenize, [items[j] for j in batches[i + 1]])
            result = self.session.run(None, feeds)[0]
            for j, row in zip(idx, finish(result, feeds)):
                out[j] = row
        return out

    def feeds(self, encoded) -> dict[str, np.ndarray]:
        return {n: np.asarray(encoded[n], dtype=np.int64) for n in self.meta["inputs"]}


class OnnxBiEncoder:
    """``encode`` like ``SentenceTransformer.encode`` (numpy out), on an exported model."""

    device = "cpu"

    def __init__(self, folder: Path, *, threads: int | None = None, max_seq_length: int | None = None):
        self._s = _Session(folder, threads)
        self.max_seq_length = max_seq_length or self._s.meta["max_seq_length"]

    def get_embedding_dimension(self) -> int:
        return int(self._s.meta["dim"])

    def encode(self, texts: list[str], batch_size: int = 32, normalize_embeddings: bool = False,
               convert_to_tensor: bool = False, **_: Any):
        meta, tok = self._s.meta, self._s.tokenizer

        def tokenize(batch):
            return self._s.feeds(tok(batch, padding=True, truncation=True, max_length=self.max_seq_length,
                                     return_tensors="np"))

        def finish(hidden, feeds):
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            if meta["pooling"] == "cls":
                emb = hidden[:, 0]
            elif meta["pooling"] == "max":
                emb = np.where(mask > 0, hidden, -np.inf).max(axis=1)
            else:
                emb = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            if meta["normalize"] or normalize_embeddings:
                emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
            return emb.astype(np.float32)

        if not texts:
            out = np.zeros((0, self.get_embedding_dimension()), np.float32)
        else:
            out = np.stack(self._s.run_sorted(texts, [len(t) for t in texts], batch_size, tokenize, finish))
        if convert_to_tensor:
            import torch

            return torch.from_numpy(out)
        return out


class OnnxCrossEncoder:
    """``predict`` like ``CrossEncoder.predict`` (one label, activation applied), on an exported model."""

    device = "cpu"

    def __init__(self, folder: Path, *, threads: int | None = None, max_length: int | None = None):
        self._s = _Session(folder, threads)
        self.num_labels = self._s.meta["num_labels"]
        self.max_length = max_length or self._s.meta["max_length"]

    def predict(self, pairs: list[tuple[str, str]], batch_size: int = 32, **_: Any) -> np.ndarray:
        tok, sigmoid = self._s.tokenizer, self._s.meta["activation"] == "Sigmoid"

        def tokenize(batch):
            return self._s.feeds(tok([p[0] for p in batch], [p[1] for p in batch], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="np"))

        def finish(logits, _feeds):
            scores = logits[:, 0].astype(np.float32)
            return 1.0 / (1.0 + np.exp(-scores)) if sigmoid else scores

        if not pairs:
            return np.zeros(0, np.float32)
        rows = self._s.run_sorted(pairs, [len(q) + len(d) for q, d in pairs], batch_size, tokenize, finish)
        return np.asarray(rows, dtype=np.float32)


def load(name: str, kind: str, backend: str, *, threads: int | None = None, trust_remote_code: bool = False,
         length: int | None = None):
    """An ``OnnxBiEncoder`` or ``OnnxCrossEncoder`` for ``backend`` ``onnx`` or ``onnx-int8``."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendError(f"backend {backend} needs onnxruntime and onnx: pip install 'batchrank[onnx]' (or use "
                           "backend: torch)") from None
    folder = export(name, kind, quantize=backend == "onnx-int8", trust_remote_code=trust_remote_code)
    if kind == "bi-encoder":
        return OnnxBiEncoder(folder, threads=threads, max_seq_length=length)
    return OnnxCrossEncoder(folder, threads=threads, max_length=length)
