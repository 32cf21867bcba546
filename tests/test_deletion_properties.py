"""Property: a snapshot deletes only documents it proves absent. Whatever damage a snapshot file takes (lines cut,
bytes flipped, the file truncated, lines removed), an id that still appears in the file's bytes is never deleted:
either its row is read (and kept), or some row could not be read and every deletion is withheld. Ray-free: the
index job's own readers (``read_local``), sink and deletion decision."""

from __future__ import annotations

import json
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import parse_config
from pipelines.index import job as index
from pipelines.index.corpus import read_local
from pipelines.index.deletions import deletions

EXAMPLES = 1500 if os.environ.get("BATCHRANK_HYPOTHESIS_PROFILE") == "long" else 40

ids = st.one_of(st.from_regex(r"d[0-9]{1,4}", fullmatch=True),
                st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip),
                st.builds(lambda n: "https://example.org/" + "x" * n, st.integers(150, 400)))


@st.composite
def damaged_snapshots(draw):
    doc_ids = draw(st.lists(ids, min_size=1, max_size=25, unique=True))
    lines = [json.dumps({"_id": i, "title": "t", "text": f"text of {i!r}"}, ensure_ascii=draw(st.booleans()))
             for i in doc_ids]
    kept = [ln for ln in lines if draw(st.integers(0, 4))]  # some documents really removed
    data = bytearray(("\n".join(kept) + "\n").encode())
    for _ in range(draw(st.integers(0, 3))):  # bytes flipped
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()) and data:  # truncated (a torn last line)
        data = data[: draw(st.integers(0, len(data)))]
    return doc_ids, bytes(data)


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None)
@given(damaged_snapshots(), st.integers(1, 8), st.booleans())
def test_an_id_still_in_the_snapshot_is_never_deleted(snapshot, rows_per_block, allow):
    doc_ids, data = snapshot
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "c.jsonl")
        with open(path, "wb") as fh:
            fh.write(data)
        cfg = parse_config({"storage": {"uri": os.path.join(folder, "db")},
                            "corpus": {"path": path, "format": "jsonl", "rows_per_block": rows_per_block,
                                       "max_delete_fraction": 1, "delete_despite_unreadable": allow},
                            "embed": {"model": "never-loaded"}})
        state = index._RunState("run", "model")
        known = {i: "old hash" for i in doc_ids}  # every document was in passages after the last good run
        state.known = state.ids.load_pairs(known)
        held: set[str] = set()  # every id an input row holds, good or bad
        for batch in read_local(cfg):
            held.update(i for i in batch["id"].to_pylist() if i is not None)
            state.sink.plan(batch)
        deleted = deletions(cfg, state)
    present = [i for i in doc_ids if json.dumps(i).encode() in data or json.dumps(i, ensure_ascii=False).encode()
               in data]
    gone = set(known) - held
    if not allow:
        assert not set(deleted) & set(present), "a document still in the snapshot was deleted"
        if state.sink.unidentified and gone:
            assert deleted == [] and state.report["deletions_withheld"]["documents"] == len(gone)
    else:
        assert set(deleted) == gone  # allowed: exactly the ids no row holds
