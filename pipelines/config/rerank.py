"""The sections of the rerank side: the query log and its normalisation, candidate retrieval, the cross-encoder
and the fusion of its score with the first stage's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipelines.config.base import Actors, CpusPerActor, GpusPerActor, Lax, ModelStage, PooledStage, _Section


class NormalizeConfig(_Section):
    """How query text is normalised before counting and lookup (the same rules at both ends)."""

    unicode: Literal["NFKC", "NFC", "none"] = "NFKC"
    casefold: bool = True
    collapse_whitespace: bool = True


class QueryLogConfig(_Section):
    path: str | list[str] = Field(..., description="query log file, folder, glob or URI (or a list of them)")
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    text_field: str = "query"
    time_field: str = "timestamp"
    count_field: str | None = Field(None, description="a field holding how many times the line counts (pre-aggregated logs)")
    since: Annotated[datetime, Lax] | None = Field(None, description="keep lines at or after this time "
                                                                    "(naive = UTC)")
    until: Annotated[datetime, Lax] | None = Field(None, description="keep lines before this time (naive = UTC)")
    last_days: float | None = Field(None, gt=0, description="keep the last N days before `until` (default: now)")
    min_count: int = Field(1, ge=1)
    head: int | None = Field(None, gt=0, description="keep only the N most frequent queries")
    max_query_chars: int = Field(1000, gt=0)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    quarantine_raw: Literal["fields", "full"] = Field(
        "fields", description="what the quarantine keeps of a bad line: only the query, time and count fields "
                              "(fields; logs hold personal data), or the whole line (full)")

    @model_validator(mode="after")
    def _window(self) -> QueryLogConfig:
        if self.since is not None and self.last_days is not None:
            raise ValueError("set either since or last_days, not both")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                setattr(self, name, value.replace(tzinfo=UTC))
        if self.since and self.until and self.since >= self.until:
            raise ValueError(f"since ({self.since.isoformat()}) must be before until ({self.until.isoformat()})")
        return self


CandidateSource = Literal["vector", "fts", "hybrid"]


class RetrieveConfig(PooledStage, _Section):
    k: int = Field(100, gt=0, le=10_000, description="candidates per query")
    source: CandidateSource = Field("vector", description="vector (bi-encoder), fts (BM25) or hybrid (both, "
                                                          "fused as hybrid_fusion says)")
    hybrid_fusion: Literal["convex", "rrf"] = Field(
        "convex", description="hybrid: convex (vector_weight x min-max scaled cosine + (1 - vector_weight) x min-max "
                              "scaled BM25, each over the query's hits) or rrf (reciprocal rank, rrf_k); convex was "
                              "better on SciFact's train claims (benchmarks/passages_scifact.py)")
    vector_weight: float = Field(0.5, ge=0, le=1, description="hybrid_fusion convex: the vector list's weight")
    rrf_k: int = Field(60, gt=0, description="hybrid_fusion rrf: 1 / (rrf_k + rank)")
    exact: Literal["auto", "lance_flat"] | Annotated[bool, Lax] = Field(
        "auto", description="auto: exact search as an in-memory matrix product (pipelines/rerank/exact_search.py) while the "
                            "vectors fit exact_max_bytes and, with an ANN index, rows <= exact_max_rows, else ANN "
                            "(LanceDB's flat scan without an index); true: always exact (the matrix product, LanceDB's "
                            "flat scan past exact_max_bytes); false: never (ANN; LanceDB scans without an index); "
                            "lance_flat: LanceDB's flat scan")
    exact_max_rows: int = Field(500_000, gt=0, description="auto: above this many passages (and with an ANN index) "
                                                           "ANN search runs; the crossover measured by "
                                                           "benchmarks/retrieval_crossover.py")
    exact_max_bytes: int = Field(2 << 30, gt=0, description="auto/true: the matrix product only when the passages' "
                                                             "vectors (rows x dim x 4 bytes) fit; each retrieve actor "
                                                             "holds one copy (in GPU memory on a GPU)")
    level: Literal["document", "passage"] = Field(
        "document", description="document: candidates are documents, each scored by its best passage (the max "
                                "over its passages' hits; k counts documents), and the cross-encoder reads that "
                                "passage; passage: candidates are passages (a document may appear more than once)")
    passage_hits: int = Field(4, gt=0, le=64, description="document level: passages fetched per wanted document "
                                                          "on the first try (k x passage_hits); a query whose hits "
                                                          "hold fewer than k documents is searched again deeper")
    queries_per_call: int = Field(256, gt=0, description="queries embedded and searched per batch")
    search_threads: int = Field(4, gt=0, description="concurrent searches per retrieve actor")
    actors: Actors = 1
    cpus_per_actor: CpusPerActor = 0.5
    gpus_per_actor: GpusPerActor = 0.0


class FusionConfig(_Section):
    """final = w * z(cross-encoder score) + (1 - w) * z(first-stage score), z = per-query standardised."""

    cross_encoder: float = Field(..., ge=0, le=1, description="weight w of the cross-encoder's score")


class RerankConfig(ModelStage):
    model: str = Field(..., description="sentence-transformers CrossEncoder name or path")
    top_n: int = Field(20, gt=0, description="ranked documents kept per query")
    input_fields: list[Literal["title", "text"]] = Field(default_factory=lambda: ["title", "text"], min_length=1)
    separator: str = " "
    batch_size: int = Field(32, gt=0, description="pairs per model batch when batch_tokens is null")
    batch_tokens: int | None = Field(
        0, ge=0, description="padded tokens per model batch, texts sorted by length across each call (0: the "
                             "device's default, 4096 on CPU and 65536 on GPU; null: batches of batch_size rows)")
    max_length: int | None = Field(None, gt=0, description="tokens per (query, document) pair; default: the model's")
    queries_per_call: int | None = Field(
        None, gt=0, description="queries whose candidates are scored in one call; null: 4 on CPU, 64 for an actor "
                                "with a GPU (4 queries' candidates fill one GPU batch: no tokenising overlaps it)")
    def call_queries(self, gpus: float = 0) -> int:
        """``queries_per_call`` as set, else the default for an actor with ``gpus`` GPUs."""
        return self.queries_per_call or (64 if gpus else 4)

    local_max_pairs: int = Field(1000, ge=0, description="a run with at most this many (query, candidate) pairs to "
                                                         "rank (queries after carry-over × retrieve.k) retrieves and "
                                                         "scores them on the driver: starting the two actor pools "
                                                         "would cost more (~20 s on 2 cores); never when either "
                                                         "pool is given GPUs; 0: always the actors")
    carry_over: bool = Field(True, description="a query ranked by the previous run on the same passages version "
                                               "with the same settings keeps that ranking (no retrieval, no "
                                               "scoring); its count and last_seen are updated")
    cache: bool = Field(True, description="reuse cross-encoder scores of pairs scored before (same normalised query, "
                                          "document text and cross-encoder); rankings are the same either way")
    fusion: Literal["auto", "none"] | FusionConfig = Field(
        "auto", description="final score: auto (the weight fitted on training judgments and saved with the "
                            "reranker, else the cross-encoder's score alone), none, or {cross_encoder: w}")


