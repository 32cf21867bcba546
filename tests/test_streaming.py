"""How the jobs' drivers take a Ray Data stream: each block as soon as it is made (on one node)."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from pipelines.cluster.runtime import Cluster

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_per_module")]


def test_one_node_stream_hands_over_a_block_before_the_next_is_made(tmp_path):
    """Ray Data's prefetching yields a block only once the next one has arrived: the driver then got its first
    embedded row (or scored pair) a whole call late. Here the second block is only made once the driver holds the
    first; with prefetching, it would wait out its deadline instead."""
    import ray.data

    gate = tmp_path / "first-block-received"

    def make(batch: pa.Table) -> pa.Table:
        opened = True
        if batch["i"][0].as_py() == 1:  # the second block
            deadline = time.monotonic() + 20
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            opened = gate.exists()
        return batch.append_column("gate_open", pa.array([opened] * batch.num_rows))

    ds = ray.data.from_arrow([pa.table({"i": [0]}), pa.table({"i": [1]})]).map_batches(
        make, batch_format="pyarrow", batch_size=None, num_cpus=0.5)
    received = []
    for batch in Cluster("local", True, 2.0, 0.0, nodes=1).stream(ds):
        received.append(batch)
        gate.touch()
    table = pa.concat_tables(received)
    assert sorted(table["i"].to_pylist()) == [0, 1]
    assert all(table["gate_open"].to_pylist()), "the first block reached the driver only after the second was made"
