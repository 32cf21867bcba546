"""Job configuration: one YAML file per job, validated on load.

Unknown keys, wrong types and impossible values stop the job with a message that
names the key and the fix (``embed.batch_size must be > 0 (got 0); ...``).

Example::

    cfg = load_config("configs/demo.yaml")
    cfg.embed.model  # "all-MiniLM-L6-v2"

Sections by part of the flow: ``config/index.py`` (storage, corpus, embed, index, maintenance, ray, lock, report),
``config/rerank.py`` (query_log, retrieve, rerank), ``config/quality.py`` (train, train_biencoder, eval);
``config/base.py`` holds the strict base, the actor-pool settings shared by the stages, and error formatting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from pipelines.config.base import (  # noqa: F401
    INT64,
    MAY_BE_BLANK,
    ActorPool,
    ConfigError,
    _model_keys,
    _Section,
    validation_message,
)
from pipelines.config.index import (  # noqa: F401
    AnnConfig,
    ChunkConfig,
    CorpusConfig,
    EmbedConfig,
    FtsConfig,
    IndexConfig,
    LockConfig,
    MaintenanceConfig,
    RayConfig,
    ReportConfig,
    StorageConfig,
)
from pipelines.config.quality import (  # noqa: F401
    EvalConfig,
    NegativesConfig,
    SelfSupervisedConfig,
    TrainBiencoderConfig,
    TrainConfig,
)
from pipelines.config.rerank import (  # noqa: F401
    CandidateSource,
    FusionConfig,
    NormalizeConfig,
    QueryLogConfig,
    RerankConfig,
    RetrieveConfig,
)


class Config(_Section):
    """One config for every job: each job requires its own sections (``corpus`` for index, ...)."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    corpus: CorpusConfig | None = None
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
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

    @property
    def passage_settings(self) -> str:
        """How documents become passages (``ChunkConfig.settings``), recorded with every passage."""
        return self.chunk.settings(self.embed)

    def require(self, *sections: str, command: str) -> None:
        """Stop a job whose config lacks a section it needs, naming the section and the command."""
        missing = [s for s in sections if getattr(self, s) is None]
        if missing:
            raise ConfigError(f"`{command}` needs the config section(s) {', '.join(missing)}; add them "
                              "(see configs/demo.yaml for an example)")



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
