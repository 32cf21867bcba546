"""Row validation, one test per kind of bad row. Pure functions: no Ray, no LanceDB."""

from __future__ import annotations

import pytest

from pipelines.index.validate import BadRow, Malformed, RowSpec, check_record, validate_records

SPEC = RowSpec(metadata={"year": "int", "score": "float", "open": "bool", "journal": "string"},
               max_text_chars=50, model="m")


def code_of(rec, **kw) -> str:
    with pytest.raises(BadRow) as info:
        check_record(rec, SPEC, **kw)
    return info.value.code


@pytest.mark.parametrize(
    "rec, code",
    [
        (["not", "an", "object"], "not_an_object"),
        (42, "not_an_object"),
        ({"text": "t"}, "missing_id"),
        ({"_id": None, "text": "t"}, "missing_id"),
        ({"_id": 7, "text": "t"}, "bad_id_type"),
        ({"_id": "  ", "text": "t"}, "empty_id"),
        ({"_id": "a"}, "missing_text"),
        ({"_id": "a", "text": None}, "missing_text"),
        ({"_id": "a", "text": ["t"]}, "bad_text_type"),
        ({"_id": "a", "text": " \n\t"}, "empty_text"),
        ({"_id": "a", "text": "x" * 51}, "text_too_long"),
        ({"_id": "a", "text": "t", "title": 3}, "bad_title_type"),
        ({"_id": "a", "text": "t", "year": "2020"}, "bad_metadata"),
        ({"_id": "a", "text": "t", "year": True}, "bad_metadata"),
        ({"_id": "a", "text": "t", "score": float("nan")}, "bad_metadata"),
        ({"_id": "a", "text": "t", "score": float("inf")}, "bad_metadata"),
        ({"_id": "a", "text": "bad \ud800 surrogate"}, "bad_unicode"),
        (Malformed("bad_json", "line is not valid JSON", "{"), "bad_json"),
    ],
)
def test_each_bad_row_kind_has_a_code(rec, code):
    assert code_of(rec) == code


def test_good_row_is_cleaned():
    row = check_record({"_id": "a", "text": "hello", "title": None, "year": 2020, "score": 1, "extra": [1]}, SPEC)
    assert row == {"id": "a", "title": "", "text": "hello", "year": 2020, "score": 1.0, "open": None,
                   "journal": None}


def test_csv_strings_are_coerced_to_declared_types():
    row = check_record({"_id": "a", "text": "t", "year": "2020", "score": "0.5", "open": "yes"}, SPEC, coerce=True)
    assert (row["year"], row["score"], row["open"]) == (2020, 0.5, True)
    assert code_of({"_id": "a", "text": "t", "year": "twenty"}, coerce=True) == "bad_metadata"


def test_messages_name_the_fix():
    with pytest.raises(BadRow, match="set corpus.id_field"):
        check_record({"id": "a", "text": "t"}, SPEC)
    with pytest.raises(BadRow, match="raise the limit"):
        check_record({"_id": "a", "text": "x" * 60}, SPEC)


def test_validate_records_keeps_every_row_once():
    recs = [(1, {"_id": "a", "text": "alpha", "title": "A"}), (2, Malformed("bad_json", "bad", "{x")),
            (3, {"_id": 5, "text": "t"}), (4, {"_id": "b", "text": "beta"})]
    table = validate_records(recs, SPEC, source="f.jsonl")
    assert table.num_rows == 4
    rows = table.to_pylist()
    assert [r["reason_code"] for r in rows] == [None, "bad_json", "bad_id_type", None]
    assert [r["row"] for r in rows] == [1, 2, 3, 4] and {r["source"] for r in rows} == {"f.jsonl"}
    assert rows[0]["_embed_input"] == "A alpha" and rows[3]["_embed_input"] == "beta"
    assert rows[1]["raw"] == "{x" and rows[2]["id"] == "5"


def test_content_hash_follows_model_and_input():
    a = RowSpec(model="m1")
    assert a.content_hash("x") == a.content_hash("x")
    assert a.content_hash("x") != a.content_hash("y")
    assert a.content_hash("x") != RowSpec(model="m2").content_hash("x")


def test_input_fields_and_separator():
    spec = RowSpec(input_fields=("text",), separator=" | ")
    assert spec.embed_input("T", "body") == "body"
    assert RowSpec(separator=" | ").embed_input("T", "body") == "T | body"
    assert RowSpec().embed_input("", "body") == "body"
