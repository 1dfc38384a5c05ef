"""Fault injection for chat calls: latency, rate limits (429), server errors (500), hangs.

* Latency: each call sleeps (asynchronously, so hundreds of calls wait at once) for
  max(0, normal(latency_ms, latency_jitter_ms)) milliseconds.
* Rate limits: ``rpm_limit`` requests and ``tpm_limit`` tokens per minute, as OpenAI describes
  its limits: budgets that refill continuously (rpm/60 requests and tpm/60 tokens a second) up
  to a full minute's worth, `x-ratelimit-reset-*` being the time until a budget is whole again.
  A request counts its prompt tokens plus its output allowance (`max_completion_tokens`, or the
  deprecated `max_tokens`, times `n`) when admitted, as OpenAI counts TPM; without an allowance
  its completion tokens are spent when answered. A request that finds no request left, or too
  few tokens, gets a 429 `rate_limit_exceeded` with an integer ``retry-after`` in seconds (at
  least 1, the OpenAPI spec's type) and the ``x-ratelimit-*`` headers; its message says the
  precise wait, as OpenAI's do. One request larger than the whole TPM budget gets OpenAI's
  "Request too large" 429, which waiting cannot cure. Every chat response (200, 429 and 500)
  carries the ``x-ratelimit-*`` headers, taken when the request was admitted or refused.
  Rejected requests spend nothing.
* 500s and hangs: each HTTP request draws its own fault (seeded by the config seed and the
  request's arrival number), so a retry of the same prompt is a new draw and can succeed.
  A hang sleeps far past any client timeout and ends when the client disconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import math
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
    if minutes >= 1:
        return f"{int(minutes)}m{secs:.0f}s"
    return f"{secs:.3f}".rstrip("0").rstrip(".") + "s"  # millisecond precision, as OpenAI writes it


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
    def admit(self, prompt_tokens: int, output_allowance: int | None = None, model: str = "") -> dict[str, str]:
        """Spend one request and the request's tokens (prompt + output allowance), or raise
        RateLimited. Returns the x-ratelimit-* headers as they stand after admission."""
        for bucket in (self._requests, self._tokens):
            if bucket:
                bucket.refill()
        tokens = prompt_tokens + (output_allowance or 0)
        waits = []
        reasons = []
        if self._requests:
            w = self._requests.wait_for(1)
            if w > 0:
                waits.append(w)
                reasons.append(f"requests per min (RPM): Limit {self.cfg.rpm_limit}, Used {self.cfg.rpm_limit}, "
                               f"Requested 1")
        if self._tokens:
            w = self._tokens.wait_for(tokens)
            if w == float("inf"):
                raise RateLimited(
                    f"Request too large for {model or 'this model'} on tokens per min (TPM): Limit "
                    f"{self.cfg.tpm_limit}, Requested {tokens}. The input or output tokens must be reduced in order "
                    f"to run successfully. (simulated limit)",
                    self.headers(),
                )
            if w > 0:
                waits.append(w)
                used = self.cfg.tpm_limit - max(0, int(self._tokens.level))
                reasons.append(f"tokens per min (TPM): Limit {self.cfg.tpm_limit}, Used {used}, Requested {tokens}")
        if waits:
            wait = max(waits)
            raise RateLimited(
                f"Rate limit reached for {model or 'this model'} on {'; '.join(reasons)}. Please try again in "
                f"{_duration(wait)}. (simulated limit)",
                self.headers(retry_after=wait),
            )
        if self._requests:
            self._requests.level -= 1
        if self._tokens:
            self._tokens.level -= tokens
        return self.headers()

    def spend(self, completion_tokens: int) -> None:
        """Completion tokens of a request admitted without an output allowance."""
        if self._tokens:
            self._tokens.refill()
            self._tokens.level -= completion_tokens  # may go negative: later calls wait longer

    def headers(self, retry_after: float | None = None) -> dict[str, str]:
        """The x-ratelimit-* headers (empty when no limit is configured), and on a 429 the
        retry-after: whole seconds, at least 1, rounded up so that it is never too early."""
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
            h["retry-after"] = str(max(1, math.ceil(retry_after)))
        return h


async def hang(request: Request) -> None:
    """Sleep far past any client timeout; stop early once the client has gone (it timed out)."""
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            return
