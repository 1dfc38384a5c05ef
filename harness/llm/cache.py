"""The run's response cache: run_dir/cache.sqlite, so a resumed or repeated run never pays
twice for the same sample.

The key is the sha256 of canonical JSON of everything that determines the answer *and* the
sample's identity (DESIGN §5): model, messages, the logical sampling parameters (not their wire
names, which differ between servers and API versions), and the SampleId. All agents send the
same round-0 prompt at temperature 1; without the SampleId they would collapse onto one cached
answer and the society would lose its diversity.

Each row also carries the usage record of the call that produced it, written in the same
statement as the answer: a crash between the cache row and its usage.jsonl line is repaired at
the next start (journal.py), so an answered call is neither paid twice nor left unrecorded.

A damaged file is detected when it is opened (`PRAGMA quick_check`); recover it with

    python -m harness.llm.cache repair RUN_DIR

which copies every readable row into a fresh cache.sqlite and keeps the damaged file beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from harness.errors import DataError

CACHE_NAME = "cache.sqlite"
_COLUMNS = "key, kind, model, value, created, usage"


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, unicode kept: the same request always hashes the same."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def _damaged(path: Path, detail: str) -> DataError:
    run_dir = path.parent
    return DataError(
        f"{path}: the response cache is damaged ({detail}). Recover it with: python -m harness.llm.cache repair "
        f"{run_dir}  (every readable answer is copied into a fresh cache; the damaged file is kept beside it as "
        f"{path.name}.damaged-<time>). Then resume the run: debate records already written are untouched, and "
        f"only answers on damaged pages are asked again."
    )


def _create(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS responses ("
        " key TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,"
        " value TEXT NOT NULL, created REAL NOT NULL, usage TEXT)"
    )
    columns = {row[1] for row in db.execute("PRAGMA table_info(responses)")}
    if "usage" not in columns:  # a cache written before rows carried their usage record
        db.execute("ALTER TABLE responses ADD COLUMN usage TEXT")


class ResponseCache:
    """A small key -> JSON value store. SQLite in WAL mode: readers never block the writer and
    several clients (or processes) of one run can share the file. Calls are synchronous: a
    lookup or insert takes well under a millisecond, far below a model call, so running them on
    the event loop costs less than handing them to a thread."""

    def __init__(self, path: Path, *, check: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed entry survives a process crash (only an OS crash
            # can drop the latest entries, which would then simply be asked again).
            self._db.execute("PRAGMA synchronous=NORMAL")
            if check:
                # Reads every page once (about a second per few hundred MB): damage found now has
                # a clear remedy; found mid-run it would stop a split with a bare sqlite error.
                problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    self._db.close()
                    raise _damaged(self.path, "; ".join(problems))
            _create(self._db)
        except sqlite3.DatabaseError as e:
            raise _damaged(self.path, str(e)) from e

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:
            return None  # an unreadable entry is a miss; the fresh answer overwrites it

    def usage(self, key: str) -> dict | None:
        """The usage record stored with the answer under `key` (None: no row, or an old row)."""
        row = self._db.execute("SELECT usage FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None or row[0] is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:
            return None

    def usages_since(self, created: float) -> list[dict]:
        """The usage records stored with the answers written at or after `created` (time.time())."""
        found = []
        for (text,) in self._db.execute("SELECT usage FROM responses WHERE created >= ? AND usage IS NOT NULL "
                                        "ORDER BY created", (created,)):
            try:
                found.append(json.loads(text))
            except json.JSONDecodeError:
                continue
        return found

    def put(self, key: str, kind: str, model: str, value: dict, usage: dict | None = None) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (key, kind, model, json.dumps(value, ensure_ascii=False), time.time(),
             json.dumps(usage, ensure_ascii=False) if usage is not None else None),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


# ----------------------------------------------------------------------------- repair

def _salvage(src: sqlite3.Connection) -> tuple[list[tuple], int]:
    """Every row that can still be read, and how many row ids could not be. Rows are found by a
    plain scan, then by the key index, then by probing each row id up to the largest one seen:
    a damaged page breaks a scan at that page, while lookups through intact pages still work."""
    columns = {row[1] for row in src.execute("PRAGMA table_info(responses)")}
    select = _COLUMNS if "usage" in columns else _COLUMNS.replace(", usage", ", NULL")
    rows: dict[int, tuple] = {}

    def scan(sql: str) -> None:
        try:
            for rowid, *row in src.execute(sql):
                rows.setdefault(rowid, tuple(row))
        except sqlite3.DatabaseError:
            pass  # stop at the damaged page; what came before it is kept

    scan(f"SELECT rowid, {select} FROM responses")
    scan(f"SELECT rowid, {select} FROM responses ORDER BY key")  # through the key index
    top = max(rows, default=0)
    for query in ("SELECT max(rowid) FROM responses", "SELECT count(*) FROM responses"):
        try:
            top = max(top, src.execute(query).fetchone()[0] or 0)
        except sqlite3.DatabaseError:
            pass
    unreadable = 0
    for rowid in range(1, top + 1 + 1000):  # a margin past the last id seen: rows after a damaged page
        if rowid in rows:
            continue
        try:
            row = src.execute(f"SELECT {select} FROM responses WHERE rowid = ?", (rowid,)).fetchone()
        except sqlite3.DatabaseError:
            unreadable += rowid <= top
            continue
        if row is not None:
            rows[rowid] = tuple(row)
            top = max(top, rowid)
    good = []
    for rowid in sorted(rows):
        key, kind, model, value, created, usage = rows[rowid]
        try:
            json.loads(value)
        except (TypeError, json.JSONDecodeError):
            unreadable += 1
            continue
        good.append((key, kind, model, value, created, usage))
    return good, unreadable


def repair(run_dir: Path) -> str:
    """Copy every readable row of run_dir/cache.sqlite into a fresh file that replaces it; the
    damaged file (and its -wal/-shm) is kept as cache.sqlite.damaged-<time>. Returns a report."""
    path = Path(run_dir) / CACHE_NAME
    if not path.is_file():
        raise DataError(f"{path}: no response cache there; is {run_dir} a run directory?")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        rows, unreadable = _salvage(src)
        src.close()
    except sqlite3.DatabaseError as e:  # not even the header is readable
        rows, unreadable = [], 0
        note = f" (the file could not be opened at all: {e})"
    else:
        note = ""
    fresh = path.with_name(f"{path.name}.repairing")
    fresh.unlink(missing_ok=True)
    dst = sqlite3.connect(fresh, isolation_level=None)
    _create(dst)
    dst.execute("BEGIN")
    dst.executemany(f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
    dst.execute("COMMIT")
    dst.close()
    damaged = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(damaged.with_name(damaged.name + suffix))
    path.replace(damaged)
    fresh.replace(path)
    return (f"{path}: kept {len(rows)} answers; {unreadable} could not be read{note} and will be asked again "
            f"when the run resumes. The damaged file is kept as {damaged.name}.")


def check(run_dir: Path) -> str:
    path = Path(run_dir) / CACHE_NAME
    if not path.is_file():
        raise DataError(f"{path}: no response cache there; is {run_dir} a run directory?")
    cache = ResponseCache(path)
    try:
        return f"{path}: ok, {len(cache)} answers"
    finally:
        cache.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.llm.cache",
                                description="Check or repair a run's response cache (cache.sqlite).")
    p.add_argument("action", choices=["check", "repair"])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    args = p.parse_args(argv)
    try:
        print(check(args.run_dir) if args.action == "check" else repair(args.run_dir))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
