from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config, parse_config

BASE = {"corpus": {"path": "corpus.jsonl"}}


def _err(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "job.yaml")
    return str(info.value)


def test_defaults_fill_every_section():
    cfg = parse_config(BASE)
    assert cfg.embed.model == "all-MiniLM-L6-v2"
    assert cfg.embed.batch_size == 16 and cfg.index.metric == "cosine" and cfg.index.fts.enabled
    assert cfg.storage.passages_table == "passages"


def test_unknown_key_is_an_error_with_a_suggestion():
    msg = _err({**BASE, "embed": {"batchsize": 8}})
    assert "embed.batchsize: unknown key" in msg and "did you mean 'batch_size'" in msg


def test_unknown_section_is_an_error():
    assert "embedd: unknown key" in _err({**BASE, "embedd": {}})


def test_impossible_value_names_key_value_and_fix():
    msg = _err({**BASE, "embed": {"batch_size": 0}})
    assert "embed.batch_size" in msg and "greater than 0" in msg and "(got 0)" in msg
    assert "lower it if the device runs out of memory" in msg


def test_wrong_type_names_the_key():
    msg = _err({**BASE, "embed": {"actors": "many"}})
    assert "embed.actors" in msg and "'many'" in msg


def test_bad_choice_lists_the_choices():
    msg = _err({**BASE, "index": {"ann": {"type": "hnsw_magic"}}})
    assert "index.ann.type" in msg and "ivf_pq" in msg


def test_missing_required_section_key():
    assert "corpus.path: required key is missing" in _err({"corpus": {}})
    cfg = parse_config({})  # every section is optional at load time; each job requires its own
    with pytest.raises(ConfigError, match="`batchrank index` needs the config section.s. corpus"):
        cfg.require("corpus", command="batchrank index")


def test_rerank_sections():
    ok = parse_config({"query_log": {"path": "log.jsonl", "since": "2026-11-01"}, "rerank": {"model": "ce"}})
    assert ok.query_log.since.tzinfo is not None  # naive times mean UTC
    assert ok.retrieve.k == 100 and ok.rerank.top_n == 20
    assert "rerank.top_n (200) must be <= retrieve.k (100)" in _err({"rerank": {"model": "ce", "top_n": 200}})
    assert "set either since or last_days" in _err({"query_log": {"path": "x", "since": "2026-01-01",
                                                                  "last_days": 7}})
    assert "must be before until" in _err({"query_log": {"path": "x", "since": "2026-02-01",
                                                         "until": "2026-01-01"}})
    assert "rerank.model: required key is missing" in _err({"rerank": {}})
    assert "query_log.min_count" in _err({"query_log": {"path": "x", "min_count": 0}})


def test_rerank_and_train_paths_resolve_next_to_the_config(tmp_path):
    (tmp_path / "models" / "ce").mkdir(parents=True)
    path = tmp_path / "conf" / "job.yaml"
    path.parent.mkdir()
    path.write_text("query_log:\n  path: ../logs/*.jsonl\nrerank:\n  model: ../models/ce\n"
                    "train:\n  queries: q.jsonl\n  qrels: qrels/train.tsv\n  output: ~/rr\n")
    cfg = load_config(path)
    assert cfg.query_log.path == str(tmp_path / "logs" / "*.jsonl")
    assert cfg.rerank.model == str(tmp_path / "models" / "ce")
    assert cfg.train.queries == str(tmp_path / "conf" / "q.jsonl")
    assert cfg.train.output == str(Path("~/rr").expanduser())
    assert cfg.train.base_model == "all-MiniLM-L6-v2"  # a hub-style name stays a name


def test_cross_field_rule():
    msg = _err({**BASE, "embed": {"batch_size": 64, "rows_per_call": 32}})
    assert "rows_per_call (32) must be >= batch_size (64)" in msg


def test_all_errors_reported_at_once():
    msg = _err({**BASE, "embed": {"batch_size": -1, "actors": 0}})
    assert "embed.batch_size" in msg and "embed.actors" in msg


def test_bad_table_name_refused():
    assert "storage.passages_table" in _err({**BASE, "storage": {"passages_table": "../evil"}})


def test_not_a_mapping():
    assert "must be a YAML mapping" in _err(["a", "b"])


def test_load_resolves_relative_paths_against_the_config(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "job.yaml"
    path.write_text("storage:\n  uri: ../db\ncorpus:\n  path: ../data/*.jsonl\n")
    cfg = load_config(path)
    assert cfg.storage.uri == str(tmp_path / "db")
    assert cfg.corpus.path == str(tmp_path / "data" / "*.jsonl")


def test_load_keeps_uris(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("storage:\n  uri: s3://bucket/db\ncorpus:\n  path: s3://bucket/corpus/\n")
    cfg = load_config(path)
    assert cfg.storage.uri == "s3://bucket/db" and cfg.corpus.path == "s3://bucket/corpus/"


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_demo_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs/demo.yaml")
    assert cfg.corpus.path.endswith("data/scifact-sample/corpus.jsonl")


def test_home_and_env_vars_expand_in_local_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CORPUS_DIR", str(tmp_path / "corpora"))
    path = tmp_path / "job.yaml"
    path.write_text("storage:\n  uri: ~/db\ncorpus:\n  path: $CORPUS_DIR/c.jsonl\n")
    cfg = load_config(path)
    assert cfg.storage.uri == str(tmp_path / "home" / "db")
    assert cfg.corpus.path == str(tmp_path / "corpora" / "c.jsonl")


def test_output_inside_a_ray_job_package_is_refused():
    from pipelines.cluster.runtime import check_not_in_job_package

    pkg = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_ab12/.batchrank/db"
    with pytest.raises(ValueError, match="lost when the job ends"):
        check_not_in_job_package(pkg, "storage.uri")
    check_not_in_job_package("/data/lancedb", "storage.uri")
    check_not_in_job_package("s3://bucket/db", "storage.uri")


@pytest.mark.parametrize("section", ["embed", "rerank"])
def test_cuda_without_a_gpu_per_actor_is_refused(section):
    """device: cuda with gpus_per_actor: 0 used to run on CPU without a word (Ray gives an actor no GPU it did not
    reserve): refused, naming both fixes; with a GPU reserved, or device auto, it loads."""
    extra = {"model": "ce"} if section == "rerank" else {}
    msg = _err({**BASE, section: {**extra, "device": "cuda"}})
    assert section in msg and "gpus_per_actor: 1" in msg and "device: auto" in msg
    assert getattr(parse_config({**BASE, section: {**extra, "device": "cuda", "gpus_per_actor": 0.5}}),
                   section).gpus_per_actor == 0.5
    assert getattr(parse_config({**BASE, section: {**extra, "gpus_per_actor": 0}}), section).device == "auto"


@pytest.mark.parametrize("section", ["embed", "rerank"])
def test_an_onnx_backend_on_a_gpu_is_refused(section):
    """ONNX backends run on CPU; on a GPU the torch backend used to run while passages recorded the ONNX one."""
    extra = {"model": "ce"} if section == "rerank" else {}
    for gpu in ({"gpus_per_actor": 1}, {"device": "cuda", "gpus_per_actor": 1}):
        msg = _err({**BASE, section: {**extra, "backend": "onnx-int8", **gpu}})
        assert "runs on CPU only" in msg and "backend: torch" in msg and "gpus_per_actor: 0" in msg
    assert getattr(parse_config({**BASE, section: {**extra, "backend": "onnx-int8"}}), section).backend == "onnx-int8"


def test_calls_default_to_the_device_size():
    """Calls sized for a CPU (256 documents, 4 queries' candidates) fill one GPU batch each, so tokenising never
    overlaps the forward pass there: unset, an actor with a GPU gets 4,096 documents / 64 queries per call."""
    cfg = parse_config({**BASE, "rerank": {"model": "ce"}})
    assert (cfg.embed.call_rows(), cfg.embed.call_rows(1), cfg.embed.call_rows(0.5)) == (256, 4096, 4096)
    assert (cfg.rerank.call_queries(), cfg.rerank.call_queries(1)) == (4, 64)
    set_ = parse_config({**BASE, "embed": {"rows_per_call": 512}, "rerank": {"model": "ce", "queries_per_call": 8}})
    assert (set_.embed.call_rows(), set_.embed.call_rows(1), set_.rerank.call_queries(1)) == (512, 512, 8)
