import pytest

from harness.errors import DataError
from harness.fileio import JsonlAppender, read_jsonl, write_atomic
from harness.records import Problem


def test_a_torn_last_line_from_a_crash_is_dropped_and_appending_continues(tmp_path):
    path = tmp_path / "r.jsonl"
    with JsonlAppender(path) as out:
        out.append(Problem(id="a", task="t", question="q", gold="1"))
    with open(path, "a") as f:
        f.write('{"id": "b", "task": "t", "que')  # killed mid-write
    assert [p.id for p in read_jsonl(path, Problem)] == ["a"]
    with JsonlAppender(path) as out:
        out.append(Problem(id="c", task="t", question="q", gold="1"))
    assert [p.id for p in read_jsonl(path, Problem)] == ["a", "c"]


def test_a_bad_line_in_the_middle_names_file_line_and_field(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "task": "t", "question": "q", "gold": "1"}\n{"id": "b", "task": "t"}\n'
                    '{"id": "c", "task": "t", "question": "q", "gold": "1"}\n')
    with pytest.raises(DataError, match=r"r.jsonl:2: field 'question'"):
        read_jsonl(path, Problem)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_atomic(tmp_path / "x.json", "{}")
    write_atomic(tmp_path / "x.json", "[]")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert (tmp_path / "x.json").read_text() == "[]"
