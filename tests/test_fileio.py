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


def test_a_line_that_is_not_utf8_names_file_line_and_the_repair(tmp_path):
    from harness.fileio import CorruptRecordError

    (tmp_path / "config.yaml").write_text("name: x\n")
    path = tmp_path / "iter-0" / "debate-test.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"id": "a", "task": "t", "question": "q", "gold": "1"}\n\xff\xfe\n')
    with pytest.raises(CorruptRecordError, match=r"debate-test.jsonl:2: not UTF-8 text") as err:
        read_jsonl(path, Problem)
    assert f"python -m harness.repair {tmp_path}" in str(err.value)
    assert err.value.line == 2


def test_stale_temporary_files_are_removed_but_not_in_skipped_folders(tmp_path):
    from harness.fileio import remove_stale_temps

    stale = [tmp_path / ".summary.json.a1b2c3d4.tmp", tmp_path / "iter-0" / ".metrics.json.zz_9yy8x.tmp"]
    kept = [tmp_path / "local-jobs" / "j" / ".status.json.a1b2c3d4.tmp", tmp_path / "notes.tmp"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{")
    assert sorted(remove_stale_temps(tmp_path, skip=("local-jobs",))) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_a_folder_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    import os

    from harness.fileio import DirLock

    with DirLock(tmp_path):
        with pytest.raises(DataError, match=f"in use by process {os.getpid()}"):
            DirLock(tmp_path).acquire()
    with DirLock(tmp_path):  # released on exit
        pass
