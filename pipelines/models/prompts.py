"""Prompts: what queries and passages are prefixed with (``embed.query_prompt`` / ``embed.document_prompt``), and the
passage split checked on the driver before any actor starts.

Reads top to bottom::

    model_prompts     the prompts a loaded bi-encoder declares, and its default prompt's name
    resolve_prompt    a setting (auto, a prompt name, a literal text, null) → the prompt text for queries or documents
    query_prompt      the query prompt for a loaded model, as every query encoder passes it to ``encode(prompt=...)``
    model_files       a model's tokenizer, max_seq_length and prompts from its files alone (no weights loaded)
    check_passages    on the driver: the document prompt and the chunk window for this model, or the refusal that
                      names the setting to change

Example::

    prompt = query_prompt(model, cfg.embed)                 # "query: " for an e5-style model
    model.encode(["vitamin d and bone density"], prompt=prompt)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def model_prompts(model) -> tuple[dict[str, str], str | None]:
    """The prompts a loaded bi-encoder declares (``{name: text}``) and its default prompt's name."""
    inner = getattr(model, "model", model)  # TokenBatchedBiEncoder wraps a SentenceTransformer
    return dict(getattr(inner, "prompts", None) or {}), getattr(inner, "default_prompt_name", None)


def model_tokenizer(model):
    """The tokenizer of a loaded bi-encoder (plain, token-batched or ONNX)."""
    for holder in (model, getattr(model, "model", None), getattr(model, "_s", None)):
        tok = getattr(holder, "tokenizer", None)
        if tok is not None:
            return tok
    raise ValueError(f"cannot find the tokenizer of {type(model).__name__}")


_AUTO_PROMPTS = {"query": ("query",), "document": ("document", "passage", "corpus")}


def resolve_prompt(setting: str | None, model, kind: str, *, key: str = "", name: str = "") -> str:
    """The prompt text for ``kind`` (``query`` or ``document``) from ``embed.query_prompt`` /
    ``embed.document_prompt``: ``auto`` picks the model's own prompt as ``encode_query`` / ``encode_document`` do
    (else its default prompt), a name of one of the model's prompts gives that prompt, null or '' none, and any other
    text is the literal prompt. Returns '' for none (pass it as ``encode(..., prompt=...)``). A bare word that is not
    one of the model's prompt names is refused (a typo would otherwise be prepended to every text)."""
    import re

    prompts, default = model_prompts(model)
    if not setting:
        return ""
    if setting == "auto":
        for candidate in _AUTO_PROMPTS[kind]:
            if candidate in prompts:
                return prompts[candidate] or ""
        return (prompts.get(default) or "") if default else ""
    if setting in prompts:
        return prompts[setting]
    if re.fullmatch(r"[A-Za-z_][\w-]*", setting):
        have = ", ".join(sorted(prompts)) or "none"
        raise ValueError(f"{key or kind + ' prompt'} is '{setting}', which is not a prompt of bi-encoder '{name}' "
                         f"(its prompts: {have}); give one of those names, the literal text (e.g. '{setting}: '), "
                         "auto, or null")
    return setting


def query_prompt(model, embed_cfg) -> str:
    """The query prompt (``embed.query_prompt`` resolved for the loaded bi-encoder ``model``): pass it as
    ``model.encode(queries, prompt=...)`` wherever queries are embedded."""
    return resolve_prompt(embed_cfg.query_prompt, model, "query", key="embed.query_prompt", name=embed_cfg.model)


def model_files(name: str, backend: str = "torch") -> tuple[Any, int | None, dict[str, str], str | None] | None:
    """(fast tokenizer, max_seq_length, prompts, default prompt name) of a sentence-transformers model from its files
    (a local folder, a packaged model, or the hub cache), without loading its weights; None when they cannot be
    read here (the embedding actors then check the same as they load the model). With an ONNX or OpenVINO
    ``backend`` whose export is cached, the tokenizer is the export's, loaded without torch as its actors load it
    (checked at export to tokenise as AutoTokenizer does); else AutoTokenizer's, which imports torch (~1.3 s)."""
    from pipelines.models.names import resolve_model

    path = resolve_model(name)
    try:
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, local_files_only=True)
        tokenizer = _export_tokenizer(name, backend)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - not readable here: the actors load the model and check it
        log.debug("model files of %s not readable on the driver: %s", name, exc)
        return None
    st = _json(os.path.join(path, "sentence_bert_config.json"))
    cfg = _json(os.path.join(path, "config_sentence_transformers.json"))
    return tokenizer, st.get("max_seq_length"), dict(cfg.get("prompts") or {}), cfg.get("default_prompt_name")


def _export_tokenizer(name: str, backend: str):
    """The tokenizer of ``name``'s cached ``backend`` export, as its actors load it (checked at export to tokenise as
    the model's AutoTokenizer does); None for the torch backend or when there is no export yet."""
    if backend == "torch":
        return None
    try:
        from pipelines.models.onnx import cached_export
        from pipelines.models.onnx_runtime import export_tokenizer

        folder = cached_export(name, "bi-encoder", backend)
        return None if folder is None else export_tokenizer(folder, _json(os.path.join(folder, "meta.json")))
    except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime not installed: AutoTokenizer then
        log.debug("no export tokenizer for %s (%s): %s", name, backend, exc)
        return None


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


class _Declared:
    """A model's declared prompts, shaped like a loaded model for ``resolve_prompt``."""

    def __init__(self, prompts: dict[str, str], default_prompt_name: str | None):
        self.prompts, self.default_prompt_name = prompts, default_prompt_name


def check_passages(cfg) -> dict[str, Any] | None:
    """On the driver, before Ray starts any actor: resolve the document and query prompts and build the chunker for
    ``embed.model`` from its files, so that a prompt name the model lacks or a chunk window it cannot read is refused
    at once (``ValueError`` / ``ChunkError`` naming the fix). Returns what the run will do, for the report; None
    when the model's files are not readable here."""
    from pipelines.index.chunk import Chunker

    e = cfg.embed
    found = model_files(e.model, e.backend)
    if found is None:
        return None
    tokenizer, length, prompts, default = found
    declared = _Declared(prompts, default)
    document = resolve_prompt(e.document_prompt, declared, "document", key="embed.document_prompt", name=e.model)
    query = resolve_prompt(e.query_prompt, declared, "query", key="embed.query_prompt", name=e.model)
    length = e.max_seq_length or length or getattr(tokenizer, "model_max_length", None)
    if not length or length > 1_000_000:  # a tokenizer without a real maximum
        return None
    chunker = Chunker.from_model(tokenizer, cfg.chunk, max_seq_length=length, prompt=document, model=e.model,
                                 fields=tuple(e.input_fields), separator=e.separator)
    return {**chunker.describe(), "max_seq_length": length, "document_prompt": document, "query_prompt": query}


def query_prompt_warning(cfg, built_settings: str | None) -> str | None:
    """The warning for a query prompt other than the one the passages were built with (``built_settings``: their
    ``passage_settings``); None when they agree or the table does not say."""
    from pipelines.config.index import built_query_prompt

    built = built_query_prompt(built_settings)
    if built == "unknown" or built == (cfg.embed.query_prompt or None):
        return None
    return (f"embed.query_prompt is {cfg.embed.query_prompt!r}, but {cfg.storage.passages_table} was built with "
            f"{built!r}: queries may be embedded unlike the passages expect; set it back, or reindex")
