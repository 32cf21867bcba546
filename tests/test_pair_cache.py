"""The pair-score cache: keys, the cross-encoder's identity, the table (write, pinned lookups, eviction), the
Scorer with a cache (no Ray), and rerank runs on a local Ray: cached, uncached and partly cached runs rank alike;
a changed document or another cross-encoder misses exactly what it should."""

from __future__ import annotations

import shutil
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest
from conftest import good_docs, write_jsonl
from test_rerank_job import QUERIES, query_log
from test_score import retrieved

from pipelines import schema as S
from pipelines.config import StorageConfig
from pipelines.report import utcnow
from pipelines.rerank import pair_cache as P
from pipelines.rerank.score import Scorer
from pipelines.store import Store

RANKING = [S.QUERY_ID, S.DOC_IDS, S.SCORES, S.CROSS_ENCODER_SCORES, S.RETRIEVAL_RANKS]


class ThirdsScorer:
    """A hand-built cross-encoder: (query words in the document) / 3, so scores are not exact in float32."""

    def __init__(self):
        self.calls: list[list] = []

    def predict(self, pairs, batch_size=32, **_):
        self.calls.append(list(pairs))
        return np.array([sum(w in doc.split() for w in q.split()) / 3 for q, doc in pairs], dtype=np.float64)


def cache_rows(keys: list[str], *, ce_id: str = "ce@1", days_old: float = 0.0) -> pa.Table:
    n = len(keys)
    return pa.table({P.PAIR_KEY: keys, S.CROSS_ENCODER: [ce_id] * n, S.QUERY: ["q"] * n, P.DOC_ID: ["d"] * n,
                     P.DOC_HASH: ["h"] * n, P.SCORE: pa.array(np.arange(n), pa.float32()), S.RUN_ID: ["r"] * n,
                     P.SCORED_AT: pa.array([utcnow() - timedelta(days=days_old)] * n, S.TIMESTAMP)})


def test_keys_separate_their_parts():
    assert P.pair_key("ce@1", "q", "text") == P.pair_key("ce@1", "q", "text") != P.pair_key("ce@2", "q", "text")
    assert P.pair_key("ce@1", "a b", "c") != P.pair_key("ce@1", "a", "b c")
    assert len(P.pair_key("ce@1", "q", "t")) == len(P.doc_hash("t")) == 32 and P.doc_hash("t") != P.doc_hash("u")


def test_cross_encoder_id_follows_weights_not_the_folder(tiny_cross_encoder, tmp_path):
    import torch
    from sentence_transformers import CrossEncoder

    folder = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder, folder)
    (folder / "README.md").write_text("edited")  # not part of the scoring function
    first = P.cross_encoder_id(str(folder), 64)
    assert first.startswith("reranker@") and first == P.cross_encoder_id(str(folder), 64)
    moved = tmp_path / "elsewhere" / "reranker"
    shutil.copytree(folder, moved)
    assert P.cross_encoder_id(str(moved), 64) == first  # the same model wherever it lies
    assert first != P.cross_encoder_id(str(folder), 32) != P.cross_encoder_id(str(folder), 64, precision="cuda/auto")

    model = CrossEncoder(str(folder), device="cpu")  # "retrained" into the same folder
    with torch.no_grad():
        next(model.model.parameters()).add_(0.01)
    model.save(str(folder))
    assert P.cross_encoder_id(str(folder), 64) != first

    hub = P.cross_encoder_id("some-org/not-in-the-local-cache", None)
    assert hub.startswith("some-org/not-in-the-local-cache@") and hub == P.cross_encoder_id(
        "some-org/not-in-the-local-cache", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no weights"):
        P.cross_encoder_id(str(tmp_path / "empty"), None)


def test_write_is_idempotent_and_lookups_read_the_pinned_version(tmp_path):
    cfg = StorageConfig(uri=str(tmp_path / "db"))
    store = Store(cfg)
    assert P.current_version(store) is None and P.PairCache.open(cfg, None).lookup(["k0"]) == {}
    assert P.write(store, cache_rows(["k0", "k1", "k1"])) == 2  # a repeat within one write is stored once
    pinned = P.current_version(store)
    assert P.write(store, cache_rows(["k0", "k1", "k2"])) == 1  # a rerun adds only what is new
    table = store.open(cfg.pair_scores_table)
    assert table.count_rows() == 3 and table.index_stats(f"{P.PAIR_KEY}_idx").num_unindexed_rows == 0
    assert P.PairCache.open(cfg, pinned).lookup(["k0", "k1", "k2", "nope"]) == {"k0": 0.0, "k1": 1.0}
    assert P.PairCache.open(cfg, P.current_version(store)).lookup(["k2", "nope"]) == {"k2": 2.0}


def test_evict_drops_old_entries_and_other_cross_encoders(tmp_path):
    store = Store(StorageConfig(uri=str(tmp_path / "db")))
    assert P.evict(store, "ce@1", 30) == 0  # no table yet
    P.write(store, pa.concat_tables([cache_rows(["new1", "new2"]), cache_rows(["old"], days_old=31),
                                     cache_rows(["other"], ce_id="ce@0")]))
    assert P.evict(store) == 0
    assert P.evict(store, older_than_days=30) == 1
    assert P.evict(store, ce_id_current="ce@1") == 1
    assert sorted(store.open("pair_scores").to_arrow()[P.PAIR_KEY].to_pylist()) == ["new1", "new2"]


def test_cached_scores_rank_exactly_as_the_model_and_skip_it(tmp_path, tiny_cross_encoder):
    cfg = StorageConfig(uri=str(tmp_path / "db"))
    store = Store(cfg)
    night1 = retrieved([
        ("red apple pie", [("d1", "blue sky"), ("d2", "red apple"), ("d3", "apple"), ("d4", "red apple pie"),
                           ("d5", "pie"), ("d6", "red apple")]),  # d6: the same text as d2
        ("green", [("e1", "green"), ("e2", "grey")]),
        ("nothing found", []),
    ])
    for weight in (None, 0.5):
        uncached = Scorer(ThirdsScorer(), top_n=4, fusion_weight=weight)(night1)
        model = ThirdsScorer()
        first = Scorer(model, top_n=4, fusion_weight=weight, cache_storage=cfg, cache_version=P.current_version(store),
                       cross_encoder_id=f"ce@{weight}")(night1)
        assert [len(pairs) for pairs in model.calls] == [7]  # one call, identical pairs once
        assert first[P.PAIRS_SCORED].to_pylist() == [5, 2, 0] and first[P.PAIRS_CACHED].to_pylist() == [1, 0, 0]
        P.write(store, P.new_pairs(first, f"ce@{weight}", "run-1", utcnow()))

        model = ThirdsScorer()
        second = Scorer(model, top_n=4, fusion_weight=weight, cache_storage=cfg,
                        cache_version=P.current_version(store), cross_encoder_id=f"ce@{weight}")(night1)
        assert model.calls == [] and second[P.PAIRS_SCORED].to_pylist() == [0, 0, 0]
        assert second[P.NEW_KEYS].to_pylist() == [[], [], []]
        assert uncached.select(RANKING).equals(first.select(RANKING))
        assert uncached.select(RANKING).equals(second.select(RANKING))

    night2 = retrieved([("green", [("e1", "green"), ("e2", "grey"), ("e3", "green green")])])
    model = ThirdsScorer()
    out = Scorer(model, cache_storage=cfg, cache_version=P.current_version(store), cross_encoder_id="ce@None")(night2)
    assert model.calls == [[("green", "green green")]] and out[P.NEW_DOC_IDS].to_pylist() == [["e3"]]
    assert out[P.NEW_DOC_HASHES].to_pylist() == [[P.doc_hash("green green")]]
    assert out.select(RANKING).equals(Scorer(ThirdsScorer())(night2).select(RANKING))  # partly cached, same ranking
    P.write(store, P.new_pairs(out, "ce@None", "run-2", utcnow()))

    # a night where every pair is cached never loads the model
    lazy = Scorer(tiny_cross_encoder, device="cpu", cache_storage=cfg, cache_version=P.current_version(store),
                  cross_encoder_id="ce@None")
    lazy(night2)
    assert lazy._model is None
    with pytest.raises(ValueError, match="cross_encoder_id"):
        Scorer(ThirdsScorer(), cache_storage=cfg)


def test_a_retrained_cross_encoder_misses_every_pair(tmp_path, tiny_cross_encoder):
    import torch
    from sentence_transformers import CrossEncoder

    cfg, folder = StorageConfig(uri=str(tmp_path / "db")), tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder, folder)
    batch = retrieved([("cell protein", [("a", "cell protein data"), ("b", "brain"), ("c", "gene model")]),
                       ("brain data", [("a", "cell protein data"), ("b", "brain")])])

    def night() -> pa.Table:
        ce_id = P.cross_encoder_id(str(folder), None, precision="cpu/auto")
        out = Scorer(str(folder), device="cpu", cache_storage=cfg, cache_version=P.current_version(Store(cfg)),
                     cross_encoder_id=ce_id)(batch)
        P.write(Store(cfg), P.new_pairs(out, ce_id, "run", utcnow()))
        return out

    assert night()[P.PAIRS_SCORED].to_pylist() == [3, 2]
    assert night()[P.PAIRS_SCORED].to_pylist() == [0, 0]
    model = CrossEncoder(str(folder), device="cpu")
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(str(folder))  # retrained into the same folder
    assert night()[P.PAIRS_SCORED].to_pylist() == [3, 2]


# -- rerank runs on a local Ray ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_module():
    import ray

    from pipelines.cluster.runtime import start_local_ray

    start_local_ray(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.ray
def test_rerank_runs_reuse_cached_pairs_and_rank_alike(tmp_path, make_config, tiny_cross_encoder, ray_module):
    from pipelines.index import job as index
    from pipelines.rerank import job as rerank

    docs = good_docs(12)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    log = query_log(tmp_path / "log.jsonl", bad=False)

    def cfg(**rerank_cfg):  # BM25 candidates (no bi-encoder to load: faster runs), all of them kept
        return make_config(tmp_path / "docs.jsonl", query_log={"path": str(log)},
                           retrieve={"k": len(docs), "source": "fts"},
                           rerank={"model": tiny_cross_encoder, "top_n": len(docs), "actors": 1,
                                   "carry_over": False, **rerank_cfg})

    index.run(cfg())
    store = Store(cfg().storage)
    # fills the cache; a second night with nothing changed; the same without the cache
    filled, cached, uncached = rerank.run(cfg()), rerank.run(cfg()), rerank.run(cfg(cache=False))
    pairs = filled["pairs"]["total"]
    assert pairs > 2 * len(QUERIES)
    assert [r["pairs"]["scored"] for r in (filled, cached, uncached)] == [pairs, 0, pairs]
    assert cached["pairs"] == {"total": pairs, "scored": 0, "cached": pairs, "per_second": 0.0,
                               "per_second_end_to_end": 0.0}
    assert filled["cache"]["pairs_written"] == pairs and cached["cache"]["pairs_written"] == 0
    assert uncached["cache"] == {"enabled": False, "table": "pair_scores", "version_read": None, "pairs_written": 0}
    assert f"pairs: {pairs:,} total = 0 scored + {pairs:,} from cache;" in rerank.summary(cached)
    assert f"pairs: {pairs:,} total = {pairs:,} scored + 0 from cache (rerank.cache off)" in rerank.summary(uncached)
    assert filled["models"]["cross_encoder_id"] == cached["models"]["cross_encoder_id"]
    rankings = [store.rankings(r["run_id"]).to_arrow().select(RANKING).sort_by(S.QUERY_ID)
                for r in (filled, cached, uncached)]
    assert rankings[0].equals(rankings[1]) and rankings[0].equals(rankings[2])
    # with carry-over, a night on the same passages and settings keeps every ranking: nothing retrieved or scored
    carried = rerank.run(cfg(carry_over=True))
    assert carried["queries"]["carried_over"] == carried["queries"]["selected"] == carried["queries"]["ranked"]
    assert carried["pairs"]["total"] == 0 and "carried over" in rerank.summary(carried)
    assert store.rankings(carried["run_id"]).to_arrow().select(RANKING).sort_by(S.QUERY_ID).equals(rankings[0])
    assert store.open("pair_scores").count_rows() == pairs
    for table in (store.passages(), store.open("pair_scores")):  # the versions read were leased, then released
        assert not [t for t in table.tags.list() if t.startswith("lease-")]

    docs[3]["text"] = "brain data and cell protein, rewritten"  # d3 was about brain data
    write_jsonl(tmp_path / "docs.jsonl", docs)
    index.run(cfg())
    changed = rerank.run(cfg())
    with_d3 = sum("d3" in ids for ids in store.rankings(changed["run_id"]).to_arrow()[S.DOC_IDS].to_pylist())
    assert with_d3 >= 2 and changed["pairs"]["scored"] == with_d3  # the changed document's pairs, nothing else
    fresh = store.open("pair_scores").search().where(f"{S.RUN_ID} = '{changed['run_id']}'").to_arrow()
    assert fresh[P.DOC_ID].to_pylist() == ["d3"] * with_d3


def test_pairs_are_keyed_by_the_precision_the_scorer_runs_at(tmp_path, tiny_cross_encoder, caplog):
    """The driver keys the cache by the precision it takes the actors to run at; an actor on a GPU the driver lacks
    (bf16 or fp16), a CPU with other bf16 support or an ONNX backend falling back to torch runs another. The
    scorer keys its lookups and its new pairs by what it runs (and says so); when the driver was right it keeps the
    driver's id as given (no second hash of the weights)."""
    import logging

    from pipelines.models import pick_device
    from pipelines.rerank.carry_over import precision_of

    cfg = StorageConfig(uri=str(tmp_path / "db"))
    here = precision_of("torch", "auto", pick_device("cpu"))  # what runs in this process
    given = P.cross_encoder_id(tiny_cross_encoder, None, precision="cuda/bfloat16")  # a GPU the driver guessed
    batch = retrieved([("red apple pie", [("d1", "red apple"), ("d2", "pie")])])
    with caplog.at_level(logging.WARNING, logger="batchrank.rerank"):
        stage = Scorer(tiny_cross_encoder, top_n=2, device="cpu", cache_storage=cfg, cache_version=None,
                       cross_encoder_id=given, precision="cuda/bfloat16")
    actual = P.cross_encoder_id(tiny_cross_encoder, None, precision=here)
    assert stage.cross_encoder_id == actual != given and f"runs here as {here}" in caplog.text
    out = stage(batch)
    rows = P.new_pairs(out, given, "run-1", utcnow())  # the sink's id is the driver's: the batch's wins
    assert set(rows[S.CROSS_ENCODER].to_pylist()) == {actual} and rows.num_rows == 2
    assert set(rows[P.PAIR_KEY].to_pylist()) == {P.pair_key(actual, "red apple pie", t) for t in ("red apple", "pie")}
    right = Scorer(tiny_cross_encoder, top_n=2, device="cpu", cache_storage=cfg, cache_version=None,
                   cross_encoder_id="driver-id@0", precision=here)
    assert right.cross_encoder_id == "driver-id@0"
