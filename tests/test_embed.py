"""The embed stage called directly on a hand-made batch (no Ray), with a tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.index.embed import Embedder
from pipelines.index.validate import Malformed, RowSpec, validate_records


def test_embedder_maps_batch_to_batch(tiny_model):
    spec = RowSpec(model=tiny_model)
    batch = validate_records([(1, {"_id": "a", "text": "cell protein"}), (2, Malformed("bad_json", "x", "{")),
                              (3, {"_id": "b", "text": "cancer risk", "title": "gene"})], spec, source="s")
    stage = Embedder(tiny_model, batch_size=2)
    out = stage(batch)
    assert out.num_rows == 3 and "_embed_input" not in out.column_names
    vecs = out["vector"].to_pylist()  # per document, one vector per passage
    assert vecs[1] is None  # bad rows pass through without a vector
    assert len(vecs[0]) == len(vecs[2]) == 1  # short documents are one passage each
    assert out["_spans_start"].to_pylist() == [[0], None, [0]] and out["_spans_end"].to_pylist() == [[12], None, [11]]
    good = np.array([vecs[0][0], vecs[2][0]], dtype=np.float32)
    assert good.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(good, axis=1), 1.0, rtol=1e-5)
    assert out["_seconds"][0].as_py() > 0
    plain = stage.model.encode(["cell protein", "gene cancer risk"], normalize_embeddings=True)
    np.testing.assert_allclose(good, plain, atol=1e-5)  # same vectors as plain encode


def test_delete_markers_pass_through_without_a_vector(tiny_model):
    spec = RowSpec(model=tiny_model, deleted_field="deleted")
    batch = validate_records([(1, {"_id": "a", "text": "cell protein"}), (2, {"_id": "b", "deleted": True}),
                              (3, {"_id": "c", "text": "brain data", "deleted": False}),
                              (4, {"_id": "d", "deleted": "yes"})], spec, source="s")
    assert batch["_deleted"].to_pylist() == [None, True, None, None]
    assert batch["reason_code"].to_pylist() == [None, None, None, "bad_deleted_flag"]
    stage = Embedder(tiny_model)
    seen: list[str] = []
    real = stage.encode
    stage.encode = lambda texts: seen.extend(texts) or real(texts)
    out = stage(batch)
    assert seen == ["cell protein", "brain data"]  # the marker and the bad row never reach the model
    vectors = out["vector"].to_pylist()
    assert vectors[1] is None and vectors[3] is None and vectors[0] is not None and vectors[2] is not None


def test_embedder_all_bad_batch(tiny_model):
    batch = validate_records([(1, Malformed("bad_json", "x", "{"))], RowSpec(), source="s")
    out = Embedder(tiny_model)(batch)
    assert out["vector"].to_pylist() == [None]


def test_device_and_dtype_fall_back_to_cpu(tiny_model):
    import torch

    from pipelines.models import autocast_dtype, pick_device, pick_dtype, precision_label
    from pipelines.models.batching import cpu_supports_bf16

    if not torch.cuda.is_available():
        assert pick_device("cuda") == "cpu"
        assert pick_device("auto") in ("cpu", "mps")
    # weights stay fp32 on CPU; reduced precision there is bf16 autocast, only where the CPU runs it natively
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("float16", "cpu") == torch.float32  # fp16 on CPU is slow and lossy
    assert pick_dtype("bfloat16", "cpu") == torch.float32
    native = torch.bfloat16 if cpu_supports_bf16() else None
    assert autocast_dtype("auto", "cpu") is native and autocast_dtype("bfloat16", "cpu") is native
    assert autocast_dtype("float32", "cpu") is None and autocast_dtype("auto", "cuda") is None
    assert precision_label("float32", "cpu") == "cpu/float32"
    assert precision_label("auto", "cpu") == "cpu/float32" + ("/bfloat16-autocast" if native else "")


def test_max_seq_length_applies(tiny_model):
    stage = Embedder(tiny_model, max_seq_length=16)
    assert stage.model.max_seq_length == 16


@pytest.mark.gpu
def test_embedder_on_gpu_half_precision(tiny_model):
    import torch

    stage = Embedder(tiny_model, device="cuda", dtype="auto")
    assert next(stage.model.model.parameters()).dtype in (torch.float16, torch.bfloat16)
    batch = validate_records([(1, {"_id": "a", "text": "cell protein"})], RowSpec(), source="s")
    vec = np.array(stage(batch)["vector"].to_pylist()[0], dtype=np.float32)
    assert abs(np.linalg.norm(vec) - 1) < 1e-2


def test_actors_without_a_gpu_reservation_stay_on_cpu():
    from pipelines.cluster.runtime import actor_device as _actor_device

    assert _actor_device("auto", 0) == "cpu" and _actor_device("cuda", 0) == "cpu"
    assert _actor_device("auto", 1) == "cuda" and _actor_device("auto", 0.5) == "cuda"
    assert _actor_device("mps", 0) == "mps"


def test_more_gpu_actors_than_gpus_are_refused_locally_and_said_on_a_cluster(caplog):
    """Actors asking for GPUs the cluster lacks used to wait without a word: on a local machine (no autoscaler)
    the run is refused naming the fix; on a cluster a warning says they wait for GPU nodes."""
    import logging

    from pipelines.cluster.runtime import Cluster, pool_resources

    pools = {"retrieve": (1, 1.0, 0.5), "rerank": (2, 1.0, 1.0)}  # 2.5 GPUs
    local = Cluster("local", True, 16, 2, 1)
    with pytest.raises(ValueError, match=r"ask for 2.5 GPUs .*has 2: .*gpus_per_actor"):
        pool_resources(local, pools)
    assert pool_resources(Cluster("local", True, 16, 3, 1), pools) == {"retrieve": (1.0, 0.5), "rerank": (1.0, 1.0)}
    with caplog.at_level(logging.WARNING, logger="batchrank"):
        assert pool_resources(Cluster("ray://head:10001", False, 16, 2, 2), pools)["rerank"] == (1.0, 1.0)
    assert "wait until the autoscaler adds GPU nodes" in caplog.text


def test_bf16_only_where_the_gpu_runs_it_natively(monkeypatch, caplog):
    """``torch.cuda.is_bf16_supported()`` counts emulation: a card before Ampere got slow emulated bf16. Now auto
    picks bf16 only where it is native, fp16 elsewhere; bfloat16 asked of such a card runs fp16, said."""
    import logging

    import torch

    from pipelines.models import pick_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    native = {"v": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native["v"] or including_emulation)
    with caplog.at_level(logging.WARNING, logger="pipelines.models"):
        assert pick_dtype("auto", "cuda") is torch.float16
        assert pick_dtype("bfloat16", "cuda") is torch.float16 and "emulated" in caplog.text
    native["v"] = True
    assert pick_dtype("auto", "cuda") is torch.bfloat16 and pick_dtype("bfloat16", "cuda") is torch.bfloat16
    assert pick_dtype("float32", "cuda") is torch.float32 and pick_dtype("auto", "cpu") is torch.float32
