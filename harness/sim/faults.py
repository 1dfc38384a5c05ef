"""Fault injection for chat calls: latency, rate limits (429), server errors (500), hangs.

* Latency: each call sleeps (asynchronously, so hundreds of calls wait at once) for
  max(0, normal(latency_ms, latency_jitter_ms)) milliseconds.
* Rate limits: ``rpm_limit`` requests and ``tpm_limit`` tokens per minute, as budgets that
  refill continuously (rpm/60 requests and tpm/60 tokens a second), the way OpenAI's limits
  behave. A call that finds no request left, or fewer tokens left than its prompt, gets a 429
  with ``retry-after`` (the seconds until it would fit, at least 0.05), ``retry-after-ms`` and
  the ``x-ratelimit-*`` headers. Accepted calls spend one request and their prompt tokens on
  arrival and their completion tokens when answered; rejected calls spend nothing.
* 500s and hangs: each HTTP request draws its own fault (seeded by the config seed and the
  request's arrival number), so a retry of the same prompt is a new draw and can succeed.
  A hang sleeps far past any client timeout and ends when the client disconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass

from starlette.requests import Request

from harness.config import SimulatorConfig

HANG_SECONDS = 3600.0


class _Bucket:
    """A budget of `capacity` units refilled at capacity/60 units a second."""

    def __init__(self, capacity: int):
        self.capacity = float(capacity)
        self.rate = capacity / 60.0
        self.level = float(capacity)
        self.stamp = time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, units: float) -> float:
        """Seconds until `units` are available (0 if now); inf if they never fit."""
        if units > self.capacity:
            return float("inf")
        return max(0.0, (units - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.rate


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '250ms', '6m0s'."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:.0f}s" if minutes >= 1 else f"{secs:.3g}s"


@dataclass
class Draw:
    """The faults chosen for one HTTP request."""

    latency_s: float
    error: bool
    hang: bool


class RateLimited(Exception):
    def __init__(self, message: str, headers: dict[str, str]):
        super().__init__(message)
        self.message = message
        self.headers = headers


class Faults:
    def __init__(self, cfg: SimulatorConfig):
        self.cfg = cfg
        self._arrivals = itertools.count()
        self._requests = _Bucket(cfg.rpm_limit) if cfg.rpm_limit else None
        self._tokens = _Bucket(cfg.tpm_limit) if cfg.tpm_limit else None

    def draw(self) -> Draw:
        """This HTTP request's faults, from its own generator (seeded by the arrival number)."""
        rng = random.Random(f"{self.cfg.seed}:fault:{next(self._arrivals)}")
        latency = max(0.0, rng.gauss(self.cfg.latency_ms, self.cfg.latency_jitter_ms)) / 1000
        hang = rng.random() < self.cfg.timeout_rate
        error = rng.random() < self.cfg.error_rate
        return Draw(latency_s=latency, error=error, hang=hang)

    # The event loop is single-threaded and these methods never await, so no lock is needed.
    def admit(self, prompt_tokens: int) -> None:
        """Spend one request and the prompt's tokens, or raise RateLimited."""
        for bucket in (self._requests, self._tokens):
            if bucket:
                bucket.refill()
        waits = []
        reasons = []
        if self._requests:
            w = self._requests.wait_for(1)
            if w > 0:
                waits.append(w)
                reasons.append(f"requests per min (RPM): Limit {self.cfg.rpm_limit}, Used {self.cfg.rpm_limit}")
        if self._tokens:
            w = self._tokens.wait_for(prompt_tokens)
            if w == float("inf"):
                raise RateLimited(
                    f"Request too large for tokens per min (TPM): Limit {self.cfg.tpm_limit}, "
                    f"Requested {prompt_tokens}. Send a shorter prompt (simulated limit).",
                    self.headers(retry_after=60.0),
                )
            if w > 0:
                waits.append(w)
                reasons.append(f"tokens per min (TPM): Limit {self.cfg.tpm_limit}, Requested {prompt_tokens}")
        if waits:
            wait = max(0.05, max(waits))
            raise RateLimited(
                f"Rate limit reached for {'; '.join(reasons)}. Please try again in {_duration(wait)}. "
                "(simulated limit)",
                self.headers(retry_after=wait),
            )
        if self._requests:
            self._requests.level -= 1
        if self._tokens:
            self._tokens.level -= prompt_tokens

    def spend(self, completion_tokens: int) -> None:
        if self._tokens:
            self._tokens.refill()
            self._tokens.level -= completion_tokens  # may go negative: later calls wait longer

    def headers(self, retry_after: float | None = None) -> dict[str, str]:
        """The x-ratelimit-* headers (empty when no limit is configured)."""
        h: dict[str, str] = {}
        if self._requests:
            self._requests.refill()
            h["x-ratelimit-limit-requests"] = str(self.cfg.rpm_limit)
            h["x-ratelimit-remaining-requests"] = str(max(0, int(self._requests.level)))
            h["x-ratelimit-reset-requests"] = _duration(self._requests.reset_s())
        if self._tokens:
            self._tokens.refill()
            h["x-ratelimit-limit-tokens"] = str(self.cfg.tpm_limit)
            h["x-ratelimit-remaining-tokens"] = str(max(0, int(self._tokens.level)))
            h["x-ratelimit-reset-tokens"] = _duration(self._tokens.reset_s())
        if retry_after is not None:
            h["retry-after"] = f"{retry_after:.3f}"
            h["retry-after-ms"] = str(max(1, round(retry_after * 1000)))
        return h


async def hang(request: Request) -> None:
    """Sleep far past any client timeout; stop early once the client has gone (it timed out)."""
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            return
