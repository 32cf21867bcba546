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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CorpusFormat = Literal["auto", "jsonl", "parquet", "csv", "lance"]
MetadataType = Literal["string", "int", "float", "bool"]
AnnType = Literal["auto", "none", "ivf_flat", "ivf_pq", "ivf_hnsw_sq", "ivf_hnsw_pq"]


class ConfigError(ValueError):
    """A config file that cannot run; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    uri: str = Field("./lancedb", description="LanceDB URI: a local folder, s3://bucket/prefix, ...")
    storage_options: dict[str, str] = Field(default_factory=dict)
    passages_table: str = "passages"
    quarantine_table: str = "quarantine"

    @field_validator("passages_table", "quarantine_table")
    @classmethod
    def _table_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "_-" for c in v):
            raise ValueError("must be a plain table name of letters, digits, '_' or '-'")
        return v


class CorpusConfig(_Section):
    path: str | list[str] = Field(..., description="file, folder, glob or URI (or a list of them)")
    format: CorpusFormat = "auto"
    id_field: str = "_id"
    text_field: str = "text"
    title_field: str | None = "title"
    metadata_fields: dict[str, MetadataType] = Field(default_factory=dict)
    max_text_chars: int = Field(100_000, gt=0)
    rows_per_block: int = Field(128, gt=0)


class EmbedConfig(_Section):
    model: str = "all-MiniLM-L6-v2"
    input_fields: list[str] = Field(default_factory=lambda: ["title", "text"], min_length=1)
    separator: str = " "
    batch_size: int = Field(16, gt=0)
    rows_per_call: int = Field(64, gt=0)
    actors: int = Field(2, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_seq_length: int | None = Field(None, gt=0)
    normalize: bool = True
    trust_remote_code: bool = False

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


class FtsConfig(_Section):
    enabled: bool = True
    column: Literal["text", "title"] = "text"


class IndexConfig(_Section):
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    ann: AnnConfig = Field(default_factory=AnnConfig)
    fts: FtsConfig = Field(default_factory=FtsConfig)


class RayConfig(_Section):
    address: str | None = Field(None, description="cluster address; RAY_ADDRESS or a new local Ray if unset")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a new local Ray (default: all)")


class ReportConfig(_Section):
    dir: str | None = Field(None, description="folder for JSON run reports (default: <storage.uri>/_reports)")


class IndexJobConfig(_Section):
    """The whole config of the index job."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    corpus: CorpusConfig
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _title(self) -> IndexJobConfig:
        if "title" in self.embed.input_fields and self.corpus.title_field is None:
            self.embed.input_fields = [f for f in self.embed.input_fields if f != "title"] or ["text"]
        return self


# Fixes for the commonest mistakes, keyed by dotted path; the generic message names the key anyway.
_HINTS = {
    "embed.batch_size": "lower it if the device runs out of memory; 16 is fastest on small CPUs",
    "embed.actors": "use 1 actor per GPU, or about one per 1-2 CPU cores",
    "embed.gpus_per_actor": "use 0 on CPU-only machines, 1 for one GPU per actor",
    "corpus.path": "point it at a .jsonl/.parquet/.csv file, a folder, a glob or a Lance dataset",
    "corpus.format": "use one of auto, jsonl, parquet, csv, lance",
    "index.ann.type": "use auto (exact below ann.min_rows), none, ivf_flat, ivf_pq, ivf_hnsw_sq or ivf_hnsw_pq",
}


def _model_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: dict, model: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _model_keys(model, loc), n=1)
        fix = f"did you mean '{close[0]}'?" if close else "remove it (see configs/ for the accepted keys)"
        return f"{key}: unknown key; {fix}"
    if err["type"] == "missing":
        return f"{key}: required key is missing; add it to the config"
    msg = err["msg"].removeprefix("Value error, ")
    text = f"{key} {msg[0].lower()}{msg[1:]} (got {given!r})"
    hint = _HINTS.get(key)
    return f"{text}; {hint}" if hint else text


def parse_config(data: Any, source: str = "<config>") -> IndexJobConfig:
    """Validate an already-parsed mapping; raise ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of sections (got {type(data).__name__})")
    try:
        return IndexJobConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, IndexJobConfig) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid config\n  - " + "\n  - ".join(lines)) from None


def load_config(path: str | os.PathLike) -> IndexJobConfig:
    """Load and validate a YAML config. Relative local paths resolve against the config's folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}; pass --config with the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    cfg = parse_config(data, str(p))
    return _resolve_relative(cfg, p.parent)


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _resolve_relative(cfg: IndexJobConfig, base: Path) -> IndexJobConfig:
    """Relative paths in a config mean 'next to the config file', wherever the job runs from."""

    def fix(p: str) -> str:
        if not _is_local(p):
            return p
        p = os.path.expanduser(os.path.expandvars(p))
        return p if os.path.isabs(p) else str((base / p).resolve())

    cfg.storage.uri = fix(cfg.storage.uri)
    paths = cfg.corpus.path if isinstance(cfg.corpus.path, list) else [cfg.corpus.path]
    fixed = [fix(p) for p in paths]
    cfg.corpus.path = fixed if isinstance(cfg.corpus.path, list) else fixed[0]
    if cfg.report.dir:
        cfg.report.dir = fix(cfg.report.dir)
    model = cfg.embed.model
    if _is_local(model) and (model.startswith(".") or "/" in model) and (base / model).exists():
        cfg.embed.model = str((base / model).resolve())
    return cfg
