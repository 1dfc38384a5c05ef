"""Crash-safe file writing: whole files are written atomically, records are appended one
flushed line at a time. Every persisted file of a run goes through here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from harness.errors import DataError

M = TypeVar("M", bound=BaseModel)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, or bytes) to a temporary file next to `path`, fsync it,
    then rename over `path`: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_model(path: Path, model: BaseModel) -> None:
    write_atomic(path, model.model_dump_json(indent=2) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict | BaseModel]) -> None:
    lines = []
    for row in rows:
        if isinstance(row, BaseModel):
            lines.append(row.model_dump_json())
        else:
            lines.append(json.dumps(row, ensure_ascii=False))
    write_atomic(path, "".join(line + "\n" for line in lines))


class JsonlAppender:
    """Append one record per line, flushed as soon as it is written, so a killed run loses at
    most the line being written (which `read_jsonl` then skips as a torn tail)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, record: BaseModel | dict) -> None:
        line = record.model_dump_json() if isinstance(record, BaseModel) else json.dumps(record, ensure_ascii=False)
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """A crash can leave a last line without its newline; cut it so appends start clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)


def iter_jsonl(path: Path, model: type[M] | None = None) -> Iterator[M | dict]:
    """Read a JSONL file. A torn last line (a crash mid-write) is skipped; any other bad line
    raises DataError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn_tail = i == len(lines) and not line.endswith("\n")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail:
                return
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if model is None:
            yield obj
            continue
        try:
            yield model.model_validate(obj)
        except ValidationError as e:
            if torn_tail:
                return
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(record)"
            raise DataError(f"{path}:{i}: field '{field}': {first['msg']}") from e


def read_jsonl(path: Path, model: type[M] | None = None) -> list:
    return list(iter_jsonl(path, model))
