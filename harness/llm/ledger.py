"""A run's account of model calls: what was paid (usage.jsonl), what may have been paid without
an answer (calls-in-flight.jsonl), what calls in flight may still cost (the budget reservation),
and the repair of both files after a crash, from the response cache.

LLMClient owns one Ledger per run directory; nothing here makes a network call.

Crash recovery, at the start of every session:
* a request left open in the journal whose answer is in the cache gets its usage line back if it
  is missing (the crash came between the cache row and the line); otherwise it is `lost`;
* a usage.jsonl that ends in a torn line (a kill or a full disk mid-write) lost that line, though
  its journal entry may already be closed: every cache row written since the last whole usage
  line whose call has no line gets its line back from the row (each row carries its usage record).
"""

from __future__ import annotations

import logging
from pathlib import Path

import openai

from harness.errors import BudgetExceeded, ConfigError
from harness.llm.cache import ResponseCache
from harness.llm.journal import BOUND, JOURNAL_NAME, CallJournal, JournalEntry, State
from harness.llm.retry import MalformedResponse, cannot_connect
from harness.llm.usage import UsageLog, UsageTotals
from harness.records import UsageRecord

log = logging.getLogger(__name__)

# Cache rows are written just after their usage record is stamped; rows this much older than the
# last whole usage line are not searched for a torn line's call (the clocks are the same machine's).
TORN_MARGIN_S = 60.0


def outcome(exc: BaseException) -> State:
    """How a failed request that went out ends in the journal: refused (the server answered, with
    an error or a page that is no completion, or no connection was made: not billed) or
    unanswered (no answer came back: it may have been billed)."""
    if isinstance(exc, (openai.APIStatusError, MalformedResponse)) or cannot_connect(exc):
        return "refused"
    return "unanswered"


def usd(x: float) -> str:
    return f"${x:.4f}" if abs(x) >= 0.01 else f"${x:.6f}"


class Ledger:
    def __init__(self, run_dir: Path, cache: ResponseCache, budget_usd: float | None):
        self.budget_usd = budget_usd
        self._cache = cache
        self.usage = UsageLog(run_dir / "usage.jsonl")
        self._restored = self._restore_torn_line()
        self.journal = CallJournal(run_dir / JOURNAL_NAME, settle=self._settle)
        self.reserved_usd = 0.0  # budget estimates of calls in flight
        self.notes: list[str] = []  # what the run should report once (calls lost in a crash)
        self._report_recovery()

    # ------------------------------------------------------------------ totals and the budget

    def totals(self) -> UsageTotals:
        """This run so far, earlier sessions included (read from usage.jsonl and the journal of
        requests in flight at start)."""
        totals = self.usage.totals()
        n, cost, unknown = self.journal.possibly_billed()
        totals.unanswered_calls, totals.unanswered_cost_usd, totals.unanswered_unknown_cost_calls = n, cost, unknown
        return totals

    def reserve(self, model: str, est: float | None) -> float:
        """Reserve a call's worst-case cost under the cap (0 without a cap); BudgetExceeded if it
        would pass it. Give it back with `release` once the call has ended."""
        if self.budget_usd is None:
            return 0.0
        if est is None:
            # Decision: refuse rather than run uncapped. A cap that silently ignores a model
            # is no cap; the user can price it (even at 0 for a local server) in one line.
            raise ConfigError(
                f"budget.max_cost_usd is set but the price of model '{model}' is unknown, so the cap cannot be "
                f"enforced: add it to the config, e.g. --set 'prices.{model}={{input: 0.15, output: 0.6}}' "
                f"(USD per 1M tokens; 0 for a local server), or remove budget.max_cost_usd"
            )
        _, unanswered, _ = self.journal.possibly_billed()
        spent = self.usage.spent_usd + unanswered
        if spent + self.reserved_usd + est > self.budget_usd:
            lost = f" (of which {usd(unanswered)} worst case for calls that may have been billed without an answer)"
            raise BudgetExceeded(
                f"budget cap reached: {usd(spent)} spent so far in this run (earlier sessions included"
                f"{lost if unanswered else ''}) plus "
                f"{usd(self.reserved_usd)} for calls in flight, and the next call to '{model}' may cost up to "
                f"{usd(est)}, which would pass budget.max_cost_usd=${self.budget_usd:g}. Raise the cap with "
                f"--set budget.max_cost_usd=<more> and start the run again: it resumes from where it stopped "
                f"and finished calls come from the cache at no cost."
            )
        self.reserved_usd += est
        return est

    def release(self, amount: float) -> None:
        self.reserved_usd -= amount

    # ------------------------------------------------------------------ requests

    def sent(self, key: str, model: str, purpose: str, est_cost_usd: float | None) -> str:
        return self.journal.sent(key, model, purpose, est_cost_usd)

    def ended(self, call_id: str, state: State) -> None:
        self.journal.close(call_id, state)

    def record(self, rec: UsageRecord) -> None:
        self.usage.append(rec)

    def close(self) -> None:
        self.usage.close()
        self.journal.close_file()

    # ------------------------------------------------------------------ crash recovery

    def _restore_torn_line(self) -> int:
        if self.usage.torn_tail is None:
            return 0
        since = (self.usage.last_ts or 0.0) - TORN_MARGIN_S
        restored = 0
        for stored in self._cache.usages_since(since):
            call_id = stored.get("call_id")
            if call_id and not self.usage.has_call(call_id):
                self.usage.append(UsageRecord.model_validate(stored))
                restored += 1
        return restored

    def _settle(self, entry: JournalEntry) -> bool:
        """A request an earlier session left open in the journal: True if its answer made it into
        the cache (its usage line is appended if the crash came before it), False if it is lost."""
        stored = self._cache.usage(entry.key) if entry.key else None
        if stored is None or stored.get("call_id") != entry.id:
            return False
        if not self.usage.has_call(entry.id):
            self.usage.append(UsageRecord.model_validate(stored))
            self._restored += 1
        return True

    def _report_recovery(self) -> None:
        if self._restored:
            log.info("%d usage lines restored from the cache (a crash came between an answer and its line)",
                     self._restored)
        lost = self.journal.lost_now
        if not lost:
            return
        known = [e.est_cost_usd for e in lost if e.est_cost_usd is not None]
        worst = usd(sum(known)) + (f" plus {len(lost) - len(known)} of unknown price" if len(known) < len(lost) else "")
        note = (f"{len(lost)} model call(s) were in flight when an earlier session of this run stopped: the provider "
                f"may have billed them although no answer was saved (worst case {worst}: {BOUND}). They count "
                f"against budget.max_cost_usd at that estimate and are listed in {JOURNAL_NAME}; their work is "
                f"asked again.")
        log.warning(note)
        self.notes.append(note)


__all__ = ["Ledger", "outcome", "usd"]
