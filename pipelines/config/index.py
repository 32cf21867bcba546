"""The sections of the index side: where tables live, the corpus, the bi-encoder, the indexes, upkeep, Ray,
locks and reports."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.base import ModelStage, _Section

# characters of input per CPU embedding call, for short texts: a 1,024-row call of MS MARCO queries embedded 1.30x
# (torch) and 1.31x (openvino-int8) faster than 256 rows, one thread (docs/benchmarks.md, Batching short texts)
CALL_CHARS = 64 * 1024

CorpusFormat = Literal["auto", "jsonl", "parquet", "csv", "lance"]
MetadataType = Literal["string", "int", "float", "bool"]
AnnType = Literal["auto", "none", "ivf_flat", "ivf_pq", "ivf_hnsw_sq", "ivf_hnsw_pq"]


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
    rows_per_block: int = Field(128, gt=0, description="rows per block read from the corpus, at least (a first run "
                                                       "reads blocks of one embedding call, if larger)")
    mode: Literal["snapshot", "changes"] = Field(
        "snapshot", description="snapshot: the corpus is the whole collection, and passages whose id is absent "
                                "are deleted; changes: a change feed of new, changed and deleted documents")
    deleted_field: str = Field("deleted", description="changes mode: a row whose field is true deletes its id")
    max_delete_fraction: float = Field(0.5, ge=0, le=1, description="snapshot mode: refuse a run that would delete "
                                                                    "more than this share of documents (a truncated "
                                                                    "snapshot); 1 allows any")
    delete_despite_unreadable: bool = Field(
        False, description="snapshot mode: when some input rows or files could not be read (no id to be had), a "
                           "document absent from the snapshot may be one of them, so deletions are withheld (and a "
                           "model change refused); true deletes every absent id anyway")
    id_shards: int | None = Field(
        None, ge=0, le=64,
        description="Ray actors holding an index run's per-document state (duplicate ids, what passages holds, what "
                    "the input holds), each one range of id hashes, so that the driver's memory does not grow with the "
                    "corpus; null: in the driver for a corpus of at most 16 MiB and a table of at most 100,000 rows, "
                    "else one per 4 cluster CPUs (at least 2); 0: always in the driver")

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


class EmbedConfig(ModelStage):
    model: str = "all-MiniLM-L6-v2"
    input_fields: list[str] = Field(default_factory=lambda: ["title", "text"], min_length=1)
    separator: str = " "
    batch_size: int = Field(16, gt=0, description="rows per model batch when batch_tokens is null")
    batch_tokens: int | None = Field(
        0, ge=0, description="padded tokens per model batch, texts sorted by length across each call (0: the "
                             "device's default, 4096 on CPU and 65536 on GPU; null: batches of batch_size rows)")
    rows_per_call: int | None = Field(
        None, gt=0, description="documents per embedding call, sorted by length together; null: 4,096 for an actor "
                                "with a GPU (where 256 short documents fill one model batch, and the next batch's "
                                "tokenising cannot overlap the forward pass); on CPU 256, or up to 2,048 for short "
                                "texts (about 64k characters per call, from the corpus's first 1,024 rows: 256 "
                                "short texts sort into too few batches of like length)")
    local_max_rows: int = Field(500, ge=0, description="an incremental run with at most this many new or changed "
                                                       "documents embeds them on the driver (starting the actor "
                                                       "pool would cost more); 0: always the actors")
    max_seq_length: int | None = Field(None, gt=0)
    normalize: bool = True
    query_prompt: str | None = Field(
        "auto", description="what queries are prefixed with (rerank retrieval, eval, search, training): a prompt "
                            "name from the model's configuration, or a literal string; auto: the model's own "
                            "'query' prompt when it defines one (as encode_query), else its default prompt; null "
                            "or '': none")
    document_prompt: str | None = Field(
        "auto", description="what passages are prefixed with when embedded: a prompt name or a literal string; "
                            "auto: the model's 'document', 'passage' or 'corpus' prompt (as encode_document), else "
                            "its default prompt; null or '': none. Part of the passages' identity: changing it "
                            "rebuilds")

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

    def call_rows(self, gpus: float = 0, mean_chars: float | None = None) -> int:
        """``rows_per_call`` as set, else the default for an actor with ``gpus`` GPUs and documents of
        ``mean_chars`` characters on average (None: not known)."""
        if self.rows_per_call or gpus:
            return self.rows_per_call or 4096
        rows = CALL_CHARS / mean_chars if mean_chars else 0
        return min(2048, max(256, 1 << max(int(rows), 1).bit_length() - 1))  # a power of two

    @model_validator(mode="after")
    def _batches(self) -> EmbedConfig:
        if self.rows_per_call is not None and self.rows_per_call < self.batch_size:
            raise ValueError(
                f"rows_per_call ({self.rows_per_call}) must be >= batch_size ({self.batch_size}); "
                "raise rows_per_call or lower batch_size"
            )
        return self


class ChunkConfig(_Section):
    """Documents split into passages by the bi-encoder's own tokenizer, so that no token goes unembedded."""

    enabled: bool = Field(True, description="split documents longer than the bi-encoder reads into passages; "
                                            "false: one passage per document, cut at the model's max_seq_length "
                                            "(the rest of a long document is never embedded)")
    tokens: int | None = Field(None, gt=0, description="tokens per passage, its title's included (the document "
                                                       "prompt and special tokens come on top); null: as many as "
                                                       "the model reads (max_seq_length less special tokens, "
                                                       "prompt and a margin of 2)")
    overlap: int | None = Field(None, ge=0, description="tokens shared by consecutive passages of a document, so "
                                                        "that a sentence on a boundary is read whole by one of "
                                                        "them; null: an eighth of the window (31 tokens for "
                                                        "all-MiniLM-L6-v2's 256)")
    title_tokens: int | None = Field(None, gt=0, description="at most this many title tokens in each passage's "
                                                             "input (a longer title is cut); null: a quarter of "
                                                             "the passage window")

    @model_validator(mode="after")
    def _window(self) -> ChunkConfig:
        if self.tokens is not None and self.overlap is not None and self.tokens <= self.overlap:
            raise ValueError(f"chunk.tokens ({self.tokens}) must be larger than chunk.overlap ({self.overlap}): "
                             "each passage must move past the last; raise chunk.tokens or lower chunk.overlap")
        return self

    def settings(self, embed: EmbedConfig) -> str:
        """How documents become passages, as recorded in ``passages.passage_settings`` (a change rebuilds): the
        chunking and the document prompt (as configured: the same model resolves it the same way)."""
        import json

        chunk = ({"tokens": self.tokens, "overlap": self.overlap, "title_tokens": self.title_tokens}
                 if self.enabled else "off")
        return json.dumps({"chunk": chunk, "document_prompt": embed.document_prompt or None,
                           "max_seq_length": embed.max_seq_length, "input_fields": embed.input_fields,
                           "separator": embed.separator, "query_prompt": embed.query_prompt or None}, sort_keys=True)


def same_passages(a: str | None, b: str | None) -> bool:
    """Whether two ``passage_settings`` make the same passages: all but the query prompt (recorded so that a query
    prompt other than the one the table was built with can be reported) must be equal."""
    import json

    if a is None or b is None:
        return a == b
    strip = lambda s: {k: v for k, v in json.loads(s).items() if k != "query_prompt"}
    return strip(a) == strip(b)


def built_query_prompt(settings: str | None) -> str | None:
    """The query prompt setting recorded when the passages were built (None when unknown)."""
    import json

    return json.loads(settings).get("query_prompt", "unknown") if settings else "unknown"


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
    max_segments: int = Field(8, gt=0, description="new rows join the trained ANN index as a segment of their own (the "
                                                   "cost of the new rows, not of the table; a query searches every "
                                                   "segment); with this many segments, the index is trained anew")
    sample_rate: int = Field(256, gt=0, description="vectors sampled per partition to train the index: training reads "
                                                    "at most num_partitions x sample_rate vectors, whatever the "
                                                    "table's size")
    build_on: Literal["worker", "driver"] = Field(
        "worker", description="where a (re)training of the ANN index runs: worker (a Ray task of its own, on a node "
                              "with a GPU when accelerator asks for one) or driver (in the upkeep's own process: the "
                              "job's driver, or its worker with maintenance.table_work_on: worker)")
    accelerator: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="train the ANN index on a GPU: cuda (needs type ivf_pq, LanceDB's GPU build, and a GPU in "
                            "the cluster), auto (cuda for ivf_pq when the cluster has a GPU, else cpu), cpu")

    @model_validator(mode="after")
    def _gpu_build(self) -> AnnConfig:
        if self.accelerator == "cuda" and self.type != "ivf_pq":
            raise ValueError(f"accelerator cuda trains only ivf_pq indexes (LanceDB's GPU build), not {self.type}; "
                             "set index.ann.type: ivf_pq or index.ann.accelerator: cpu")
        return self


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
    table_work_on: Literal["auto", "worker", "driver"] = Field(
        "auto", description="where the index job's commit and the upkeep after it run (compaction, full-text and id "
                            "indexes, new rows added to the ANN index): worker (Ray tasks: the driver's memory does "
                            "not grow with the table), driver (the job's own process), or auto (driver for a corpus "
                            "of at most 16 MiB and a table of at most 100,000 rows, else worker)")
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
    """One writer per table (``pipelines.cluster.locks``): a second run waits, then is refused naming the running one."""

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
        from pipelines.cluster.locks import MIN_STALE_SECONDS

        if not v >= MIN_STALE_SECONDS:
            raise ValueError(
                f"must be at least {MIN_STALE_SECONDS:.0f} seconds: a lease is renewed every stale_seconds / 4 (at "
                f"most 2.5 s apart) and its age is known to the store's whole second, so a shorter one lets a "
                f"second run take a live run's lease; set lock.stale_seconds to {MIN_STALE_SECONDS:.0f} or more "
                f"(default 300)")
        return v


class ReportConfig(_Section):
    dir: str | None = Field(None, description="folder for JSON run reports (default: <storage.uri>/_reports)")


