"""The rerank job end to end on a local Ray: query log → retrieve → cross-encoder → rankings; lookups;
atomic publish (a failure or a SIGKILL mid-run leaves the previous rankings readable); refusals.
Tiny random models: order is tested on the stage (tests/test_score.py), plumbing here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import good_docs, write_jsonl

from pipelines.index import job as index
from pipelines.lookup import Rankings
from pipelines.rerank import job as rerank
from pipelines.store import Store, StoreError

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["cell protein", "Cancer  Risk", "vitamin study", "brain data", "gene model", "protein gene"]


@pytest.fixture(scope="module", autouse=True)
def _ray():
    import ray

    from pipelines.cluster.runtime import start_local_ray

    start_local_ray(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


def query_log(path: Path, queries=QUERIES, repeats=3, bad=True) -> Path:
    rows: list = [{"query": q, "timestamp": f"2026-11-{20 + i % 5:02d}T10:00:00Z", "user": f"u{i}"}
                  for i in range(repeats * len(queries)) for q in [queries[i % len(queries)]]]
    if bad:
        rows += ['{"query": "broken', {"query": "no time"}, {"query": " ", "timestamp": "2026-11-21"}]
    return write_jsonl(path, rows)


@pytest.fixture
def setup(tmp_path, make_config, tiny_cross_encoder):
    """A passages table of 40 docs, and a function making rerank configs over it."""
    write_jsonl(tmp_path / "docs.jsonl", good_docs(40))

    def cfg(log: Path, **overrides):
        sections = {"query_log": {"path": str(log)}, "retrieve": {"k": 8},
                    "rerank": {"model": tiny_cross_encoder, "top_n": 5, "actors": 1, "batch_size": 16,
                               "carry_over": False}}  # every run ranks every query: these tests are about that path
        for name, values in overrides.items():
            sections.setdefault(name, {}).update(values)
        return make_config(tmp_path / "docs.jsonl", **sections)

    index.run(cfg(tmp_path / "unused.jsonl"))
    return cfg


def test_rerank_publishes_rankings_that_lookups_read(tmp_path, setup):
    cfg = setup(query_log(tmp_path / "log.jsonl"))
    report = rerank.run(cfg)
    assert report["status"] == "succeeded"
    ql, q = report["query_log"], report["queries"]
    assert ql["lines_read"] == 21 and ql["lines_counted"] == 18 and ql["lines_quarantined"] == 3
    assert ql["lines_reconciled"] and ql["quarantine_reasons"] == {"bad_json": 1, "empty_query": 1,
                                                                    "missing_timestamp": 1}
    assert q == {"selected": 6, "ranked": 6, "scored_not_published": 0, "carried_over": 0, "without_candidates": 0,
                 "fewer_than_k_candidates": 0, "reconciled": True}
    assert report["pairs"]["scored"] == 6 * 8 and report["pairs"]["per_second"] > 0
    assert json.loads(Path(report["report_path"]).read_text())["run_id"] == report["run_id"]
    assert "6 selected, 6 ranked" in rerank.summary(report)

    store = Store(cfg.storage)
    table = store.rankings()
    rows = table.to_arrow().to_pylist()
    assert len(rows) == 6 and len({r["query_id"] for r in rows}) == 6
    passages = set(store.passages().to_arrow()["id"].to_pylist())
    for r in rows:
        assert len(r["doc_ids"]) == 5 and set(r["doc_ids"]) <= passages and len(set(r["doc_ids"])) == 5
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert all(1 <= rank <= 8 for rank in r["retrieval_ranks"]) and r["candidates"] == 8
        assert r["count"] == 3 and r["run_id"] == report["run_id"]
        assert r["passages_version"] == store.passages().version and r["cross_encoder"] == cfg.rerank.model
    assert store.rankings(report["run_id"]).version == table.version  # tagged with the run id
    quarantined = store.quarantine(report["run_id"]).to_pylist()
    assert {r["reason_code"] for r in quarantined} == {"bad_json", "empty_query", "missing_timestamp"}
    assert {r["job"] for r in quarantined} == {"rerank"}

    rankings = Rankings(cfg)
    hit = rankings.lookup("  CANCER risk ")  # normalised the same way as the log
    assert hit is not None and hit.normalized == "cancer risk" and hit.count == 3
    assert [h.id for h in hit.hits] == next(r["doc_ids"] for r in rows if r["query"] == "cancer risk")
    assert all(h.title and h.text for h in hit.hits)
    assert rankings.lookup("never searched") is None
    many = rankings.lookup_many(["gene model", "nope", "Cell Protein"], n=2)
    assert many[1] is None and [len(m.hits) for m in (many[0], many[2])] == [2, 2]

    from typer.testing import CliRunner

    from pipelines.cli import app

    config_file = tmp_path / "job.yaml"
    config_file.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    ok = CliRunner().invoke(app, ["lookup", "--config", str(config_file), "Brain DATA", "-n", "3"])
    assert ok.exit_code == 0, ok.output
    assert "'brain data'" in ok.output and ok.output.count("retrieval #") == 3
    miss = CliRunner().invoke(app, ["lookup", "--config", str(config_file), "brain data", "unknown query"])
    assert miss.exit_code == 1 and "no precomputed ranking for this query: 'unknown query'" in miss.output
    as_json = CliRunner().invoke(app, ["lookup", "--config", str(config_file), "--json", "gene model"])
    assert json.loads(as_json.stdout.splitlines()[0])["found"] is True


def test_the_driver_and_the_actor_pools_rank_alike(tmp_path, setup):
    """A run small enough (``rerank.local_max_pairs``) retrieves and scores on the driver, with no actor pool to
    start; the same queries through the two actor pools get the same rankings and scores."""
    log = query_log(tmp_path / "log.jsonl")
    local = rerank.run(setup(log, rerank={"cache": False}))  # every pair scored by both
    store = Store(setup(log).storage)
    on_driver = {r["query_id"]: r for r in store.rankings().to_arrow().to_pylist()}
    pools = rerank.run(setup(log, rerank={"cache": False, "local_max_pairs": 0, "actors": 2}))
    by_actors = {r["query_id"]: r for r in store.rankings().to_arrow().to_pylist()}
    assert (local["ranked_on"], pools["ranked_on"]) == ("driver", "actors")
    assert "actors" not in local and pools["actors"]["score"]["restarts"] == 0
    assert local["pairs"]["scored"] == pools["pairs"]["scored"] == 6 * 8
    for report in (local, pools):  # the fixed cost before the first scored pair, on either path
        first = {k: v["since_process_start_s"] for k, v in report["first"].items()}
        assert 0 < first["ray_up"] <= first["pipeline_started"] <= first["first_scored_pair"], first
    assert on_driver.keys() == by_actors.keys() and len(on_driver) == 6
    for qid, row in on_driver.items():
        assert row["doc_ids"] == by_actors[qid]["doc_ids"]
        assert row["scores"] == pytest.approx(by_actors[qid]["scores"], abs=1e-5)


def test_failure_mid_run_leaves_the_previous_rankings_readable(tmp_path, setup, monkeypatch):
    first_cfg = setup(query_log(tmp_path / "v1.jsonl", QUERIES[:3], bad=False))
    first = rerank.run(first_cfg)
    store = Store(first_cfg.storage)
    before = store.rankings().version

    second_cfg = setup(query_log(tmp_path / "v2.jsonl", QUERIES, bad=False), rerank={"queries_per_call": 1})
    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "mid_run")
    with pytest.raises(RuntimeError, match="failpoint 'mid_run'") as info:
        rerank.run(second_cfg)
    failed = info.value.batchrank_report
    assert failed["status"] == "failed" and failed["queries"]["ranked"] == 0
    assert failed["tables"]["rankings"]["current"]["version"] == before
    assert "unchanged" in rerank.summary(failed)
    assert store.rankings().version == before and store.rankings().count_rows() == 3
    assert Rankings(first_cfg).lookup("cell protein").run_id == first["run_id"]
    assert not [n for n in store.table_names() if n.startswith("_staging")]

    monkeypatch.delenv("BATCHRANK_FAILPOINTS")
    second = rerank.run(second_cfg)
    assert store.rankings().count_rows() == 6 and second["tables"]["rankings"]["previous_version"] == before
    assert store.rankings(first["run_id"]).count_rows() == 3  # the old set stays readable by its tag
    assert Rankings(second_cfg).lookup("gene model").run_id == second["run_id"]
    assert Rankings(second_cfg, version=first["run_id"]).lookup("gene model") is None


def test_hybrid_candidates_fusion_and_head_selection(tmp_path, setup):
    cfg = setup(query_log(tmp_path / "log.jsonl"), retrieve={"source": "hybrid"}, query_log={"head": 2},
                rerank={"fusion": {"cross_encoder": 0.25}})
    report = rerank.run(cfg)
    assert report["queries"]["selected"] == 2 and report["query_log"]["beyond_head"] == 4
    assert report["retrieve"]["source"] == "hybrid"
    assert report["fusion"] == {"cross_encoder_weight": 0.25, "origin": "config"}
    assert "0.25 x cross-encoder + 0.75 x first stage" in rerank.summary(report)
    rows = Store(cfg.storage).rankings().to_arrow().to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert row["fusion_weight"] == 0.25 and row["scores"] == sorted(row["scores"], reverse=True)
        assert len(row["cross_encoder_scores"]) == len(row["doc_ids"]) == 5
        # hybrid candidates carry convex-fusion scores: 0.5 x min-max scaled cosine + 0.5 x scaled BM25
        assert all(0 <= s <= 1 + 1e-6 for s in row["retrieval_scores"])
        assert max(row["retrieval_scores"]) >= 0.5 - 1e-6  # each list's best scores 0.5 from that list alone


def test_refusals_name_the_fix(tmp_path, setup):
    log = query_log(tmp_path / "log.jsonl")
    with pytest.raises(StoreError, match="queries must be embedded by the same model"):
        rerank.run(setup(log, embed={"model": "some-other-model"}))
    with pytest.raises(rerank.RerankError, match="no query selected from the log.*previous rankings stay"):
        rerank.run(setup(log, query_log={"since": "2030-01-01"}))
    with pytest.raises(rerank.RerankError, match="train-reranker"):
        rerank.run(setup(log, rerank={"model": str(tmp_path / "no-such-model")}))
    assert Store(setup(log).storage).open("rankings") is None  # nothing was ever published


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def test_a_run_killed_mid_way_keeps_the_previous_version_and_a_rerun_completes(tmp_path, setup):
    first_cfg = setup(query_log(tmp_path / "v1.jsonl", QUERIES[:2], bad=False))
    rerank.run(first_cfg)
    store = Store(first_cfg.storage)
    before = store.rankings().version

    cfg = setup(query_log(tmp_path / "v2.jsonl", QUERIES, bad=False), rerank={"queries_per_call": 1})
    config_file = tmp_path / "job.yaml"
    config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, "BATCHRANK_FAILPOINTS": "mid_run:hang", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.rerank", "--config", str(config_file)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:
            if "failpoint 'mid_run' reached" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "the job ended before reaching mid-run"
        staging = [n for n in store.table_names() if n.startswith("_staging-rankings")]
        assert staging, "rows should be staged when the job is killed"
    finally:
        _kill_tree(proc)
    assert store.rankings().version == before and store.rankings().count_rows() == 2
    assert Rankings(first_cfg).lookup("cell protein") is not None

    again = rerank.run(cfg)
    assert again["status"] == "succeeded" and store.rankings().count_rows() == 6
    rows = store.rankings().to_arrow()
    assert len(set(rows["query_id"].to_pylist())) == 6  # complete, no duplicates
