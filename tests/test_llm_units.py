"""In-process tests of the pure parts of harness.llm: prices, backoff rules, seeds, cache keys."""

from __future__ import annotations

import math

import httpx2
import openai
import pytest

from harness.errors import BudgetExceeded, ConfigError, LLMError
from harness.llm import cost_usd, is_terminal, is_transient, price_for, sample_seed, with_retries
from harness.llm.cache import ResponseCache, cache_key
from harness.llm.pricing import estimate_cost, training_price_for
from harness.llm.retry import MAX_RETRY_AFTER_S, backoff_s, final_error, retry_after_s
from harness.records import SampleId


def _status_error(status: int, body: dict | None = None, headers: dict | None = None) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
           404: openai.NotFoundError, 429: openai.RateLimitError}.get(status, openai.InternalServerError)
    return cls(f"Error code: {status}", response=response, body=body)


# ----------------------------------------------------------------------------- pricing

def test_known_prices_and_snapshots():
    p = price_for("gpt-4o-mini")
    assert (p.input, p.cached_input, p.output) == (0.15, 0.075, 0.60)
    assert price_for("gpt-4o-mini-2024-07-18") == p
    assert price_for("gpt-4o-2024-08-06").input == 2.50
    assert price_for("gpt-4.1-nano").output == 0.40
    assert price_for("gpt-3.5-turbo-0125").cached_input is None
    # A variant that is not a dated snapshot is not guessed: unknown beats wrong.
    assert price_for("gpt-4o-audio-preview") is None
    assert price_for("llama-3-8b") is None


def test_finetuned_and_simulated_prices():
    assert price_for("ft:gpt-4o-mini-2024-07-18:my-org:agent0:AbC123").output == 1.20
    assert price_for("ft:gpt-4.1-mini:org::id").input == 0.80
    assert price_for("ft:gpt-3.5-turbo:org:x:y").output == 6.00
    assert price_for("sim-base").input == 0.15
    assert price_for("ft:sim-base:sim-org:run:abc").output == 1.20
    assert price_for("ft:unknown-model:org:x:y") is None


def test_overrides_win_and_patterns():
    over = {"gpt-4o-mini": {"input": 1.0, "output": 2.0}, "agent-*": {"input": 0, "output": 0}}
    assert price_for("gpt-4o-mini", over).input == 1.0
    assert price_for("agent-3-critic-it1", over).output == 0
    assert price_for("gpt-4o", over).input == 2.50
    with pytest.raises(ConfigError, match="prices.bad"):
        price_for("bad", {"bad": {"input": 1.0}})


def test_cost_with_cached_tokens_and_unknown():
    # 1M prompt tokens of which half cached, 1M completion tokens on gpt-4o-mini.
    c = cost_usd("gpt-4o-mini", 1_000_000, 500_000, 1_000_000)
    assert math.isclose(c, 0.5 * 0.15 + 0.5 * 0.075 + 0.60)
    # No cached discount: cached tokens billed at the input price.
    assert math.isclose(cost_usd("gpt-3.5-turbo", 1_000_000, 1_000_000, 0), 0.50)
    assert cost_usd("mystery", 10, 0, 10) is None
    assert math.isclose(estimate_cost("gpt-4o-mini", 4000, 1000), (1000 * 0.15 + 1000 * 0.60) / 1e6)


def test_training_prices():
    assert training_price_for("gpt-4o-mini-2024-07-18") == 3.00
    assert training_price_for("ft:gpt-4.1-mini:org:agent0:abc") == 5.00  # continuing from a finetune
    assert training_price_for("ft:sim-base:org:x:y") == training_price_for("sim-base") == 3.00  # simulated
    assert training_price_for("llama-3-8b") is None
    assert training_price_for("llama-3-8b", {"llama-*": {"input": 0, "output": 0, "training": 0}}) == 0.0


# ----------------------------------------------------------------------------- retry rules

@pytest.mark.parametrize("status,body,transient", [
    (429, {"code": "rate_limit_exceeded"}, True),
    (429, {"code": "insufficient_quota"}, False),
    (500, None, True), (502, None, True), (503, None, True),
    (400, None, False), (401, None, False), (403, None, False), (404, {"code": "model_not_found"}, False),
])
def test_transient_or_terminal(status, body, transient):
    exc = _status_error(status, body)
    assert is_transient(exc) is transient
    assert is_terminal(exc) is (not transient)


def test_connection_errors_are_transient_ours_are_not():
    req = httpx2.Request("POST", "http://127.0.0.1:1/v1/x")
    assert is_transient(openai.APIConnectionError(request=req))
    assert is_transient(openai.APITimeoutError(request=req))
    assert is_transient(httpx2.ConnectError("refused"))
    assert is_terminal(BudgetExceeded("cap"))
    assert is_terminal(ValueError("bug"))


def test_retry_after_headers():
    assert retry_after_s(_status_error(429, headers={"retry-after-ms": "250"})) == 0.25
    assert retry_after_s(_status_error(429, headers={"retry-after": "2"})) == 2.0
    assert retry_after_s(_status_error(429, headers={"x-ratelimit-reset-requests": "1m30s"})) == 90.0
    assert retry_after_s(_status_error(500)) is None
    wait = backoff_s(1, _status_error(429, headers={"retry-after": "3"}))
    assert 3.0 <= wait <= 3.0 + 0.35
    assert backoff_s(1, _status_error(429, headers={"retry-after": "99999"})) <= MAX_RETRY_AFTER_S * 1.1 + 0.05


def test_exponential_backoff_is_jittered_and_capped():
    waits = [backoff_s(1, None, base_s=0.5, cap_s=20) for _ in range(50)]
    assert all(0.25 <= w <= 0.5 for w in waits) and len(set(waits)) > 1
    assert all(10 <= backoff_s(12, None, base_s=0.5, cap_s=20) <= 20 for _ in range(20))


def test_terminal_messages_say_what_to_do():
    url = "http://127.0.0.1:9/v1"
    msg = str(final_error(_status_error(401), attempts=1, base_url=url, api_key_env="OPENAI_API_KEY"))
    assert "authentication failed at " + url in msg and "$OPENAI_API_KEY" in msg
    msg = str(final_error(_status_error(404, {"code": "model_not_found", "message": "no such model"}),
                          attempts=1, base_url=url, model="gpt-x"))
    assert "model 'gpt-x' not found" in msg and "models.base" in msg
    msg = str(final_error(_status_error(429, {"code": "insufficient_quota"}), attempts=1, base_url=url))
    assert "insufficient quota" in msg and "add credit" in msg
    msg = str(final_error(_status_error(503), attempts=7, base_url=url, model="m"))
    assert "after 7 attempt(s)" in msg and "'m'" in msg and url in msg and "503" in msg


async def test_with_retries_retries_transient_then_gives_up():
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _status_error(500)
        return "ok"

    assert await with_retries(flaky, 5, base_url="u", base_s=0.001, cap_s=0.002) == "ok"
    assert len(calls) == 3

    calls.clear()

    async def always_503():
        calls.append(1)
        raise _status_error(503)

    with pytest.raises(LLMError, match="after 3 attempt"):
        await with_retries(always_503, 2, base_url="u", what="uploading f.jsonl", base_s=0.001, cap_s=0.002)
    assert len(calls) == 3

    calls.clear()

    async def bad_key():
        calls.append(1)
        raise _status_error(401)

    with pytest.raises(LLMError, match="authentication failed"):
        await with_retries(bad_key, 5, base_url="u")
    assert len(calls) == 1


# ----------------------------------------------------------------------------- seeds and cache keys

def _sid(agent: int, **kw) -> SampleId:
    return SampleId(iteration=0, split="train", problem_id="p1", agent=agent, round=0, **kw)


def test_sample_seed_stable_distinct_31bit():
    seeds = {sample_seed(0, _sid(a)) for a in range(50)}
    assert len(seeds) == 50 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(0, _sid(1)) == sample_seed(0, _sid(1))
    assert sample_seed(0, _sid(1)) != sample_seed(1, _sid(1))


def test_cache_key_canonical_and_sample_aware(tmp_path):
    a = {"model": "m", "params": {"temperature": 1.0, "max_tokens": 5}, "sample": _sid(0).model_dump()}
    b = {"sample": _sid(0).model_dump(), "params": {"max_tokens": 5, "temperature": 1.0}, "model": "m"}
    assert cache_key(a) == cache_key(b)
    assert cache_key(a) != cache_key({**a, "sample": _sid(1).model_dump()})
    cache = ResponseCache(tmp_path / "cache.sqlite")
    cache.put(cache_key(a), "chat", "m", {"text": "héllo"})
    assert cache.get(cache_key(a)) == {"text": "héllo"} and cache.get("nope") is None
    cache.close()
    reopened = ResponseCache(tmp_path / "cache.sqlite")
    assert len(reopened) == 1
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()
