"""run_dir/usage.jsonl: one flushed line per model call or cache hit, and running totals that
include earlier sessions of a resumed run (so the budget cap counts money already spent)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from harness.fileio import JsonlAppender, iter_jsonl
from harness.records import UsageRecord


class UsageTotals(BaseModel):
    """Totals over usage.jsonl. `calls` counts API calls actually made; cache hits are counted
    apart and cost nothing. `cost_usd` sums the calls with a known price; calls whose price is
    unknown are counted in `unknown_cost_calls` (their models listed) so a partial total is
    never presented as the whole cost."""

    calls: int = 0
    cache_hits: int = 0
    batched_calls: int = 0  # of `calls`, answered through the Batch API (at batch price)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unknown_cost_calls: int = 0
    unknown_cost_models: list[str] = Field(default_factory=list)
    # Requests sent that may have been billed without an answer reaching the run (in flight at a
    # crash, timed out, cut off): calls-in-flight.jsonl. Their worst-case cost (whole prompt and
    # max_tokens at list price) counts against the budget cap; it is not part of `cost_usd`.
    unanswered_calls: int = 0
    unanswered_cost_usd: float = 0.0
    unanswered_unknown_cost_calls: int = 0

    def add(self, rec: UsageRecord) -> None:
        if rec.cached:
            self.cache_hits += 1
            return
        self.calls += 1
        self.batched_calls += rec.batch_id is not None
        self.prompt_tokens += rec.prompt_tokens or 0
        self.completion_tokens += rec.completion_tokens or 0
        if rec.cost_usd is None:
            self.unknown_cost_calls += 1
            if rec.model not in self.unknown_cost_models:
                self.unknown_cost_models.append(rec.model)
                self.unknown_cost_models.sort()
        else:
            self.cost_usd += rec.cost_usd


def _torn_tail(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            if size == 0:
                return None
            f.seek(max(0, size - 65536))
            tail = f.read()
    except FileNotFoundError:
        return None
    return None if tail.endswith(b"\n") else tail[tail.rfind(b"\n") + 1:]


LOCAL = "local (no API price)"


def is_local(config: dict) -> bool:
    """A run whose models are served by vLLM (a server the harness started or one the user runs):
    its calls have no API price, and saying "unknown" would suggest a bill that does not exist."""
    return (config.get("endpoint") or {}).get("kind") == "vllm"


def usage_line(usage: dict, *, local: bool = False, simulated: bool = False) -> str:
    """The run's closing line about calls, tokens and cost (from UsageTotals.model_dump())."""
    from harness.llm.journal import BOUND  # how the possibly-billed worst case is counted

    cost, unknown = usage.get("cost_usd"), usage.get("unknown_cost_calls", 0)
    if local and unknown:
        price = f"${cost:.4f} + {unknown} calls {LOCAL}" if cost else LOCAL
    else:
        price = (f"${cost:.4f}" if cost is not None else "unknown") + (
            f" + {unknown} calls of unknown price" if unknown else "")
    unanswered, batched = usage.get("unanswered_calls", 0), usage.get("batched_calls", 0)
    return (f"calls {usage.get('calls', 0)} (cache hits {usage.get('cache_hits', 0)}"
            + (f"; {batched} through the Batch API at half price" if batched else "") + "), tokens "
            f"{usage.get('prompt_tokens', 0)} in / {usage.get('completion_tokens', 0)} out, inference cost {price}"
            + (f"; {unanswered} call{'s' if unanswered != 1 else ''} may have been billed without an answer "
               f"(worst case ${usage.get('unanswered_cost_usd', 0):.4f}: {BOUND}; see calls-in-flight.jsonl)"
               if unanswered else "")
            + (" (simulated prices)" if simulated else ""))


class UsageLog:
    """Appends UsageRecords to usage.jsonl and keeps the totals, seeded from the existing file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._totals = UsageTotals()
        self._call_ids: set[str] = set()
        self.last_ts: float | None = None  # of the last whole line
        # The last line cut short by a kill or a full disk (it is skipped, then cut off): its call
        # is restored from the response cache (ledger.py).
        self.torn_tail: bytes | None = _torn_tail(self.path)
        for rec in iter_jsonl(self.path, UsageRecord):  # earlier sessions of this run
            self._totals.add(rec)
            self.last_ts = rec.ts
            if rec.call_id:
                self._call_ids.add(rec.call_id)
        self._out = JsonlAppender(self.path)

    def append(self, rec: UsageRecord) -> None:
        self._out.append(rec)
        self._totals.add(rec)
        if rec.call_id:
            self._call_ids.add(rec.call_id)

    def has_call(self, call_id: str) -> bool:
        """usage.jsonl already holds the line of this request (see journal.py)."""
        return call_id in self._call_ids

    def totals(self) -> UsageTotals:
        return self._totals.model_copy(deep=True)

    @property
    def spent_usd(self) -> float:
        return self._totals.cost_usd

    def close(self) -> None:
        self._out.close()
