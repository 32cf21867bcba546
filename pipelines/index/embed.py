"""Embed stage: a sentence-transformers bi-encoder, loaded once per actor.

``__call__`` maps a validated Arrow batch to the same batch plus a ``vector`` column
(fixed-size list of float32, unit length when ``normalize``). Rows already marked bad
pass through with a null vector so that the sink can quarantine them, and so do a change
feed's delete markers and the rows a killed run already staged (their input is null).
(Unchanged documents never get here: the index job plans first and sends only new and
changed rows.) The same class embeds small deltas on the driver.

Example (no Ray needed)::

    stage = Embedder("all-MiniLM-L6-v2", batch_size=16)   # or Embedder.from_config(cfg.embed, device="cpu", ...)
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
                 num_threads: float | None = None, backend: str = "torch", batch_tokens: int | None = 0):
        from pipelines.cluster.runtime import node_label
        from pipelines.models import configure_threads, load_bi_encoder

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

    @staticmethod
    def config_kwargs(embed_cfg, *, device: str, num_threads: float | None) -> dict[str, Any]:
        """The constructor's keywords from the ``embed`` config section: what an actor pool's
        ``fn_constructor_kwargs`` takes (plain values, cheap to pickle). ``device`` and ``num_threads`` depend on
        where the stage runs (an actor's GPUs and CPUs, or the driver's)."""
        e = embed_cfg
        return dict(model=e.model, batch_size=e.batch_size, device=device, dtype=e.dtype,
                    max_seq_length=e.max_seq_length, normalize=e.normalize, trust_remote_code=e.trust_remote_code,
                    num_threads=num_threads, backend=e.backend, batch_tokens=e.batch_tokens)

    @classmethod
    def from_config(cls, embed_cfg, *, device: str, num_threads: float | None) -> Embedder:
        """The stage built from the ``embed`` config section, e.g.
        ``Embedder.from_config(cfg.embed, device=cfg.embed.device, num_threads=os.cpu_count())``."""
        return cls(**cls.config_kwargs(embed_cfg, device=device, num_threads=num_threads))

    def encode(self, texts: list[str]) -> np.ndarray:
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=self.normalize, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        valid = pc.is_null(batch[S.REASON_CODE]).to_numpy(zero_copy_only=False)
        todo = valid & ~pc.fill_null(batch[S.DELETED], False).to_numpy(zero_copy_only=False)
        todo &= pc.is_valid(batch[S.EMBED_INPUT]).to_numpy(zero_copy_only=False)  # null: staged by a killed run
        maybe_fail("embed_call")
        texts = batch[S.EMBED_INPUT].filter(pa.array(todo)).to_pylist()
        flat = np.zeros((len(batch), self.dim), dtype=np.float32)
        if texts:
            flat[todo] = self.encode(texts)
            record("embed", len(texts))
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), self.dim, mask=pa.array(~todo))
        seconds = (time.perf_counter() - start) / max(len(batch), 1)
        out = batch.drop_columns([S.EMBED_INPUT, S.SECONDS])
        out = out.append_column(S.VECTOR, vectors)
        out = out.append_column(S.SECONDS, pa.array(batch[S.SECONDS].to_numpy() + seconds))
        return out.append_column(S.NODE, pa.array([self.node] * len(batch), pa.string()))
