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

Transient (retried): HTTP 408, 429 (except `insufficient_quota` and a single request larger
than the TPM limit), 5xx, connection errors and timeouts. Everything else is terminal and fails
at once: retrying a bad key, a missing model or a bad request only multiplies the same error.

Rate limits (`is_rate_limited`) are not failures when the caller paces (LLMClient, with a
pacing.Pacer): `retrying(..., rate_limit_wait_s=..., stalled_s=...)` then does not count them
against `max_retries`, waits nothing itself (the pacer holds the next attempt until the server's
wait is over) and gives up only once no call has got through for `rate_limit_wait_s`.
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
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

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
    seen from overloaded proxies; a persistent one ends as LLMError after the attempts.

    `kind`: "not_json" (an HTML page, garbage) or "not_completion" (JSON such as `{}` without
    choices), the marks of a wrong base_url or a proxy / login page; "malformed" otherwise.
    `content_type` and `body_start` show the user what came back."""

    def __init__(self, message: str, *, kind: str = "malformed", content_type: str | None = None,
                 body_start: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.content_type = content_type
        self.body_start = body_start


def not_an_api_message(exc: MalformedResponse, *, base_url: str, subject: str, attempts: int) -> str:
    """A 200 answer that is no completion: almost always the wrong URL, or a page in between."""
    what = "a body that is not JSON" if exc.kind == "not_json" else "JSON that is not a chat completion"
    tries = f" ({attempts} attempts)" if attempts > 1 else ""
    return (f"{subject} at {base_url}: the server answered HTTP 200 with {what}{tries}: content-type "
            f"{exc.content_type or '(none)'}, body starting {exc.body_start or ''!r}. This is not an OpenAI-compatible "
            f"API answering: check that endpoint.base_url is the API root, ending in /v1 (e.g. "
            f"https://api.openai.com/v1, http://127.0.0.1:8000/v1 for vLLM), and that no proxy, login or captive "
            f"page answers in its place (try: curl {base_url.rstrip('/')}/models)")


def _status(exc: BaseException) -> int | None:
    return exc.status_code if isinstance(exc, openai.APIStatusError) else None


def _code(exc: BaseException) -> str | None:
    code = getattr(exc, "code", None)
    if code is None and isinstance(getattr(exc, "body", None), dict):
        code = exc.body.get("code") or exc.body.get("type")
    return str(code) if code is not None else None


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)


def is_request_too_large(exc: BaseException) -> bool:
    """OpenAI's 429 for one request larger than the whole TPM limit: waiting cannot help."""
    return _status(exc) == 429 and "request too large" in _message(exc).lower()


def is_rate_limited(exc: BaseException | None) -> bool:
    """A 429 that waiting cures: a rate limit, not an empty quota or an oversized request."""
    return (exc is not None and _status(exc) == 429 and _code(exc) != "insufficient_quota"
            and not is_request_too_large(exc))


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def cannot_connect(exc: BaseException | None) -> bool:
    """The connection itself was refused or could not be made: nothing is listening at the URL
    (or the host is unreachable). The SDK reports this as a connection error or, with the aiohttp
    transport, as a *timeout*, so the cause chain is what tells."""
    for e in _chain(exc):
        if isinstance(e, (ConnectionRefusedError, httpx2.ConnectError)):
            return True
        if type(e).__name__ in ("ClientConnectorError", "ClientConnectorDNSError"):  # aiohttp's
            return True
    return False


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
    if status == 429 and not is_rate_limited(exc):
        return False  # waiting does not add credit, nor make a request smaller
    return status in _TRANSIENT_STATUS or status >= 500


def is_terminal(exc: BaseException) -> bool:
    """True when retrying cannot help (auth, permission, bad request, missing model, quota,
    or any error that is not a known transient one): fail fast."""
    return not is_transient(exc)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """OpenAI's x-ratelimit-reset-* headers: '1s', '6m0s', '20ms', '1h2m3.5s'."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after_s(exc: BaseException, *, use_reset: bool = True) -> float | None:
    """Seconds the server asked us to wait, from retry-after-ms, retry-after (seconds or an
    HTTP date), or (`use_reset`) the x-ratelimit-reset-* headers of a 429; None if it did not say."""
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
    if use_reset and _status(exc) == 429:
        resets = [parse_duration(headers.get(h) or "") for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
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


class _Policy:
    """When to stop and how long to wait, for one logical call. Rate-limited attempts under
    pacing neither count as failures nor wait here (the pacer holds the next attempt)."""

    def __init__(self, max_retries: int, base_s: float, cap_s: float, rate_limit_wait_s: float | None,
                 stalled_s: Callable[[], float] | None, give_up: Callable[[BaseException], bool] | None):
        self.max_retries, self.base_s, self.cap_s = max_retries, base_s, cap_s
        self.rate_limit_wait_s, self.stalled_s, self.give_up = rate_limit_wait_s, stalled_s, give_up
        self.failures = 0

    def _paced(self, exc: BaseException | None) -> bool:
        return self.rate_limit_wait_s is not None and is_rate_limited(exc)

    def stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None and self.give_up is not None and self.give_up(exc):
            return True
        if self._paced(exc):
            stalled = self.stalled_s() if self.stalled_s is not None else state.seconds_since_start
            return stalled >= self.rate_limit_wait_s
        self.failures += 1
        return self.failures > self.max_retries

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if self._paced(exc):
            return 0.0
        return backoff_s(max(1, self.failures), exc, base_s=self.base_s, cap_s=self.cap_s)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.info("transient error (attempt %d), retrying in %.2fs: %s", state.attempt_number,
             state.next_action.sleep if state.next_action else 0.0, short_error(exc))


def retrying(max_retries: int, *, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S,
             rate_limit_wait_s: float | None = None, stalled_s: Callable[[], float] | None = None,
             give_up: Callable[[BaseException], bool] | None = None) -> AsyncRetrying:
    """A tenacity AsyncRetrying: transient errors only, at most `max_retries` retries of failures,
    retry-after honoured, otherwise jittered exponential backoff. The last error is re-raised
    unchanged (reraise=True) so the caller can explain it with `final_error`.

    `rate_limit_wait_s`: the caller paces; rate-limited attempts are then free and retried at once
    until `stalled_s()` (default: time since the first attempt) reaches it. `give_up(exc)`: True
    stops at once (e.g. nothing listening at a server that never answered)."""
    policy = _Policy(max_retries, base_s, cap_s, rate_limit_wait_s, stalled_s, give_up)
    return AsyncRetrying(
        stop=policy.stop,
        retry=retry_if_exception(is_transient),
        wait=policy.wait,
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
    if is_request_too_large(exc):
        return (f"one request for {what} at {base_url} is larger than the whole tokens-per-minute limit there: "
                f"lower sampling.max_tokens (it counts against the limit), shorten the prompt (fewer debate rounds "
                f"or agents) or ask the provider for a higher limit ({detail})")
    if status == 429 and code == "insufficient_quota":
        return (f"insufficient quota at {base_url}: add credit to the account, or lower the work "
                f"(task.n_train, task.n_test, debate.agents, debate.rounds) and set budget.max_cost_usd ({detail})")
    if status in (400, 422):
        return (f"bad request for {what} at {base_url}: check the sampling settings (sampling.*), the prompt "
                f"length against the model's context, and for vLLM sampling.extra_body ({detail})")
    return f"{what} at {base_url} failed: {detail}"


def cannot_connect_message(base_url: str, *, answered_before: bool = False) -> str:
    msg = f"cannot connect to {base_url}: nothing is listening there; is the server running / is endpoint.base_url right?"
    if answered_before:
        msg += " (it answered earlier in this run, so the server has probably stopped; start it again and resume)"
    return msg


def final_error(exc: BaseException, *, attempts: int, base_url: str, model: str | None = None,
                api_key_env: str | None = None, what: str | None = None,
                rate_limit_wait_s: float | None = None, answered_before: bool | None = None) -> LLMError:
    """The LLMError a caller raises once retrying has stopped (terminal error, attempts used, or a
    rate limit that did not lift within `rate_limit_wait_s`). `answered_before`: whether the server
    gave any HTTP answer in this session (None: not known)."""
    if cannot_connect(exc):
        return LLMError(cannot_connect_message(base_url, answered_before=bool(answered_before)))
    if rate_limit_wait_s is not None and is_rate_limited(exc):
        subject = what or (f"model '{model}'" if model else "the request")
        return LLMError(
            f"{subject} at {base_url}: the server kept refusing calls for its rate limit (HTTP 429) and none got "
            f"through for {rate_limit_wait_s:g}s, so the limit is not lifting. Check the account's limits for this "
            f"model, or set endpoint.rpm_limit / endpoint.tpm_limit below them, or raise endpoint.rate_limit_wait_s; "
            f"finished calls are cached and the run resumes where it stopped. Last answer: {short_error(exc)}",
            status=429, code=_code(exc))
    if is_terminal(exc):
        return LLMError(terminal_message(exc, base_url=base_url, model=model, api_key_env=api_key_env),
                        status=_status(exc), code=_code(exc))
    subject = what or (f"model '{model}'" if model else "the request")
    if isinstance(exc, MalformedResponse) and exc.kind != "malformed":
        return LLMError(not_an_api_message(exc, base_url=base_url, subject=subject, attempts=attempts))
    if answered_before is False and isinstance(exc, openai.APIConnectionError):
        # Not one HTTP answer in this session: the server is not failing, it is not there.
        return LLMError(
            f"{subject} at {base_url}: no answer in {attempts} attempt(s) ({short_error(exc)}), and the server has "
            f"not answered once in this run: is it running and reachable from here, and is endpoint.base_url its "
            f"address? (A host that silently drops connections looks like this.) If it is just slow to start or "
            f"to answer, raise endpoint.timeout_s.")
    return LLMError(
        f"{subject} at {base_url} failed after {attempts} attempt(s); last error: {short_error(exc)}. "
        f"The server kept failing{' or rate-limiting' if is_rate_limited(exc) else ''}: try again later (finished "
        f"calls are cached, the run resumes where it stopped), lower endpoint.concurrency, or raise "
        f"endpoint.max_retries."
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
    "BACKOFF_BASE_S", "BACKOFF_CAP_S", "MAX_RETRY_AFTER_S", "MalformedResponse", "backoff_s", "cannot_connect",
    "cannot_connect_message", "final_error", "is_rate_limited", "is_request_too_large", "is_terminal",
    "is_transient", "not_an_api_message", "parse_duration", "retry_after_s", "retrying", "short_error", "terminal_message",
    "with_retries",
]
