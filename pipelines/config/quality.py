"""The sections of evaluation and training: hard negatives, self-supervised pairs, the two training jobs and the
eval job."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.base import Device, _Section
from pipelines.config.rerank import CandidateSource


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
    device: Device = "auto"


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
    leaked_queries: Literal["refuse", "exclude"] = Field(
        "refuse", description="an evaluated query whose text a training section judges, or a trained model in play "
                              "trained or validated on: refuse the run (refuse), or evaluate without those queries, "
                              "listed in the report (exclude; e.g. SciFact, whose train and test splits share two "
                              "claims word for word). A training file equal to the eval judgments is always refused")

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("every depth must be > 0")
        return sorted(set(v))


