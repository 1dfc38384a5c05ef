"""run_dir/calls-in-flight.jsonl: every HTTP request to a model is written here just before its
body goes out (transport.py: not while it waits for a connection or a slot), and closed when its
outcome is known, so money the provider may have billed without an answer reaching the run is
never silently lost, and a request that never left is never counted.

Per request (attempt), in order:

    {"id": ..., "state": "sent", "key": <cache key>, "model": ..., "purpose": ..., "est_cost_usd": ...}
    ... the HTTP request ...
    {"id": ..., "state": "answered" | "refused" | "unanswered"}

* answered:   the reply is in cache.sqlite (with its usage record) and in usage.jsonl.
* refused:    the server answered with an HTTP error (429, 4xx, 5xx) or with a page that is no
              completion (HTML, `{}`), or the connection was never made: nothing was billed.
* unanswered: sent, but no reply came back (timeout, dropped connection, the caller cancelled):
              the provider may have billed it.

A `sent` without a closing line is a request in flight when the process died (SIGKILL, power).
At the next start (`reconcile`), such a request whose reply made it into the cache is closed as
answered (its usage line is appended if the crash came before it); the others become `lost`.
`unanswered` and `lost` requests are reported and counted against the budget cap at their
worst-case estimate (the whole prompt and max_tokens at list price), in every later session.
The file is compacted at start: only those counted requests are kept.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel

from harness.fileio import JsonlAppender, iter_jsonl, write_jsonl_atomic

JOURNAL_NAME = "calls-in-flight.jsonl"
State = Literal["sent", "answered", "refused", "unanswered", "lost"]
COUNTED: tuple[str, ...] = ("unanswered", "lost")  # may have been billed without an answer
# How the worst case of those is computed, as the run reports it.
BOUND = ("each request whose body went out and got no answer, at its whole prompt plus max_tokens at list price; "
         "requests that never left, or that the server refused, are not counted")


class JournalEntry(BaseModel):
    """One line of calls-in-flight.jsonl."""

    id: str
    state: State
    ts: float
    key: str | None = None  # the cache key of the call (on "sent" and counted lines)
    model: str | None = None
    purpose: str | None = None
    est_cost_usd: float | None = None  # worst-case cost; None: the model's price is unknown


class CallJournal:
    def __init__(self, path: Path, settle: Callable[[JournalEntry], bool]):
        """Reads the journal, closes what an earlier session left open (`settle(entry)` returns
        True when that request's reply is in the cache, after restoring its usage line), and
        compacts the file to the requests that may have been billed without an answer."""
        self.path = Path(path)
        entries: dict[str, JournalEntry] = {}
        for line in iter_jsonl(self.path, JournalEntry):
            first = entries.get(line.id)
            entries[line.id] = line if first is None else first.model_copy(update={"state": line.state})
        self.lost_now: list[JournalEntry] = []  # found open at this start: in flight at a crash
        kept: list[JournalEntry] = []
        for entry in entries.values():
            if entry.state == "sent":
                if settle(entry):
                    continue
                entry = entry.model_copy(update={"state": "lost"})
                self.lost_now.append(entry)
            if entry.state in COUNTED:
                kept.append(entry)
        self.counted: list[JournalEntry] = kept
        if entries and len(kept) != len(entries) or self.lost_now:
            write_jsonl_atomic(self.path, kept)
        self._out = JsonlAppender(self.path)
        self._closed = False
        self._open: dict[str, JournalEntry] = {}

    def sent(self, key: str, model: str, purpose: str, est_cost_usd: float | None) -> str:
        entry = JournalEntry(id=uuid.uuid4().hex, state="sent", ts=time.time(), key=key, model=model, purpose=purpose,
                             est_cost_usd=est_cost_usd)
        self._out.append(entry)
        self._open[entry.id] = entry
        return entry.id

    def close(self, call_id: str, state: State) -> None:
        entry = self._open.pop(call_id, None)
        if entry is None or self._closed:  # after close_file: left open, settled at the next start
            return
        self._out.append(JournalEntry(id=call_id, state=state, ts=time.time()).model_dump(exclude_none=True))
        if state in COUNTED:
            self.counted.append(entry.model_copy(update={"state": state}))

    def possibly_billed(self) -> tuple[int, float, int]:
        """(requests that may have been billed without an answer, their worst-case cost in USD
        where the price is known, how many of them have no known price)."""
        known = [e.est_cost_usd for e in self.counted if e.est_cost_usd is not None]
        return len(self.counted), sum(known), len(self.counted) - len(known)

    def close_file(self) -> None:
        self._closed = True
        self._out.close()


__all__ = ["BOUND", "COUNTED", "CallJournal", "JOURNAL_NAME", "JournalEntry", "State"]
