"""Client-side pacing of model calls, one Pacer per server: a rate limit is something to pace
under, not an error to fight.

What a Pacer does before each HTTP request it admits:

* **Learned limits.** Every response (successes, 429s, other errors) is read for OpenAI's
  `x-ratelimit-limit/remaining-requests` and `-tokens` headers. A limit seen there becomes a
  local budget of `limit` units refilled at limit/60 a second (how OpenAI describes its limits:
  `x-ratelimit-reset-*` is the time until the budget is whole again), re-synchronised on every
  response: the server's `remaining`, minus what this client has sent since that request.
  Requests wait until the budget holds them, so a paced run sees (almost) no 429s, and other
  users of the same key are accounted for through `remaining`.
* **Configured limits** (`endpoint.rpm_limit`, `endpoint.tpm_limit`): the same budget with a
  burst of one second's worth, so the configured rate holds over any window of a second or more.
* **Tokens** are estimated before the call: the prompt at ~4 characters a token plus 4 a
  message, scaled by the largest ratio of the server's reported prompt tokens to that estimate
  seen so far, plus the whole output allowance (`max_tokens`), which is what OpenAI counts
  against TPM when a request is admitted.
* **Calls in flight** adapt (AIMD): never above `endpoint.concurrency`, halved on a 429 (once per
  round trip, not once per 429 of the same burst), grown by one per window of successes.
  The first request to a server goes alone (for at most PROBE_S): its headers tell whether
  there are limits before a burst of `concurrency` requests is sent.
* **A 429** pauses every caller of that server for the server's `retry-after` (`retry-after-ms`
  when given); without one, for 1 s, doubling to 60 s while 429s continue, and the budget
  synchronised from its headers does the rest. It is not a failure: the retry
  layer (retry.py) does not count it against `max_retries`, and gives up only when no call to
  the server has succeeded for `endpoint.rate_limit_wait_s` (`stalled_s`).

Hand-written rather than a limiter library (aiolimiter, limits): those keep a fixed local bucket,
and the point here is a budget re-synchronised from the server's own counts and an adaptive
window; both fit in the ~200 lines below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Mapping

from harness.llm.retry import is_rate_limited, parse_duration, retry_after_s

log = logging.getLogger(__name__)

PROBE_S = 2.0  # the first request to a server goes alone until it answers, at most this long
MIN_PAUSE_S, MAX_PAUSE_S = 1.0, 60.0  # pause after a 429 that names no wait: 1 s doubling to 60 s


class _Budget:
    """A budget of `capacity` units refilled at `per_s` a second. A request may take more than
    the level holds once the level reaches min(request, capacity): the level goes negative and
    later requests wait longer, so a request larger than the burst still goes, in turn."""

    def __init__(self, capacity: float, per_s: float, now: float, level: float | None = None):
        self.capacity, self.per_s = float(capacity), float(per_s)
        self.level = self.capacity if level is None else float(level)
        self.stamp = now
        self.taken = 0.0  # all units taken so far (to subtract what was sent after a reading)

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_s)
        self.stamp = now

    def delay(self, units: float, now: float) -> float:
        self._refill(now)
        need = min(units, self.capacity)
        return max(0.0, (need - self.level) / self.per_s)

    def take(self, units: float, now: float) -> None:
        self._refill(now)
        self.level -= units
        self.taken += units

    def sync(self, limit: float, remaining: float, taken_at_send: float, now: float) -> None:
        """The server said `remaining` in its answer to a request sent when this budget had taken
        `taken_at_send` units (that request's own included). The reading is taken as of now and
        what was sent since is subtracted: if the server counted it already, or refilled since
        it took the reading, the level is lower than the truth by at most (rate x latency) units,
        a constant margin that costs no throughput while the budget is the limit; crediting the
        refill since the request was sent instead overshoots by the one-way delay and meets 429s."""
        self.capacity, self.per_s = float(limit), float(limit) / 60.0
        self.level = min(self.capacity, remaining - (self.taken - taken_at_send))
        self.stamp = now


@dataclass
class Ticket:
    """One admitted request."""

    tokens: float
    prompt_estimate: int
    sent_at: float
    taken: dict[str, float] = field(default_factory=dict)  # each learned budget's total after this request
    outcome: str | None = None


class Pacer:
    """The pacing of one server, shared by every caller of an LLMClient that sends there."""

    def __init__(self, url: str, *, max_in_flight: int, rpm_limit: int | None = None,
                 tpm_limit: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.cap = max_in_flight
        self.window = float(max_in_flight)
        self.in_flight = 0
        self._clock = clock
        now = clock()
        self._configured: dict[str, _Budget] = {}
        if rpm_limit:
            self._configured["requests"] = _Budget(max(1.0, rpm_limit / 60), rpm_limit / 60, now)
        if tpm_limit:
            self._configured["tokens"] = _Budget(max(1.0, tpm_limit / 60), tpm_limit / 60, now)
        self._learned: dict[str, _Budget] = {}  # from the server's x-ratelimit-* headers
        self._paused_until = 0.0
        self._pause_s = MIN_PAUSE_S
        self._last_cut = -1e18
        self._prompt_ratio = 1.0
        self._gate = asyncio.Lock()  # FIFO: the head waits for room, the others queue behind it
        self._freed = asyncio.Event()
        self._probe_until: float | None = None  # set when the first request goes
        self.answered = False  # the server gave an HTTP answer (any status) in this session
        self.last_progress = now  # last success, or the first request
        self.rate_limited = 0  # 429s seen
        self.waited_s = 0.0  # time callers spent waiting for the budget or a pause

    # ------------------------------------------------------------------ admission

    def stalled_s(self) -> float:
        """Seconds since the last success at this server (or since its first request)."""
        return self._clock() - self.last_progress

    def estimate(self, prompt_chars: int, messages: int, max_output_tokens: int) -> tuple[float, int]:
        prompt = (prompt_chars + 3) // 4 + 4 * messages
        return prompt * self._prompt_ratio + max_output_tokens, prompt

    def _room(self, now: float) -> int:
        if not self.answered and self._probe_until is not None and now < self._probe_until:
            return 1
        return max(1, int(self.window))

    def _delay(self, tokens: float, now: float) -> float:
        delay = max(0.0, self._paused_until - now)
        for budgets in (self._configured, self._learned):
            if "requests" in budgets:
                delay = max(delay, budgets["requests"].delay(1, now))
            if "tokens" in budgets:
                delay = max(delay, budgets["tokens"].delay(tokens, now))
        return delay

    async def acquire(self, prompt_chars: int, messages: int, max_output_tokens: int) -> Ticket:
        tokens, prompt = self.estimate(prompt_chars, messages, max_output_tokens)
        async with self._gate:
            t_wait = self._clock()
            while True:
                now = self._clock()
                if self.in_flight >= self._room(now):
                    self._freed.clear()
                    timeout = None
                    if not self.answered and self._probe_until is not None:
                        timeout = max(0.0, self._probe_until - now) + 0.001
                    try:
                        await asyncio.wait_for(self._freed.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
                    continue
                delay = self._delay(tokens, now)
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                break
            self.waited_s += now - t_wait
            if self._probe_until is None:  # the first request to this server
                self._probe_until = now + PROBE_S
                self.last_progress = now
            ticket = Ticket(tokens=tokens, prompt_estimate=prompt, sent_at=now)
            for budgets in (self._configured, self._learned):
                if "requests" in budgets:
                    budgets["requests"].take(1, now)
                if "tokens" in budgets:
                    budgets["tokens"].take(tokens, now)
            ticket.taken = {kind: b.taken for kind, b in self._learned.items()}
            self.in_flight += 1
            return ticket

    # ------------------------------------------------------------------ outcomes

    def succeeded(self, ticket: Ticket, headers: Mapping[str, str] | None, prompt_tokens: int | None) -> None:
        """The request was answered: read its headers, count progress, widen the window."""
        now = self._end(ticket, "ok", headers)
        if now is None:
            return
        self.last_progress = now
        self._pause_s = MIN_PAUSE_S
        if self.window < self.cap:
            self.window = min(float(self.cap), self.window + 1.0 / self.window)
        if prompt_tokens and ticket.prompt_estimate:
            self._prompt_ratio = max(self._prompt_ratio, prompt_tokens / ticket.prompt_estimate)

    def failed(self, ticket: Ticket, error: BaseException) -> None:
        """The request failed; an HTTP error's headers are read, a 429 pauses and narrows."""
        headers = getattr(getattr(error, "response", None), "headers", None)
        limited = is_rate_limited(error)
        now = self._end(ticket, "rate_limited" if limited else "error", headers)
        if now is not None and limited:
            self._on_rate_limited(error, ticket, now)

    def abandoned(self, ticket: Ticket) -> None:
        """The request ended without an outcome reported (e.g. a budget refusal before sending)."""
        self._end(ticket, "abandoned", None)

    def _end(self, ticket: Ticket, outcome: str, headers: Mapping[str, str] | None) -> float | None:
        if ticket.outcome is not None:
            return None
        ticket.outcome = outcome
        now = self._clock()
        self.in_flight -= 1
        self._freed.set()
        if headers is not None:
            self.answered = True
            self._read_headers(headers, ticket, now)
        return now

    def _on_rate_limited(self, error: BaseException, ticket: Ticket, now: float) -> None:
        self.rate_limited += 1
        if ticket.sent_at >= self._last_cut:  # one cut per burst: the 429s of requests sent before it count once
            self.window = max(1.0, self.window / 2)
            self._last_cut = now
        # Not the reset headers: they give the time until the whole budget is back (up to a
        # minute), not until the next call fits, which the synchronised budget already knows.
        wait = retry_after_s(error, use_reset=False)
        if wait is None:
            wait = self._pause_s
            self._pause_s = min(MAX_PAUSE_S, self._pause_s * 2)
        # At most a minute at a time: a longer wait (a daily quota) is met again and again until
        # endpoint.rate_limit_wait_s ends the run with a message, rather than looking like a hang.
        wait = min(wait, MAX_PAUSE_S)
        self._paused_until = max(self._paused_until, now + wait)
        log.info("rate-limited at %s: pausing %.2fs, %d calls in flight allowed", self.url, wait, int(self.window))

    def _read_headers(self, headers: Mapping[str, str], ticket: Ticket, now: float) -> None:
        for kind in ("requests", "tokens"):
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if limit is None or limit <= 0:
                continue
            if remaining is None:  # only the reset time: infer the level from it
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}") or "")
                if reset is None:
                    continue
                remaining = max(0.0, limit - reset * limit / 60.0)
            budget = self._learned.get(kind)
            if budget is None:
                # First reading: nothing sent before it is known to the budget yet; the requests
                # in flight now were counted by the server (if admitted before this reading) or
                # will be; counting them all is the safe side.
                budget = self._learned[kind] = _Budget(limit, limit / 60.0, now, level=remaining)
                budget.level -= (self.in_flight if kind == "requests" else self.in_flight * ticket.tokens)
                log.info("%s: server limit of %g %s per minute, pacing under it", self.url, limit, kind)
                continue
            taken = ticket.taken.get(kind)
            if taken is None:  # sent before this budget existed: its reading is older than the budget's
                continue
            budget.sync(limit, remaining, taken, now)

    @asynccontextmanager
    async def slot(self, prompt_chars: int, messages: int, max_output_tokens: int) -> AsyncIterator[Ticket]:
        """`acquire`, then the body reports `succeeded`; an exception out of the body is reported
        as `failed`, and a body that reports nothing releases the slot as abandoned."""
        ticket = await self.acquire(prompt_chars, messages, max_output_tokens)
        try:
            yield ticket
        except BaseException as exc:
            self.failed(ticket, exc)
            raise
        finally:
            self.abandoned(ticket)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


__all__ = ["PROBE_S", "Pacer", "Ticket"]
