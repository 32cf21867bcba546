"""File parsers: malformed lines become quarantined rows, never crashes. No Ray needed."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.files import detect_format, iter_csv_records, iter_jsonl_records, iter_parquet_records
from pipelines.index.corpus import blocks, expand_paths
from pipelines.index.validate import Malformed, RowSpec


def test_jsonl_lines_bad_json_and_bad_utf8():
    data = b'{"_id": "a", "text": "x"}\n\n{"_id": "b", \n\xff\xfe{"_id": "c"}\r\n{"_id": "d", "text": "last"}'
    recs = list(iter_jsonl_records(io.BytesIO(data)))
    assert [n for n, _ in recs] == [1, 3, 4, 5]  # blank line 2 is not a row
    assert recs[0][1] == {"_id": "a", "text": "x"}
    assert isinstance(recs[1][1], Malformed) and recs[1][1].code == "bad_json"
    assert isinstance(recs[2][1], Malformed) and recs[2][1].code == "bad_utf8"
    assert recs[3][1]["text"] == "last"  # no trailing newline


def test_jsonl_streams_across_chunk_boundaries(monkeypatch):
    from pipelines import files

    monkeypatch.setattr(files, "_CHUNK", 7)
    data = b"".join(f'{{"_id": "{i}", "text": "t{i}"}}\n'.encode() for i in range(50))
    recs = list(iter_jsonl_records(io.BytesIO(data)))
    assert [r["_id"] for _, r in recs] == [str(i) for i in range(50)]


def test_csv_bad_rows_and_string_ids():
    data = b'_id,title,text\n001,T1,"first, with comma"\n002,T2\n003,T3,"multi\nline"\n004,T4,x,extra\n'
    recs = list(iter_csv_records(io.BytesIO(data), ["_id", "title", "text"]))
    good = [r for _, r in recs if not isinstance(r, Malformed)]
    bad = [r for _, r in recs if isinstance(r, Malformed)]
    assert [r["_id"] for r in good] == ["001", "003"]  # ids stay strings, leading zeros kept
    assert good[1]["text"] == "multi\nline"
    assert len(bad) == 2 and {b.code for b in bad} == {"bad_csv_row"}
    assert any("002" in b.raw for b in bad)


def test_parquet_reader_and_wrong_types(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"_id": [1, 2], "text": ["a", "b"]}), path)
    with open(path, "rb") as f:
        recs = list(iter_parquet_records(f, ["_id", "text", "title"], 10))
    table = pa.concat_tables(blocks(iter(recs), RowSpec(), "c.parquet", 10))
    assert table["reason_code"].to_pylist() == ["bad_id_type", "bad_id_type"]


def test_blocks_cut_by_row_count():
    recs = iter([(i, {"_id": str(i), "text": "t"}) for i in range(10)])
    sizes = [t.num_rows for t in blocks(recs, RowSpec(), "s", 4)]
    assert sizes == [4, 4, 2]


def test_detect_format_and_expand(tmp_path):
    assert detect_format(["a/b.jsonl"]) == "jsonl" and detect_format(["x.parquet"]) == "parquet"
    assert detect_format(["x.csv.gz"]) == "csv" and detect_format(["x.txt"]) == "unknown"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "p1.jsonl").write_text("{}\n")
    (tmp_path / "d" / "p2.jsonl").write_text("{}\n")
    assert detect_format([str(tmp_path / "d")]) == "jsonl"
    assert len(expand_paths(str(tmp_path / "d" / "*.jsonl"))) == 2
    with pytest.raises(FileNotFoundError, match="matched no files"):
        expand_paths(str(tmp_path / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_paths(str(tmp_path / "missing.jsonl"))
    assert expand_paths("s3://bucket/corpus/") == ["s3://bucket/corpus/"]


def test_uri_globs_expand_with_glob_semantics(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.jsonl", "c.csv", "sub/d.jsonl"):
        (tmp_path / name).write_text("{}\n")
    base = f"file://{tmp_path}"
    assert expand_paths(f"{base}/*.jsonl") == [f"{base}/a.jsonl", f"{base}/b.jsonl"]
    assert expand_paths(f"{base}/**/*.jsonl") == [f"{base}/a.jsonl", f"{base}/b.jsonl", f"{base}/sub/d.jsonl"]
    with pytest.raises(FileNotFoundError, match="matched no files"):
        expand_paths(f"{base}/*.parquet")


def test_cpu_calls_hold_more_rows_of_short_texts(tmp_path):
    """A CPU embedding call is sized by the corpus's first rows: 256 abstracts, up to 2,048 short texts (a call of 256
    short texts sorts into too few batches of like length); rows_per_call as set, and GPUs, keep their own sizes."""
    import json

    from pipelines.config import parse_config
    from pipelines.index.corpus import mean_input_chars

    def config(rows, **embed):
        path = tmp_path / f"c{len(rows[0]['text'])}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return parse_config({"storage": {"uri": str(tmp_path / "db")}, "corpus": {"path": str(path)},
                             "embed": {"model": "x", **embed}})

    short = config([{"_id": f"q{i}", "text": f"what is query {i}"} for i in range(2000)])
    long = config([{"_id": f"d{i}", "title": "A title", "text": "word " * 300} for i in range(50)])
    chars = mean_input_chars(short)
    assert 15 <= chars <= 20  # the embedding input: 'what is query N' (no title)
    assert short.embed.call_rows(0, chars) == 2048 and long.embed.call_rows(0, mean_input_chars(long)) == 256
    assert short.embed.call_rows(1, chars) == 4096 and short.embed.call_rows(0, None) == 256
    assert config([{"_id": "a", "text": "x"}], rows_per_call=100).embed.call_rows(0, chars) == 100
