"""Job configuration: one YAML file per job, validated on load.

Unknown keys, wrong types and impossible values stop the job with a message that
names the key and the fix (``embed.batch_size must be > 0 (got 0); ...``).

Example::

    cfg = load_config("configs/demo.yaml")
    cfg.embed.model  # "all-MiniLM-L6-v2"
"""

from __future__ import annotations

import difflib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

CorpusFormat = Literal["auto", "jsonl", "parquet", "csv", "lance"]
MetadataType = Literal["string", "int", "float", "bool"]
AnnType = Literal["auto", "none", "ivf_flat", "ivf_pq", "ivf_hnsw_sq", "ivf_hnsw_pq"]


class ConfigError(ValueError):
    """A config file that cannot run; the message names the key and the fix."""


INT64 = (-(1 << 63), (1 << 63) - 1)
MAY_BE_BLANK = {"separator"}  # the only settings that may be an empty (or all-space) string
Lax = Field(strict=False)  # for the few settings that take text for their value (times; `exact: "true"`)


class _Section(BaseModel):
    # strict: a YAML `true` is not the number 1, nor `0` false, nor `2.0` or "2" an integer (an integer is a float)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)

    @field_validator("*")
    @classmethod
    def _usable(cls, v: Any, info: ValidationInfo) -> Any:
        """No setting is an empty list or a blank string (a path, URI, model or field name), and no integer
        exceeds the 64 bits that Arrow, numpy and Ray hold."""
        if isinstance(v, list) and not v:
            raise ValueError("must not be an empty list")
        for x in v if isinstance(v, list) else (v,):
            if type(x) is int and not INT64[0] <= x <= INT64[1]:
                raise ValueError("must fit in a signed 64-bit integer")
            if isinstance(x, str) and not x.strip() and info.field_name not in MAY_BE_BLANK:
                raise ValueError("must not be empty")
        return v


class StorageConfig(_Section):
    uri: str = Field("./lancedb", description="LanceDB URI: a local folder, s3://bucket/prefix, ...")
    # repr=False: a printed config never shows keys; YAML scalars (allow_http: true) become the strings LanceDB takes
    storage_options: dict[str, str | bool | int | float] = Field(
        default_factory=dict, repr=False,
        description="object-store options as LanceDB names them (aws_access_key_id, aws_secret_access_key, "
                    "aws_endpoint, region, allow_http, ...), for the tables and the corpus, query-log and report "
                    "URIs; what is left out comes from the AWS_* environment variables")
    passages_table: str = "passages"
    quarantine_table: str = "quarantine"
    rankings_table: str = "rankings"
    pair_scores_table: str = Field("pair_scores", description="cross-encoder scores cached by (normalised query, "
                                                              "document text hash, cross-encoder)")

    @field_validator("storage_options")
    @classmethod
    def _option_strings(cls, v: dict) -> dict[str, str]:
        return {k: str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()}

    @field_validator("passages_table", "quarantine_table", "rankings_table", "pair_scores_table")
    @classmethod
    def _table_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "_-" for c in v):
            raise ValueError("must be a plain table name of letters, digits, '_' or '-'")
        if v.startswith("_"):
            raise ValueError("must not start with '_' (batchrank's private tables: staging, locks, reports)")
        return v

    @model_validator(mode="after")
    def _distinct_tables(self) -> StorageConfig:
        keys = ("passages_table", "quarantine_table", "rankings_table", "pair_scores_table")
        seen: dict[str, str] = {}
        for key in keys:
            name = getattr(self, key)
            if name in seen:
                raise ValueError(f"storage.{key} and storage.{seen[name]} are both '{name}': each table needs its "
                                 "own name (one job would overwrite the other's table); give them different names")
            seen[name] = key
        return self


class CorpusConfig(_Section):
    path: str | list[str] = Field(..., description="file, folder, glob or URI (or a list of them)")
    format: CorpusFormat = "auto"
    id_field: str = "_id"
    text_field: str = "text"
    title_field: str | None = "title"
    metadata_fields: dict[str, MetadataType] = Field(default_factory=dict)
    max_text_chars: int = Field(100_000, gt=0)
    rows_per_block: int = Field(128, gt=0)
    mode: Literal["snapshot", "changes"] = Field(
        "snapshot", description="snapshot: the corpus is the whole collection, and passages whose id is absent "
                                "are deleted; changes: a change feed of new, changed and deleted documents")
    deleted_field: str = Field("deleted", description="changes mode: a row whose field is true deletes its id")
    max_delete_fraction: float = Field(0.5, ge=0, le=1, description="snapshot mode: refuse a run that would delete "
                                                                    "more than this share of passages (a truncated "
                                                                    "snapshot); 1 allows any")
    delete_despite_unreadable: bool = Field(
        False, description="snapshot mode: when some input rows or files could not be read (no id to be had), a "
                           "document absent from the snapshot may be one of them, so deletions are withheld (and a "
                           "model change refused); true deletes every absent id anyway")

    @field_validator("metadata_fields")
    @classmethod
    def _not_reserved(cls, v: dict[str, str]) -> dict[str, str]:
        from pipelines.schema import RESERVED_COLUMNS

        clash = sorted(n for n in v if n in RESERVED_COLUMNS or n.startswith("_") or not n)
        if clash:
            raise ValueError(f"{', '.join(repr(n) for n in clash)}: reserved for batchrank's own columns (or "
                             f"empty, or starting with '_'); rename the field in the input, or leave it out "
                             f"(reserved: {', '.join(sorted(RESERVED_COLUMNS))})")
        return v


class EmbedConfig(_Section):
    model: str = "all-MiniLM-L6-v2"
    input_fields: list[str] = Field(default_factory=lambda: ["title", "text"], min_length=1)
    separator: str = " "
    batch_size: int = Field(16, gt=0, description="rows per model batch when batch_tokens is null")
    batch_tokens: int | None = Field(
        0, ge=0, description="padded tokens per model batch, texts sorted by length across each call (0: the "
                             "device's default, 4096 on CPU and 65536 on GPU; null: batches of batch_size rows)")
    rows_per_call: int = Field(256, gt=0, description="documents per embedding call; sorted by length together")
    local_max_rows: int = Field(500, ge=0, description="an incremental run with at most this many new or changed "
                                                       "documents embeds them on the driver (starting the actor "
                                                       "pool would cost more); 0: always the actors")
    actors: int = Field(2, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch", description="torch; or on CPU an ONNX Runtime export of the model (onnx), dynamically quantised to "
                             "int8 (onnx-int8: about 2x faster, slightly different scores; measure with the eval job)")
    max_seq_length: int | None = Field(None, gt=0)
    normalize: bool = True
    trust_remote_code: bool = False

    @property
    def identity(self) -> str:
        """The bi-encoder as recorded in passages: the model, and the backend when it changes the vectors."""
        return self.model if self.backend == "torch" else f"{self.model} [{self.backend}]"

    @field_validator("input_fields")
    @classmethod
    def _fields(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in ("title", "text")]
        if bad:
            raise ValueError(f"only 'title' and 'text' can feed the embedding (got {bad})")
        return v

    @model_validator(mode="after")
    def _batches(self) -> EmbedConfig:
        if self.rows_per_call < self.batch_size:
            raise ValueError(
                f"rows_per_call ({self.rows_per_call}) must be >= batch_size ({self.batch_size}); "
                "raise rows_per_call or lower batch_size"
            )
        return self


class AnnConfig(_Section):
    type: AnnType = "auto"
    min_rows: int = Field(50_000, ge=0, description="below this many rows search stays exact")
    num_partitions: int | None = Field(None, gt=0)
    num_sub_vectors: int | None = Field(None, gt=0)
    num_bits: Literal[4, 8] = 8
    m: int = Field(20, gt=0)
    ef_construction: int = Field(300, gt=0)
    nprobes: int = Field(20, gt=0)
    refine_factor: int | None = Field(None, gt=0)
    ef: int | None = Field(None, gt=0)
    retrain_fraction: float = Field(0.2, gt=0, description="retrain the ANN index once the rows added or changed "
                                                           "since its training pass this share of the table; below "
                                                           "it, new rows are added to the trained index")


class FtsConfig(_Section):
    enabled: bool = True
    columns: list[Literal["title", "text"]] = Field(default_factory=lambda: ["title", "text"], min_length=1,
                                                    description="fields with a BM25 index; queries match all")


class IndexConfig(_Section):
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    ann: AnnConfig = Field(default_factory=AnnConfig)
    fts: FtsConfig = Field(default_factory=FtsConfig)


class MaintenanceConfig(_Section):
    """Table upkeep after each commit: compaction, old-version cleanup, expiry of batchrank's own tags."""

    max_fragments: int = Field(32, gt=0, description="compact a table whose data files exceed this count")
    version_retention_days: float = Field(7.0, ge=0, description="delete untagged versions older than this "
                                                                 "(never the latest, a tagged one, or one a run "
                                                                 "in progress reads)")
    run_tag_retention_days: float | None = Field(30.0, gt=0, description="drop run tags (run ids that batchrank "
                                                                         "wrote) older than this, so their versions "
                                                                         "can be cleaned; null keeps them; tags "
                                                                         "you create are never dropped")
    lease_hours: float = Field(24.0, gt=0, description="a run's read lease on a version expires after this (a run "
                                                       "killed without releasing it)")
    pair_cache_days: float | None = Field(30.0, gt=0, description="drop cached pair scores older than this; null "
                                                                  "keeps them")


class RayConfig(_Section):
    address: str | None = Field(None, description="cluster address; RAY_ADDRESS or a new local Ray if unset")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a new local Ray (default: all)")


class LockConfig(_Section):
    """One writer per table (``pipelines.locks``): a second run waits, then is refused naming the running one."""

    wait_seconds: float = Field(0.0, ge=0,
                                description="how long a run waits for another run writing the same table "
                                            "before it is refused (0: refuse at once)")
    stale_seconds: float = Field(300.0,
                                 description="object stores only: a lock whose holder has not renewed it for this "
                                             "long (on the store's clock) is a killed run's and is taken over; at "
                                             "least 10 (local locks free themselves when their process dies)")

    @field_validator("stale_seconds")
    @classmethod
    def _stale_floor(cls, v: float) -> float:
        from pipelines.locks import MIN_STALE_SECONDS

        if not v >= MIN_STALE_SECONDS:
            raise ValueError(
                f"must be at least {MIN_STALE_SECONDS:.0f} seconds: a lease is renewed every stale_seconds / 4 (at "
                f"most 2.5 s apart) and its age is known to the store's whole second, so a shorter one lets a "
                f"second run take a live run's lease; set lock.stale_seconds to {MIN_STALE_SECONDS:.0f} or more "
                f"(default 300)")
        return v


class ReportConfig(_Section):
    dir: str | None = Field(None, description="folder for JSON run reports (default: <storage.uri>/_reports)")


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


class RetrieveConfig(_Section):
    k: int = Field(100, gt=0, le=10_000, description="candidates per query")
    source: CandidateSource = Field("vector", description="vector (bi-encoder), fts (BM25) or hybrid (both, "
                                                          "fused by reciprocal rank)")
    rrf_k: int = Field(60, gt=0, description="reciprocal-rank fusion constant: 1 / (rrf_k + rank)")
    exact: Literal["auto", "lance_flat"] | Annotated[bool, Lax] = Field(
        "auto", description="auto: exact search as an in-memory matrix product (pipelines/exact_search.py) while the "
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
    queries_per_call: int = Field(256, gt=0, description="queries embedded and searched per batch")
    search_threads: int = Field(4, gt=0, description="concurrent searches per retrieve actor")
    actors: int = Field(1, gt=0)
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)


class FusionConfig(_Section):
    """final = w * z(cross-encoder score) + (1 - w) * z(first-stage score), z = per-query standardised."""

    cross_encoder: float = Field(..., ge=0, le=1, description="weight w of the cross-encoder's score")


class RerankConfig(_Section):
    model: str = Field(..., description="sentence-transformers CrossEncoder name or path")
    top_n: int = Field(20, gt=0, description="ranked documents kept per query")
    input_fields: list[Literal["title", "text"]] = Field(default_factory=lambda: ["title", "text"], min_length=1)
    separator: str = " "
    batch_size: int = Field(32, gt=0, description="pairs per model batch when batch_tokens is null")
    batch_tokens: int | None = Field(
        0, ge=0, description="padded tokens per model batch, texts sorted by length across each call (0: the "
                             "device's default, 4096 on CPU and 65536 on GPU; null: batches of batch_size rows)")
    max_length: int | None = Field(None, gt=0, description="tokens per (query, document) pair; default: the model's")
    queries_per_call: int = Field(4, gt=0, description="queries whose candidates are scored in one call")
    actors: int = Field(2, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch", description="torch; or on CPU an ONNX Runtime export of the model (onnx), dynamically quantised to "
                             "int8 (onnx-int8: about 2x faster, slightly different scores; measure with the eval job)")
    trust_remote_code: bool = False
    carry_over: bool = Field(True, description="a query ranked by the previous run on the same passages version "
                                               "with the same settings keeps that ranking (no retrieval, no "
                                               "scoring); its count and last_seen are updated")
    cache: bool = Field(True, description="reuse cross-encoder scores of pairs scored before (same normalised query, "
                                          "document text and cross-encoder); rankings are the same either way")
    fusion: Literal["auto", "none"] | FusionConfig = Field(
        "auto", description="final score: auto (the weight fitted on training judgments and saved with the "
                            "reranker, else the cross-encoder's score alone), none, or {cross_encoder: w}")


class NegativesConfig(_Section):
    """Hard negatives mined from the index, named as sentence-transformers' ``mine_hard_negatives`` names them.

    Margins compare first-stage scores within one candidate list; a positive outside the top ``range_max`` takes
    the lowest candidate score as its own. Each margin that is set must hold."""

    per_query: int = Field(4, ge=0, description="negatives per (query, positive)")
    source: CandidateSource | None = Field(None, description="where they are mined; default retrieve.source")
    range_min: int = Field(0, ge=0, description="skip this many top-ranked candidates (likely unjudged positives)")
    range_max: int = Field(30, gt=0, description="mine among the top range_max candidates")
    absolute_margin: float | None = Field(None, description="keep a negative only if its first-stage score is "
                                                            "below the positive's by at least this much")
    relative_margin: float | None = Field(None, ge=0, lt=1, description="keep a negative only if its first-stage "
                                                                      "score is at most (1 - m) x the positive's")

    @model_validator(mode="after")
    def _range(self) -> NegativesConfig:
        if self.range_min >= self.range_max:
            raise ValueError(f"range_min ({self.range_min}) must be < range_max ({self.range_max})")
        return self


class SelfSupervisedConfig(_Section):
    """Pairs made from the corpus itself (a document's title as the query for its text) when judgments are few."""

    pairs: int = Field(0, ge=0, description="how many documents to turn into (title, text) pairs; 0 = none")


class _TrainCommon(_Section):
    queries: str = Field(..., description="queries.jsonl in the BEIR layout (_id, text)")
    qrels: str = Field(..., description="judgments TSV: query-id, corpus-id, score (with a header line)")
    output: str = Field(..., description="folder the trained model is saved to")
    max_queries: int | None = Field(None, gt=0)
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="judged queries held out to pick the best "
                                                                   "checkpoint (and fit fusion); never trained on")
    validation_k: int = Field(30, gt=0, description="candidates per validation query (from retrieve.source) that "
                                                    "the checkpoints are judged on (and the fusion weight fitted)")
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    self_supervised: SelfSupervisedConfig = Field(default_factory=SelfSupervisedConfig)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    seed: int = 12
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class TrainConfig(_TrainCommon):
    """``train-reranker``: fine-tune a CrossEncoder (from any cross-encoder, or a bi-encoder's weights)."""

    base_model: str = "all-MiniLM-L6-v2"
    loss: Literal["bce", "listwise"] = Field("bce", description="binary cross-entropy over labelled pairs, or a "
                                                                "softmax over one positive and its negatives")
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=0)


class TrainBiencoderConfig(_TrainCommon):
    """``train-biencoder``: contrastive fine-tuning (MultipleNegativesRankingLoss, in-batch + mined negatives)."""

    base_model: str | None = Field(None, description="default: embed.model")
    negatives: NegativesConfig = Field(default_factory=lambda: NegativesConfig(per_query=1, range_min=3))
    batch_size: int = Field(32, gt=0)
    max_seq_length: int = Field(256, gt=0)


class EvalConfig(_Section):
    """``batchrank eval``: a BEIR-layout collection's queries through every candidate source and rerank depth."""

    collection: str = Field(..., description="folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    split: str = "test"
    queries: str | None = Field(None, description="default: <collection>/queries.jsonl")
    qrels: str | None = Field(None, description="default: <collection>/qrels/<split>.tsv")
    sources: list[CandidateSource] = Field(default_factory=lambda: ["vector", "fts", "hybrid"], min_length=1)
    depths: list[int] = Field(default_factory=lambda: [10, 20, 50, 100], description="rerank the top K, for each K")
    rerank_sources: list[CandidateSource] | None = Field(None, description="sources reranked; default "
                                                                           "[retrieve.source]")
    max_queries: int | None = Field(None, gt=0)
    output: str = Field("./eval-report", description="folder for eval.json, eval.md and eval.png")

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("every depth must be > 0")
        return sorted(set(v))


class Config(_Section):
    """One config for every job: each job requires its own sections (``corpus`` for index, ...)."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    corpus: CorpusConfig | None = None
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    maintenance: MaintenanceConfig = Field(default_factory=MaintenanceConfig)
    query_log: QueryLogConfig | None = None
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    rerank: RerankConfig | None = None
    train: TrainConfig | None = None
    train_biencoder: TrainBiencoderConfig | None = None
    eval: EvalConfig | None = None
    ray: RayConfig = Field(default_factory=RayConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    lock: LockConfig = Field(default_factory=LockConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.corpus is not None and "title" in self.embed.input_fields and self.corpus.title_field is None:
            self.embed.input_fields = [f for f in self.embed.input_fields if f != "title"] or ["text"]
        if self.rerank is not None and self.rerank.top_n > self.retrieve.k:
            raise ValueError(f"rerank.top_n ({self.rerank.top_n}) must be <= retrieve.k ({self.retrieve.k}); "
                             "lower rerank.top_n or raise retrieve.k")
        return self

    def require(self, *sections: str, command: str) -> None:
        """Stop a job whose config lacks a section it needs, naming the section and the command."""
        missing = [s for s in sections if getattr(self, s) is None]
        if missing:
            raise ConfigError(f"`{command}` needs the config section(s) {', '.join(missing)}; add them "
                              "(see configs/demo.yaml for an example)")



# Fixes for the commonest mistakes, keyed by dotted path; the generic message names the key anyway.
_HINTS = {
    "embed.batch_size": "lower it if the device runs out of memory; 16 is fastest on small CPUs",
    "embed.actors": "use 1 actor per GPU, or about one per 1-2 CPU cores",
    "embed.gpus_per_actor": "use 0 on CPU-only machines, 1 for one GPU per actor",
    "corpus.path": "point it at a .jsonl/.parquet/.csv file, a folder, a glob or a Lance dataset",
    "corpus.format": "use one of auto, jsonl, parquet, csv, lance",
    "rerank.batch_size": "lower it if the device runs out of memory",
    "rerank.gpus_per_actor": "use 0 on CPU-only machines, 1 for one GPU per actor",
    "query_log.path": "point it at a .jsonl/.parquet file, a folder or a glob of them",
    "index.ann.type": "use auto (exact below ann.min_rows), none, ivf_flat, ivf_pq, ivf_hnsw_sq or ivf_hnsw_pq",
    "retrieve.exact": "use auto (the exact matrix product while it is faster than ANN), true, false or lance_flat",
}


def _model_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys accepted where ``loc`` points, through nested sections and lists of them (``schedules.0.cron``)."""
    from typing import get_args

    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections: the section model is already current
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        ann = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return []
        model = ann
    return list(model.model_fields)


def validation_message(exc: ValidationError, model: type[BaseModel], source: str, what: str = "config") -> str:
    """Every error of ``exc`` on one line each, naming the key and the fix (``ConfigError`` / ``ScheduleError``)."""
    lines = [_format_error(e, model, what) for e in exc.errors()]
    return f"{source}: invalid {what}\n  - " + "\n  - ".join(lines)


def _format_error(err: dict, model: type[BaseModel], what: str = "config") -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _model_keys(model, loc), n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"remove it (accepted here: {', '.join(_model_keys(model, loc))})"
        return f"{key}: unknown key; {fix}"
    if err["type"] == "missing":
        return f"{key}: required key is missing; add it to the {what}"
    msg = err["msg"].removeprefix("Value error, ")
    try:
        shown = repr(given)
    except RecursionError:
        shown = f"a {type(given).__name__} nested too deeply to show"
    text = f"{key} {msg[0].lower()}{msg[1:]} (got {shown})"
    hint = _HINTS.get(key)
    return f"{text}; {hint}" if hint else text


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-parsed mapping; raise ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of sections (got {type(data).__name__})")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, Config, source)) from None


def load_config(path: str | os.PathLike) -> Config:
    """Load and validate a YAML config. Relative local paths resolve against the config's folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}; pass --config with the path of a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None
    # YAMLError, or for some bad scalars (a: 2001-13-01, !!int) a plain ValueError, IndexError, ...
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{p}: not valid YAML: {exc or type(exc).__name__}") from None
    cfg = parse_config(data, str(p))
    return _resolve_relative(cfg, p.parent)


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _resolve_relative(cfg: Config, base: Path) -> Config:
    """Relative paths in a config mean 'next to the config file', wherever the job runs from."""

    def fix(p: str) -> str:
        if not _is_local(p):
            return p
        if "\0" in p:  # no file system takes it (os functions raise ValueError: embedded null byte)
            raise ConfigError(f"{base}: the path {p!r} in the config holds a NUL character; remove it")
        p = os.path.expanduser(os.path.expandvars(p))
        return p if os.path.isabs(p) else str((base / p).resolve())

    def fix_paths(p: str | list[str]) -> str | list[str]:
        return [fix(x) for x in p] if isinstance(p, list) else fix(p)

    def fix_model(name: str) -> str:
        """A model given as a path (./x, ~/x, a/b that exists here) resolves like any path; a hub id stays."""
        expanded = os.path.expanduser(os.path.expandvars(name))
        if not _is_local(name):
            return name
        if name.startswith((".", "~", "$", "/")) or (base / expanded).exists():
            return fix(name)
        return name

    cfg.storage.uri = fix(cfg.storage.uri)
    if cfg.corpus is not None:
        cfg.corpus.path = fix_paths(cfg.corpus.path)
    if cfg.query_log is not None:
        cfg.query_log.path = fix_paths(cfg.query_log.path)
    if cfg.report.dir:
        cfg.report.dir = fix(cfg.report.dir)
    cfg.embed.model = fix_model(cfg.embed.model)
    if cfg.rerank is not None:
        cfg.rerank.model = fix_model(cfg.rerank.model)
    if cfg.train is not None:
        t = cfg.train
        t.queries, t.qrels, t.output = fix(t.queries), fix(t.qrels), fix(t.output)
        t.base_model = fix_model(t.base_model)
    if cfg.train_biencoder is not None:
        t = cfg.train_biencoder
        t.queries, t.qrels, t.output = fix(t.queries), fix(t.qrels), fix(t.output)
        t.base_model = fix_model(t.base_model) if t.base_model else None
    if cfg.eval is not None:
        e = cfg.eval
        e.collection, e.output = fix(e.collection), fix(e.output)
        e.queries = fix(e.queries) if e.queries else None
        e.qrels = fix(e.qrels) if e.qrels else None
    return cfg
