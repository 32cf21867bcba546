"""Sessions for exported models (``pipelines/models/onnx.py`` exports them): ``OnnxBiEncoder.encode`` and
``OnnxCrossEncoder.predict``, batched by padded tokens like the torch backend, run by ONNX Runtime (backends ``onnx``,
``onnx-int8``) or OpenVINO (``openvino``, ``openvino-int8``: the same ONNX graph compiled by OpenVINO's CPU plugin,
or its NNCF int8 model; ``OvSession``).

Example::

    model = OnnxBiEncoder(export("all-MiniLM-L6-v2", "bi-encoder", quantize=True), threads=2)
    vectors = model.encode(["vitamin d and bone density"], normalize_embeddings=True)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def ort_session(path: Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads or os.cpu_count() or 1))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def openvino_precision(dtype: str) -> str:
    """OpenVINO's inference precision for ``dtype``: ``bf16`` where the CPU runs it natively (AMX, AVX-512 BF16)
    and ``dtype`` allows it (``auto``, ``bfloat16``), else ``f32`` (``float32``, and every CPU without it)."""
    from pipelines.models.batching import cpu_supports_bf16

    return "bf16" if dtype in ("auto", "bfloat16") and cpu_supports_bf16() else "f32"


class OvSession:
    """An OpenVINO model compiled for this CPU, run as ONNX Runtime's ``session.run(None, feeds)``: one stream, one
    inference at a time (the batch runner tokenises the next batch meanwhile), ``threads`` threads."""

    def __init__(self, path: Path, threads: int | None, precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        # No pinning: OpenVINO pins its threads to cores from the first one on, unaware of the other actors on the
        # machine, so two 1-thread actors shared one core (measured: the index job at 1.17x torch instead of ~2x)
        config = {"INFERENCE_NUM_THREADS": max(1, int(threads or os.cpu_count() or 1)), "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision, "ENABLE_CPU_PINNING": False}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.precision = precision

    def run(self, _outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # the request reuses its output buffer: the caller gets a copy
        return [np.array(self.request.infer(feeds)[self.output], dtype=np.float32)]


def light_tokenizer(folder: Path):
    """The export's tokenizer as the generic fast tokenizer (``tokenizer.json`` with its special tokens), which
    imports no torch: ``AutoTokenizer`` reads the model's config first, and transformers' config module imports
    torch (~1.3 s of an ONNX actor's start-up; 2 s more with the int8 exporter's import check)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def export_tokenizer(folder: Path, meta: dict):
    """The tokenizer of an export as its sessions load it: the generic fast one where the export found it tokenises
    as ``AutoTokenizer`` does (``meta["tokenizer"]`` ``fast``: no torch), else ``AutoTokenizer``'s."""
    if meta.get("tokenizer") == "fast":
        return light_tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class _Session:
    """A session (ONNX Runtime, or OpenVINO for ``runtime`` ``openvino``), its tokenizer and metadata."""

    def __init__(self, folder: Path, threads: int | None, runtime: str = "onnxruntime", dtype: str = "auto"):
        self.meta = json.loads((folder / "meta.json").read_text())
        self.inputs: list[str] = list(self.meta["inputs"])
        self.tokenizer = export_tokenizer(folder, self.meta)
        if runtime == "openvino":  # an int8 export holds its NNCF model; OpenVINO reads the ONNX graph otherwise
            self.session = OvSession(folder / self.meta.get("openvino_model", "model.onnx"), threads,
                                     openvino_precision(dtype))
        else:
            self.session = ort_session(folder / "model.onnx", threads)

    def runner(self, length: int, token_budget: int, finish, pairs: bool):
        """The batch runner: each chunk of texts (or pairs) tokenised once, its batches padded from the ids."""
        from pipelines.models.batching import CPU_MAX_ROWS, BatchRunner, pad_batch

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"

        def tokenize(items: list):
            texts = ([a for a, _ in items], [b for _, b in items]) if pairs else (list(items),)
            encoded = self.tokenizer(*texts, truncation=True, max_length=length, return_attention_mask=False,
                                     return_token_type_ids="token_type_ids" in self.inputs)
            names = [n for n in ("input_ids", "token_type_ids") if n in encoded]
            rows = [dict(zip(names, values)) for values in zip(*(encoded[n] for n in names))]
            return [len(r["input_ids"]) for r in rows], rows

        def forward(feeds):
            return finish(self.session.run(None, {n: feeds[n] for n in self.inputs})[0], feeds)

        return BatchRunner(tokenize=tokenize, prepare=lambda rows: pad_batch(rows, pad_id, left), forward=forward,
                           token_budget=token_budget, max_rows=CPU_MAX_ROWS)  # these sessions run on the CPU


class OnnxBiEncoder:
    """``encode`` like ``SentenceTransformer.encode`` (numpy out), on an exported model; ``prompts`` and
    ``default_prompt_name`` are the model's."""

    device = "cpu"

    def __init__(self, folder: Path, *, threads: int | None = None, max_seq_length: int | None = None,
                 batch_tokens: int = 4096, runtime: str = "onnxruntime", dtype: str = "auto"):
        self._s = _Session(folder, threads, runtime, dtype)
        self.max_seq_length = max_seq_length or self._s.meta["max_seq_length"]
        self.normalize = bool(self._s.meta["normalize"])
        self.prompts: dict[str, str] = dict(self._s.meta.get("prompts") or {})
        self.default_prompt_name: str | None = self._s.meta.get("default_prompt_name")
        self.runner = self._s.runner(self.max_seq_length, batch_tokens, self._finish, pairs=False)

    def get_embedding_dimension(self) -> int:
        return int(self._s.meta["dim"])

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
               prompt: str | None = None, prompt_name: str | None = None, **_: Any):
        """One float32 row per text. ``prompt`` is prepended to every text; without it, the model's prompt named
        ``prompt_name``, else its default prompt (``SentenceTransformer.encode``'s rule; ``prompt=""`` for none)."""
        from pipelines.models.batching import encode_output

        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts "
                                 f"{sorted(self.prompts)}; pass prompt= or a known name")
            prompt = self.prompts[prompt_name]
        elif prompt is None and self.default_prompt_name is not None:
            prompt = self.prompts.get(self.default_prompt_name)
        if prompt:
            texts = [prompt + text for text in texts]
        self.normalize = bool(self._s.meta["normalize"]) or normalize_embeddings
        return encode_output(self.runner, texts, self.get_embedding_dimension(), convert_to_tensor)


class OnnxCrossEncoder:
    """``predict`` like ``CrossEncoder.predict`` (one label, activation applied, the model's default prompt
    prepended to the query), on an exported model."""

    device = "cpu"

    def __init__(self, folder: Path, *, threads: int | None = None, max_length: int | None = None,
                 batch_tokens: int = 4096, runtime: str = "onnxruntime", dtype: str = "auto"):
        self._s = _Session(folder, threads, runtime, dtype)
        self.prompt: str = self._s.meta.get("prompt") or ""
        self.num_labels = self._s.meta["num_labels"]
        self.max_length = max_length or self._s.meta["max_length"]
        self.sigmoid = self._s.meta["activation"] == "Sigmoid"
        self.runner = self._s.runner(self.max_length, batch_tokens, self._finish, pairs=True)

    def _finish(self, logits, _feeds):
        scores = logits[:, 0].astype(np.float32)
        return 1.0 / (1.0 + np.exp(-scores)) if self.sigmoid else scores

    def predict(self, pairs: list[tuple[str, str]], **_: Any) -> np.ndarray:
        out = self.runner.run([(self.prompt + a, b) for a, b in pairs])
        return np.zeros(0, np.float32) if out is None else out.astype(np.float32)
