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
* ``openvino``: the same fp32 graph, compiled by OpenVINO's CPU plugin (bf16 inference where the CPU runs it
  natively and ``dtype`` allows it, else f32); ``openvino-int8``: NNCF's static int8 quantisation of that graph
  (``model_type=TRANSFORMER``: SmoothQuant, the attention's softmax kept in float), calibrated on
  ``openvino_int8.calibration_texts()`` (general English of every length the model reads), saved as OpenVINO IR in
  the export;
* pooling (mean, CLS or max, from the model's Pooling module), normalisation and the cross-encoder's
  activation (sigmoid for one label, as ``CrossEncoder.predict``) stay in numpy, exactly as configured.

Exports are cached under ``$BATCHRANK_CACHE`` (default ``~/.cache/batchrank``)/onnx, keyed by the model's files,
the kind, the quantisation, the library versions and ``FORMAT``; a new folder appears atomically (concurrent actors
on one machine export at most a few times, and never read a half-written model). An int8 export is the cached fp32
export, quantised.

Each export is checked before it is kept: the graph's inputs are the ones the model reads (ModernBERT takes no
``token_type_ids``, DeBERTa-v3 ignores them: the exporter drops an input no node reads, so the session is fed its
graph's inputs only), the tokenizer saved with it tokenises as the model's own, and the graph gives torch's outputs
on inputs of another batch size and length than the one it was traced with. A model that fails any of this, or is
not Transformer → Pooling (→ Normalize), is refused when it is loaded, with a ``BackendError`` naming the model, the
backend and the fix (the torch backend).

Prompts: the bi-encoder keeps the model's ``prompts`` and ``default_prompt_name`` and prepends them in ``encode``
as ``SentenceTransformer.encode`` does; a Pooling that leaves prompt tokens out (``include_prompt=False``, as
Instructor models) is refused, since the graph pools every token.

The sessions (``OnnxBiEncoder``, ``OnnxCrossEncoder``) live in ``onnx_runtime.py``. Batching is
``pipelines.models.batching.BatchRunner``'s: by padded tokens, the next batch tokenised in a thread while
ONNX Runtime runs the current one (it releases the GIL), so the model does not wait for the tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.models.onnx_runtime import (  # the runtime side
    OnnxBiEncoder,
    OnnxCrossEncoder,
    light_tokenizer,
    ort_session,
)

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8")
# each backend's export: the fp32 graph, ONNX Runtime's dynamic int8, NNCF's static int8 for OpenVINO
VARIANTS = {"onnx": "fp32", "onnx-int8": "int8", "openvino": "fp32", "openvino-int8": "ov-int8"}
OPSET = 17
FORMAT = 4  # the export's files and meta; bump on any change so that older cached exports are made again
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CHECK_TOKENS = 256  # the export check's longest input, whatever the model's own limit


class BackendError(ValueError):
    """A model the ONNX backend cannot run; the message names the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("BATCHRANK_CACHE", "~/.cache/batchrank")).expanduser() / "onnx"


def _fingerprint(name: str, kind: str, variant: str) -> str:
    from importlib.metadata import version  # not imports: an actor with a cached export never loads torch

    parts = [name, kind, variant, OPSET, FORMAT, version("onnxruntime"), version("torch"), version("transformers")]
    if variant == "ov-int8":
        from pipelines.models.openvino_int8 import CALIBRATION_VERSION

        parts += [version("openvino"), version("nncf"), CALIBRATION_VERSION]
    h = hashlib.sha256(json.dumps(parts).encode())
    root = Path(name)
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file() and "onnx" not in p.parts:
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def export(name: str, kind: str, *, quantize: bool = False, trust_remote_code: bool = False,
           variant: str | None = None) -> Path:
    """The cached export folder of model ``name`` (``kind``: ``bi-encoder`` or ``cross-encoder``), made if needed.
    ``variant``: ``fp32``; ``int8`` (ONNX Runtime's dynamic int8; also ``quantize=True``); ``ov-int8`` (NNCF's
    static int8, for OpenVINO). Each int8 export is the cached fp32 export, quantised. ``BackendError`` when the
    model cannot run on these backends."""
    from pipelines.models.names import resolve_model

    variant = variant or ("int8" if quantize else "fp32")
    resolved = resolve_model(name)
    refuse = _refusal(name, kind, next(b for b, v in VARIANTS.items() if v == variant))
    exporter = _export_bi_encoder if kind == "bi-encoder" else _export_cross_encoder

    def fp32(work: Path) -> dict[str, Any]:
        return exporter(resolved, work, trust_remote_code, refuse)

    def int8(work: Path) -> dict[str, Any]:
        shutil.copytree(_cached(name, kind, resolved, "fp32", fp32), work, dirs_exist_ok=True)
        meta = json.loads((work / "meta.json").read_text())
        if variant == "ov-int8":
            from pipelines.models.openvino_int8 import quantize_openvino

            meta.update(quantize_openvino(work, meta, kind, refuse))
        else:
            _quantize(work / "model.onnx")
        return meta

    return _cached(name, kind, resolved, variant, fp32 if variant == "fp32" else int8)


def cached_export(name: str, kind: str, backend: str) -> Path | None:
    """The cached export folder ``backend`` would load for model ``name``, or None when it is not made yet (nothing
    is exported here, and neither torch nor the exporters are imported)."""
    from pipelines.models.names import resolve_model

    if backend not in VARIANTS:
        return None
    target = _target(name, kind, resolve_model(name), VARIANTS[backend])
    return target if (target / "meta.json").is_file() else None


def _target(name: str, kind: str, resolved: str, variant: str) -> Path:
    return cache_root() / f"{Path(str(name)).name}-{kind}-{variant}-{_fingerprint(resolved, kind, variant)}"


def _cached(name: str, kind: str, resolved: str, variant: str, make) -> Path:
    """The cache folder of one export, made by ``make(work_folder) -> meta`` when missing, atomically."""
    target = _target(name, kind, resolved, variant)
    if (target / "meta.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        meta = make(work)
        meta.update(quantized=variant != "fp32", variant=variant, source=str(name))
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(work, target)  # atomic: another process may have won; its export is as good
        except OSError:
            pass
        log.info("exported %s (%s, %s) to %s", name, kind, variant, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _refusal(name: str, kind: str, backend: str):
    key = "embed.backend" if kind == "bi-encoder" else "rerank.backend"

    def refuse(why: str) -> BackendError:
        return BackendError(f"{key} {backend} cannot run '{name}': {why}; use {key}: torch")

    return refuse


def _onnx_export(model, sample: dict, path: Path, output: str) -> None:
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
    # The tracer's notes on this export are known and harmless: the branches it freezes compare the attention mask's
    # length with the sequence length, equal for every input this graph is given (the mask comes with its input ids),
    # and the advanced indexing it warns about gets no negative index; ``_export_checked`` then runs the graph on
    # inputs of another shape against the torch model.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        # DeBERTa-v2 wraps its head size (a constant) in torch.tensor while tracing
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        torch.onnx.export(Wrapped(model), tuple(sample[n] for n in names), str(path), input_names=names,
                          output_names=[output], opset_version=OPSET, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, output: {0: "batch"}})


# Inputs of another batch size and length than the traced sample (``a sample``...), with capitals, punctuation,
# digits, an accent and a text longer than ``CHECK_TOKENS`` (truncated).
_LONG = " ".join(f"Word{i} about the study of cells, brains and genes." for i in range(40))
CHECK_TEXTS = (["The Cell protein binding, in 2024: café!", _LONG, "a"],)
CHECK_PAIRS = (["What binds the Cell protein?", "brain", "a"], [_LONG, "The Brain data, in 2024: café!", "b"])


def _export_checked(model, tok, sample: tuple, check: tuple, work: Path, output: str, refuse,
                    max_length: int | None) -> dict[str, Any]:
    """Export ``model`` traced on ``tok(*sample)`` to ``work``/model.onnx with ``tok`` beside it, and check it; the
    meta of the graph's input names (``inputs``) and of how a session loads the tokenizer (``tokenizer``, see
    ``light_tokenizer``). ``BackendError`` (from ``refuse``) when it does not export, or the export's tokenizer or
    graph give other inputs or outputs than the model's own on ``tok(*check)``."""
    import inspect

    import torch
    from transformers import AutoTokenizer

    arch = type(model).__name__
    params = inspect.signature(model.forward).parameters
    encoded = tok(*sample, padding=True, return_tensors="pt")
    names = [n for n in MODEL_INPUTS if n in encoded and n in params]  # ModernBERT takes no token_type_ids
    if names[:2] != ["input_ids", "attention_mask"]:
        raise refuse(f"its {arch} does not take input_ids and attention_mask")
    try:
        _onnx_export(model, {n: encoded[n] for n in names}, work / "model.onnx", output)
    except Exception as exc:  # noqa: BLE001 - any tracer or exporter failure means: this model needs torch
        raise refuse(f"its {arch} does not export to ONNX ({_first_line(exc)})") from exc
    tok.save_pretrained(str(work))
    session = ort_session(work / "model.onnx", threads=None)
    inputs = [i.name for i in session.get_inputs()]  # an input the graph does not read is dropped by the exporter
    length = min(max_length or CHECK_TOKENS, CHECK_TOKENS)
    kwargs = dict(padding=True, truncation=True, max_length=length)
    want = tok(*check, return_tensors="pt", **kwargs)  # as the model's own tokenizer gives them
    saved = AutoTokenizer.from_pretrained(str(work))
    got = saved(*check, return_tensors="np", **kwargs, return_token_type_ids="token_type_ids" in inputs)
    if any(n in want and not np.array_equal(got[n], want[n].numpy()) for n in {*inputs, "attention_mask"}):
        raise refuse(f"the tokenizer saved with its export ({type(tok).__name__}) tokenises otherwise than the model's")
    loader = "fast" if _same_without_torch(work, saved, check, inputs, kwargs, got) else "auto"
    with torch.inference_mode():  # eval again: the exporter puts back the mode it found (train, fresh from loading)
        ref = getattr(model.eval()(**{n: want[n] for n in names if n in want}), output).float().numpy()
    try:
        out = session.run(None, {n: got[n].astype(np.int64) for n in inputs})[0]
    except Exception as exc:  # noqa: BLE001 - e.g. a shape the tracer froze
        raise refuse(f"its ONNX graph ({arch}) fails on inputs of another shape than the traced sample "
                     f"({_first_line(exc)})") from exc
    real = want["attention_mask"].numpy().astype(bool) if output == "last_hidden_state" else slice(None)
    err = float(np.abs(out[real] - ref[real]).max()) if out.shape == ref.shape else float("inf")
    if not err <= 1e-3 * max(1.0, float(np.abs(ref[real]).max())):  # fp32 rounding is ~1e-6
        raise refuse(f"its ONNX graph ({arch}) gives other outputs than torch (max difference {err:.3g}) on inputs of "
                     "another shape than the traced sample")
    return {"inputs": inputs, "tokenizer": loader}


def _same_without_torch(work: Path, auto, check: tuple, inputs: list[str], kwargs: dict, got) -> bool:
    """Whether the export's tokenizer, loaded as the generic fast tokenizer (``light_tokenizer``: no torch), gives
    what ``AutoTokenizer`` (``auto``) gives (``got``) on the check texts, their character offsets (the chunker's)
    and its special tokens and padding alike."""
    try:
        light = light_tokenizer(work)
        mine = light(*check, return_tensors="np", **kwargs, return_token_type_ids="token_type_ids" in inputs)
        if any(not np.array_equal(mine[n], got[n]) for n in {*inputs, "attention_mask"}):
            return False
        plain = {"add_special_tokens": False, "return_offsets_mapping": True, "truncation": False, "verbose": False}
        if len(check) == 1 and light(*check, **plain)["offset_mapping"] != auto(*check, **plain)["offset_mapping"]:
            return False
        same = ("pad_token_id", "padding_side", "truncation_side", "is_fast")
        return (all(getattr(light, a, None) == getattr(auto, a, None) for a in same)
                and light.num_special_tokens_to_add(pair=False) == auto.num_special_tokens_to_add(pair=False))
    except Exception as exc:  # noqa: BLE001 - e.g. no tokenizer.json: sessions load it with AutoTokenizer
        log.debug("the export's tokenizer does not load as a generic fast tokenizer: %s", exc)
        return False


def _export_bi_encoder(resolved: str, work: Path, trust_remote_code: bool, refuse) -> dict[str, Any]:
    from pipelines.models.st_import import sentence_transformers

    st = sentence_transformers().SentenceTransformer(resolved, device="cpu", trust_remote_code=trust_remote_code)
    modules = list(st)
    kinds = [type(m).__name__ for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise refuse(f"the ONNX backend runs Transformer → Pooling (→ Normalize) models, and this one is "
                     f"{' → '.join(kinds)}")
    pooling = getattr(modules[1], "pooling_mode", None)
    if pooling not in ("mean", "cls", "max"):
        raise refuse(f"the ONNX backend pools by mean, cls or max, not {pooling!r}")
    if not getattr(modules[1], "include_prompt", True):
        raise refuse("its Pooling leaves prompt tokens out (include_prompt=False), and the ONNX graph would pool "
                     "them with the text")
    checked = _export_checked(modules[0].auto_model, st.tokenizer, (["a sample", "another sample text"],),
                              CHECK_TEXTS, work, "last_hidden_state", refuse, st.max_seq_length)
    return {"kind": "bi-encoder", **checked, "pooling": pooling, "normalize": len(modules) > 2,
            "max_seq_length": st.max_seq_length, "dim": st.get_embedding_dimension(), "prompts": dict(st.prompts),
            "default_prompt_name": st.default_prompt_name}


def _export_cross_encoder(resolved: str, work: Path, trust_remote_code: bool, refuse) -> dict[str, Any]:
    from pipelines.models.st_import import sentence_transformers

    ce = sentence_transformers().CrossEncoder(resolved, device="cpu", trust_remote_code=trust_remote_code)
    if ce.num_labels != 1:  # before the export: the torch backend refuses it too
        raise ValueError(f"cross-encoder '{resolved}' has {ce.num_labels} labels; reranking needs one relevance "
                         "score per pair (num_labels=1): use a reranker model, or train one with "
                         "`batchrank train-reranker`")
    activation = type(ce.activation_fn).__name__
    if activation not in ("Sigmoid", "Identity"):
        raise refuse(f"the ONNX backend applies a Sigmoid or Identity activation, not {activation}")
    checked = _export_checked(ce.model, ce.tokenizer, (["a query", "q"], ["a document", "another document text"]),
                              CHECK_PAIRS, work, "logits", refuse, ce.max_seq_length)
    name = getattr(ce, "default_prompt_name", None)  # CrossEncoder.predict prepends it to the query
    return {"kind": "cross-encoder", **checked, "activation": activation, "num_labels": ce.num_labels,
            "max_length": ce.max_seq_length, "prompt": (getattr(ce, "prompts", None) or {}).get(name) if name else None}


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


def load(name: str, kind: str, backend: str, *, threads: int | None = None, trust_remote_code: bool = False,
         length: int | None = None, batch_tokens: int = 4096, dtype: str = "auto"):
    """An ``OnnxBiEncoder`` or ``OnnxCrossEncoder`` for ``backend`` ``onnx``, ``onnx-int8``, ``openvino`` or
    ``openvino-int8`` (``dtype``: OpenVINO's inference precision, ``openvino_precision``)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendError(f"backend {backend} needs onnxruntime and onnx: pip install 'batchrank[onnx]' (or use "
                           "backend: torch)") from None
    runtime = "openvino" if backend.startswith("openvino") else "onnxruntime"
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
            # found, not imported: NNCF (2 s, and torch under it) is only needed to make the int8 export
            if backend == "openvino-int8" and importlib.util.find_spec("nncf") is None:
                raise ImportError("nncf")
        except ImportError:
            raise BackendError(f"backend {backend} needs openvino (and nncf for int8): pip install "
                               "'batchrank[openvino]' (or use backend: torch)") from None
    folder = export(name, kind, variant=VARIANTS[backend], trust_remote_code=trust_remote_code)
    if kind == "bi-encoder":
        return OnnxBiEncoder(folder, threads=threads, max_seq_length=length, batch_tokens=batch_tokens,
                             runtime=runtime, dtype=dtype)
    return OnnxCrossEncoder(folder, threads=threads, max_length=length, batch_tokens=batch_tokens, runtime=runtime,
                            dtype=dtype)
