"""Crash-safe file writing: whole files are written atomically, records are appended one
flushed line at a time. Every persisted file of a run goes through here.

Reading is just as careful: a torn last line (a kill mid-append) is skipped, and any other bad
line stops with a `CorruptRecordError` naming the file and line and the repair command
(`python -m harness.repair RUN_DIR`, which keeps every whole record).

Written on the standard json module, not the `jsonlines` package (declared once but never
imported, now dropped): its reader either stops at any invalid line or skips every one
(skip_invalid), where a run must skip only a torn last line and stop at a damaged one in the
middle, naming file and line; and what its writer would add to the appends (a dump and a flush
per line) is two lines here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from harness.errors import DataError

M = TypeVar("M", bound=BaseModel)
# tempfile.mkstemp names: "." + target name + "." + 8 random characters + ".tmp".
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class CorruptRecordError(DataError):
    """A line of a JSONL file that is neither a whole record nor a torn last line."""

    def __init__(self, message: str, *, path: Path, line: int):
        super().__init__(message)
        self.path = Path(path)
        self.line = line


def run_dir_of(path: Path) -> Path | None:
    """The run directory (the nearest folder with a config.yaml) that holds `path`, if any."""
    for parent in Path(path).resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent
    return None


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


def _corrupt(path: Path, line: int, what: str) -> CorruptRecordError:
    run_dir = run_dir_of(path)
    target = run_dir if run_dir is not None else path
    return CorruptRecordError(
        f"{path}:{line}: {what}. To keep every whole record and set the damaged line aside, run: "
        f"python -m harness.repair {target}", path=path, line=line)


def split_lines(data: bytes) -> list[bytes]:
    """A file's lines split at b"\\n" only (JSON text holds no raw newline), each with its
    newline; the last one lacks it when the file ends in a torn write."""
    parts = data.split(b"\n")
    return [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def iter_jsonl(path: Path, model: type[M] | None = None) -> Iterator[M | dict]:
    """Read a JSONL file. A torn last line (a crash mid-write) is skipped; any other bad line
    (not UTF-8, not JSON, not the record `model` describes) raises CorruptRecordError naming
    the file and line and the repair command."""
    path = Path(path)
    if not path.exists():
        return
    lines = split_lines(path.read_bytes())
    for i, raw in enumerate(lines, start=1):
        torn_tail = i == len(lines) and not raw.endswith(b"\n")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if torn_tail:
                return
            raise _corrupt(path, i, f"not UTF-8 text (byte {e.start} of the line)") from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail:
                return
            raise _corrupt(path, i, f"not valid JSON ({e.msg})") from e
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
            raise _corrupt(path, i, f"field '{field}': {first['msg']}") from e


def read_jsonl(path: Path, model: type[M] | None = None) -> list:
    return list(iter_jsonl(path, model))


# ----------------------------------------------------------------------------- leftovers and locks

def remove_stale_temps(root: Path, *, skip: tuple[str, ...] = (), older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files that `write_atomic` leaves when it is killed between creating
    and renaming them (`.NAME.xxxxxxxx.tmp`). Folders named in `skip` (relative to `root`) are
    left alone; `older_than_s` spares files another live process may still be writing."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    skipped = [root / s for s in skip]
    for path in root.rglob(".*.tmp"):
        if not _TEMP_RE.match(path.name) or not path.is_file() or any(p in path.parents for p in skipped):
            continue
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed.append(path)
    return removed


class DirLock:
    """An exclusive lock on a folder (`.lock` inside it) held while a process works there: two
    processes on one run directory could each look up a job, find none and both create one.
    The operating system drops the lock when the process dies, even by SIGKILL."""

    def __init__(self, folder: Path, what: str = "run"):
        self.path = Path(folder) / ".lock"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DataError(f"{self.path.parent}: this {self.what} is in use by process {holder}; wait for it to "
                            f"end (or stop it) before starting another on the same folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
