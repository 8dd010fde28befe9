"""The one JSONL / atomic-write policy (dftune.files)."""

import json

import pytest

from dftune.files import CorruptFileError, append_jsonl, read_json, read_jsonl, repair_tail, write_json, write_text


def test_torn_final_line_is_skipped_without_touching_the_file(tmp_path):
    p = tmp_path / "a.jsonl"
    append_jsonl(p, [{"i": 0}, {"i": 1}])
    with p.open("a") as f:
        f.write('{"i": 2, "tex')  # a writer mid-line (or a crash)
    size = p.stat().st_size
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]
    assert p.stat().st_size == size  # a reader never truncates


def test_a_complete_final_line_without_newline_is_still_incomplete(tmp_path):
    # a line is complete only with its newline: a writer may be between the two writes
    p = tmp_path / "a.jsonl"
    p.write_text('{"i": 0}\n{"i": 1}')
    assert read_jsonl(p) == [{"i": 0}]


def test_bad_line_before_the_end_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(CorruptFileError, match=r"a.jsonl, line 2"):
        read_jsonl(p)


def test_repair_tail_then_append(tmp_path):
    p = tmp_path / "a.jsonl"
    append_jsonl(p, [{"i": 0}])
    with p.open("a") as f:
        f.write('{"i": 1, "x"')
    assert repair_tail(p) == len('{"i": 1, "x"')
    append_jsonl(p, [{"i": 1}])
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]
    assert repair_tail(p) == 0
    # a file of one torn line only
    q = tmp_path / "b.jsonl"
    q.write_text('{"half')
    assert repair_tail(q) == 6 and q.read_bytes() == b""


def test_atomic_writes(tmp_path):
    p = write_json(tmp_path / "sub" / "x.json", {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]} and read_json(p) == {"a": [1, 2]}
    write_text(p, "new")
    assert p.read_text() == "new"
    assert sorted(x.name for x in p.parent.iterdir()) == ["x.json"]  # no temporaries left
    assert read_json(tmp_path / "missing.json") is None
