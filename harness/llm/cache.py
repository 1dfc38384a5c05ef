"""The run's response cache: run_dir/cache.sqlite, so a resumed or repeated run never pays
twice for the same sample.

The key is the sha256 of canonical JSON of everything that determines the answer *and* the
sample's identity (DESIGN §5): model, messages, the sampling parameters actually sent, and the
SampleId. All agents send the same round-0 prompt at temperature 1; without the SampleId they
would collapse onto one cached answer and the society would lose its diversity.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from harness.errors import DataError


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, unicode kept: the same request always hashes the same."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


class ResponseCache:
    """A small key -> JSON value store. SQLite in WAL mode: readers never block the writer and
    several clients (or processes) of one run can share the file. Calls are synchronous: a
    lookup or insert takes well under a millisecond, far below a model call, so running them on
    the event loop costs less than handing them to a thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed entry survives a process crash (only an OS crash
            # can drop the latest entries, which would then simply be asked again).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,"
                " value TEXT NOT NULL, created REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as e:
            raise DataError(
                f"{self.path}: the response cache cannot be opened ({e}); if it is corrupt, move it aside "
                f"(the run then asks the model again for answers not yet in its debate records)"
            ) from e

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:
            return None  # an unreadable entry is a miss; the fresh answer overwrites it

    def put(self, key: str, kind: str, model: str, value: dict) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, kind, model, value, created) VALUES (?, ?, ?, ?, ?)",
            (key, kind, model, json.dumps(value, ensure_ascii=False), time.time()),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()
