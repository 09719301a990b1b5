"""JSON Lines reading: values in order, blank lines skipped, bad lines named by number."""

import pytest

from search.jsonl import JSONLError, iter_jsonl


def test_values_come_back_in_order_with_their_line() -> None:
    assert list(iter_jsonl([b'{"a": 1}\n', b"\n", b'"x"\n'], "f.jsonl")) == [
        ("f.jsonl: line 1", {"a": 1}),
        ("f.jsonl: line 3", "x"),
    ]


def test_invalid_json_names_the_line() -> None:
    with pytest.raises(JSONLError, match=r"^f.jsonl: line 2: invalid JSON"):
        list(iter_jsonl(['{"a": 1}\n', "{oops\n"], "f.jsonl"))


def test_non_utf8_bytes_name_the_line() -> None:
    with pytest.raises(JSONLError, match=r"^f.jsonl: line 1: not UTF-8 text"):
        list(iter_jsonl([b"\xff\xfe\n"], "f.jsonl"))
