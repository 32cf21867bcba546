"""Embed stage: a sentence-transformers bi-encoder, loaded once per actor, and the documents' passages.

``__call__`` maps a validated Arrow batch of documents to the same batch plus, per document, its passages
(``pipelines/index/chunk.py``: character spans ``_spans_start`` / ``_spans_end``) and a ``vector`` column holding one
vector per passage (a list of fixed-size lists of float32, unit length when ``normalize``), each passage embedded
with the document prompt (``embed.document_prompt``). The sink turns each document into its passage rows. A
document with nothing to embed is marked bad (``empty_after_tokenizing``) for the quarantine. Rows already marked bad
pass through with a null vector so that the sink can quarantine them, and so do a change
feed's delete markers and the rows a killed run already staged (their input is null).
(Unchanged documents never get here: the index job plans first and sends only new and
changed rows.) The same class embeds small deltas on the driver.

Example (no Ray needed)::

    stage = Embedder("all-MiniLM-L6-v2", batch_size=16)   # or Embedder.from_config(cfg, device="cpu", ...)
    out = stage(validated_table)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S
from pipelines.faults import maybe_fail, record


class Embedder:
    """Stateful Ray Data stage: ``map_batches(Embedder, compute=ActorPoolStrategy(size=n), ...)``."""

    def __init__(self, model: str, *, batch_size: int = 16, device: str = "auto", dtype: str = "auto",
                 max_seq_length: int | None = None, normalize: bool = True, trust_remote_code: bool = False,
                 num_threads: float | None = None, backend: str = "torch", batch_tokens: int | None = 0,
                 document_prompt: str | None = "auto", chunk=None, input_fields: tuple[str, ...] = ("title", "text"),
                 separator: str = " "):
        from pipelines.cluster.runtime import node_label
        from pipelines.config import ChunkConfig
        from pipelines.index.chunk import Chunker
        from pipelines.models import configure_threads, load_bi_encoder
        from pipelines.models.prompts import model_tokenizer, resolve_prompt

        if backend == "torch":
            import torch  # noqa: F401 - so that configure_threads sizes its pool

        configure_threads(num_threads)
        # batch_tokens 0: the device's token budget; None: batches of batch_size rows (sentence-transformers' encode)
        self.model = load_bi_encoder(model, device=device, dtype=dtype, max_seq_length=max_seq_length,
                                     trust_remote_code=trust_remote_code, backend=backend, threads=num_threads,
                                     batch_tokens=batch_tokens)
        self.batch_size = batch_size
        self.normalize = normalize
        self.dim = self.model.get_embedding_dimension()
        self.node = node_label()
        self.prompt = resolve_prompt(document_prompt, self.model, "document", key="embed.document_prompt", name=model)
        length = getattr(self.model, "max_seq_length", None) or max_seq_length
        self.chunker = Chunker.from_model(model_tokenizer(self.model), chunk or ChunkConfig(), max_seq_length=length,
                                          prompt=self.prompt, model=model, fields=tuple(input_fields),
                                          separator=separator)

    @staticmethod
    def config_kwargs(cfg, *, device: str, num_threads: float | None) -> dict[str, Any]:
        """The constructor's keywords from the config (the ``embed`` and ``chunk`` sections): what an actor pool's
        ``fn_constructor_kwargs`` takes (plain values, cheap to pickle). ``device`` and ``num_threads`` depend on
        where the stage runs (an actor's GPUs and CPUs, or the driver's)."""
        e = cfg.embed
        return dict(model=e.model, batch_size=e.batch_size, device=device, dtype=e.dtype,
                    max_seq_length=e.max_seq_length, normalize=e.normalize, trust_remote_code=e.trust_remote_code,
                    num_threads=num_threads, backend=e.backend, batch_tokens=e.batch_tokens,
                    document_prompt=e.document_prompt, chunk=cfg.chunk, input_fields=tuple(e.input_fields),
                    separator=e.separator)

    @classmethod
    def from_config(cls, cfg, *, device: str, num_threads: float | None) -> Embedder:
        """The stage built from the config, e.g. ``Embedder.from_config(cfg, device="cpu", num_threads=2)``."""
        return cls(**cls.config_kwargs(cfg, device=device, num_threads=num_threads))

    def encode(self, texts: list[str]) -> np.ndarray:
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, prompt=self.prompt,
                                normalize_embeddings=self.normalize, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        valid = pc.is_null(batch[S.REASON_CODE]).to_numpy(zero_copy_only=False)
        todo = valid & ~pc.fill_null(batch[S.DELETED], False).to_numpy(zero_copy_only=False)
        todo &= pc.is_valid(batch[S.EMBED_INPUT]).to_numpy(zero_copy_only=False)  # null: staged by a killed run
        maybe_fail("embed_call")
        rows = np.flatnonzero(todo)
        spans, inputs, empty = self.chunker.split(batch[S.TITLE].take(pa.array(rows, pa.int64())).to_pylist(),
                                                  batch[S.TEXT].take(pa.array(rows, pa.int64())).to_pylist())
        flat_inputs = [t for doc in inputs for t in doc]
        flat = self.encode(flat_inputs) if flat_inputs else np.zeros((0, self.dim), np.float32)
        if flat_inputs:
            record("embed", len(flat_inputs))
        per_doc: list = [None] * len(batch)
        starts: list = [None] * len(batch)
        ends: list = [None] * len(batch)
        at = 0
        for row, cuts in zip(rows, spans):
            per_doc[row] = flat[at:at + len(cuts)]
            starts[row], ends[row] = [a for a, _ in cuts], [b for _, b in cuts]
            at += len(cuts)
        if empty:
            batch = _mark_bad(batch, {int(rows[i]): reason for i, reason in empty.items()})
            for i in empty:
                per_doc[rows[i]] = starts[rows[i]] = ends[rows[i]] = None
        vectors = _list_of_vectors(per_doc, self.dim)
        seconds = (time.perf_counter() - start) / max(len(batch), 1)
        out = batch.drop_columns([S.EMBED_INPUT, S.SECONDS])
        out = out.append_column(S.SPANS_START, pa.array(starts, pa.list_(pa.int64())))
        out = out.append_column(S.SPANS_END, pa.array(ends, pa.list_(pa.int64())))
        out = out.append_column(S.VECTOR, vectors)
        out = out.append_column(S.SECONDS, pa.array(batch[S.SECONDS].to_numpy() + seconds))
        return out.append_column(S.NODE, pa.array([self.node] * len(batch), pa.string()))


def _list_of_vectors(per_doc: list, dim: int) -> pa.Array:
    """Per document its passages' vectors (None for a document not embedded) as list<fixed_size_list<float32>>,
    built from one flat buffer (no per-vector Python objects)."""
    lengths = np.array([0 if v is None else len(v) for v in per_doc], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [v for v in per_doc if v is not None and len(v)]
    flat = np.concatenate(present).astype(np.float32).ravel() if present else np.zeros(0, np.float32)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
    mask = pa.array([v is None for v in per_doc], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def _mark_bad(batch: pa.Table, bad: dict[int, str]) -> pa.Table:
    """Rows ``bad`` ({row: reason}) marked for the quarantine (``empty_after_tokenizing``), with their raw input."""
    import json

    codes, reasons, raws = (batch[c].to_pylist() for c in (S.REASON_CODE, S.REASON, S.RAW))
    ids, titles, texts = (batch[c].to_pylist() for c in (S.ID, S.TITLE, S.TEXT))
    for row, reason in bad.items():
        codes[row], reasons[row] = "empty_after_tokenizing", reason
        raws[row] = json.dumps({"id": ids[row], "title": titles[row], "text": texts[row]}, ensure_ascii=False)[:4096]
    for name, values in ((S.REASON_CODE, codes), (S.REASON, reasons), (S.RAW, raws)):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return batch
