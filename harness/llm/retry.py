"""The one retry layer for every call the harness makes to a model API (chat, embeddings,
file uploads, fine-tuning jobs). The OpenAI SDK's own retries are switched off
(`max_retries=0`) wherever a client is built, so a failure is retried exactly once per layer.

Two ways to use it:

    # 1. a helper: retries `fn` (a zero-argument coroutine function), raises LLMError at the end
    result = await with_retries(lambda: client.files.create(...), max_retries=6,
                                what="uploading train.jsonl", base_url=url)

    # 2. tenacity's iterator, when the caller needs the attempt number or its own bookkeeping
    async for attempt in retrying(max_retries):
        with attempt:
            ...
    # the last transient error is re-raised as is; convert it with `final_error(...)`

Transient (retried): HTTP 408, 429 (except `insufficient_quota`), 5xx, connection errors and
timeouts. Everything else is terminal and fails at once: retrying a bad key, a missing model or
a bad request only multiplies the same error.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
from typing import Awaitable, Callable, TypeVar

import httpx2
import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from harness.errors import HarnessError, LLMError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Backoff when the server gives no retry-after: "equal jitter" exponential,
# wait ~ U(d/2, d) with d = min(CAP, BASE * 2**(attempt-1)). A small base keeps brief 5xx
# blips cheap; the cap keeps one stubborn request from stalling a debate for minutes; the
# jitter spreads 64 concurrent callers that failed together so they do not retry together.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0
# A server's retry-after is obeyed up to this; beyond it (e.g. a daily quota window) waiting
# silently would look like a hang, so we wait the cap and let the attempts run out instead.
MAX_RETRY_AFTER_S = 60.0

_TRANSIENT_STATUS = {408, 429}


class MalformedResponse(Exception):
    """The server answered 200 with a body we cannot use (no choices, no data). Retried:
    seen from overloaded proxies; a persistent one ends as LLMError after the attempts."""


def _status(exc: BaseException) -> int | None:
    return exc.status_code if isinstance(exc, openai.APIStatusError) else None


def _code(exc: BaseException) -> str | None:
    code = getattr(exc, "code", None)
    if code is None and isinstance(getattr(exc, "body", None), dict):
        code = exc.body.get("code") or exc.body.get("type")
    return str(code) if code is not None else None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth another attempt."""
    if isinstance(exc, HarnessError):  # our own decisions (budget, config) are never retried
        return False
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError, asyncio.TimeoutError,
                        MalformedResponse)):
        return True  # APITimeoutError is a subclass of APIConnectionError
    status = _status(exc)
    if status is None:
        return False
    if status == 429 and _code(exc) == "insufficient_quota":
        return False  # waiting does not add credit
    return status in _TRANSIENT_STATUS or status >= 500


def is_terminal(exc: BaseException) -> bool:
    """True when retrying cannot help (auth, permission, bad request, missing model, quota,
    or any error that is not a known transient one): fail fast."""
    return not is_transient(exc)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_duration(text: str) -> float | None:
    """OpenAI's x-ratelimit-reset-* headers: '1s', '6m0s', '20ms', '1h2m3.5s'."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait, from retry-after-ms, retry-after (seconds or an
    HTTP date), or the x-ratelimit-reset-* headers of a 429; None if it did not say."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(float(value) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        try:
            return max(float(value), 0.0)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(email.utils.mktime_tz(parsed) - time.time(), 0.0)
    if _status(exc) == 429:
        resets = [_parse_duration(headers.get(h) or "") for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
        resets = [r for r in resets if r is not None]
        if resets:
            return max(resets)
    return None


def backoff_s(attempt: int, exc: BaseException | None, *, base_s: float = BACKOFF_BASE_S,
              cap_s: float = BACKOFF_CAP_S) -> float:
    """Wait before retry number `attempt` (1 = after the first failure)."""
    hinted = retry_after_s(exc) if exc is not None else None
    if hinted is not None:
        # Obey the server, plus a little jitter so callers told "1s" together spread out.
        hinted = min(hinted, MAX_RETRY_AFTER_S)
        return hinted + random.uniform(0.0, 0.1 * hinted + 0.05)
    d = min(cap_s, base_s * 2 ** (attempt - 1))
    return random.uniform(d / 2, d)


def _wait(base_s: float, cap_s: float) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return backoff_s(state.attempt_number, exc, base_s=base_s, cap_s=cap_s)
    return wait


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.info("transient error (attempt %d), retrying in %.2fs: %s", state.attempt_number,
             state.next_action.sleep if state.next_action else 0.0, short_error(exc))


def retrying(max_retries: int, *, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> AsyncRetrying:
    """A tenacity AsyncRetrying: at most 1 + max_retries attempts, transient errors only,
    retry-after honoured, otherwise jittered exponential backoff. The last error is re-raised
    unchanged (reraise=True) so the caller can explain it with `final_error`."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_retries + 1),
        retry=retry_if_exception(is_transient),
        wait=_wait(base_s, cap_s),
        before_sleep=_log_retry,
        reraise=True,
    )


def short_error(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    status = _status(exc)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if status is not None:
        code = _code(exc)
        return f"HTTP {status}{f' ({code})' if code else ''}: {message}"
    return f"{type(exc).__name__}: {message}"


def terminal_message(exc: BaseException, *, base_url: str, model: str | None = None,
                     api_key_env: str | None = None) -> str:
    """What went wrong and what the user should do, for an error that is not retried."""
    status, code = _status(exc), _code(exc)
    detail = short_error(exc)
    what = f"model '{model}'" if model else "the request"
    if status == 401:
        where = f"${api_key_env}" if api_key_env else "the configured key (endpoint.api_key_env)"
        return f"authentication failed at {base_url}: check the key in {where} ({detail})"
    if status == 403:
        return (f"permission denied at {base_url} for {what}: the key's organisation or project has no access "
                f"to it (for fine-tuning: OpenAI only lets organisations that fine-tuned before create jobs) ({detail})")
    if status == 404:
        if code == "model_not_found" or model and "model" in detail.lower():
            return (f"{what} not found at {base_url}: check models.base / models.summarizer, or the model ids "
                    f"in registry.json ({detail})")
        return f"not found at {base_url} for {what}: check endpoint.base_url (it usually ends in /v1) ({detail})"
    if status == 429 and code == "insufficient_quota":
        return (f"insufficient quota at {base_url}: add credit to the account, or lower the work "
                f"(task.n_train, task.n_test, debate.agents, debate.rounds) and set budget.max_cost_usd ({detail})")
    if status in (400, 422):
        return (f"bad request for {what} at {base_url}: check the sampling settings (sampling.*), the prompt "
                f"length against the model's context, and for vLLM sampling.extra_body ({detail})")
    return f"{what} at {base_url} failed: {detail}"


def final_error(exc: BaseException, *, attempts: int, base_url: str, model: str | None = None,
                api_key_env: str | None = None, what: str | None = None) -> LLMError:
    """The LLMError a caller raises once retrying has stopped (terminal error or attempts used)."""
    if is_terminal(exc):
        return LLMError(terminal_message(exc, base_url=base_url, model=model, api_key_env=api_key_env),
                        status=_status(exc), code=_code(exc))
    subject = what or (f"model '{model}'" if model else "the request")
    return LLMError(
        f"{subject} at {base_url} failed after {attempts} attempt(s); last error: {short_error(exc)}. "
        f"The server kept failing or rate-limiting: try again later (finished calls are cached, the run "
        f"resumes where it stopped), lower endpoint.concurrency, or raise endpoint.max_retries."
    )


async def with_retries(fn: Callable[[], Awaitable[T]], max_retries: int, *, base_url: str,
                       what: str | None = None, model: str | None = None, api_key_env: str | None = None,
                       base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S,
                       error: Callable[[BaseException, int], Exception] | None = None) -> T:
    """Await `fn()` with retries of transient errors; any failure ends as LLMError, or as what
    `error(exc, attempts)` builds (our own HarnessErrors pass through unchanged). `fn` must be
    safe to repeat: for non-idempotent calls (creating a fine-tuning job) look the object up
    before creating it again."""
    attempts = 0
    try:
        async for attempt in retrying(max_retries, base_s=base_s, cap_s=cap_s):
            with attempt:
                attempts = attempt.retry_state.attempt_number
                return await fn()
    except HarnessError:
        raise
    except Exception as exc:
        if error is not None:
            raise error(exc, attempts) from exc
        raise final_error(exc, attempts=attempts, base_url=base_url, model=model,
                          api_key_env=api_key_env, what=what) from exc
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


__all__ = [
    "BACKOFF_BASE_S", "BACKOFF_CAP_S", "MAX_RETRY_AFTER_S", "MalformedResponse", "backoff_s", "final_error",
    "is_terminal", "is_transient", "retry_after_s", "retrying", "short_error", "terminal_message",
    "with_retries",
]
