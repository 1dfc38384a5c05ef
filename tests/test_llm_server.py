"""LLMClient against a small scripted OpenAI-compatible server of our own on 127.0.0.1 (real
HTTP through the SDK): terminal errors, retry-after, timeouts, what is sent (extra_body, seed),
unknown prices, the budget refusal for unpriced models, embeddings, concurrency."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from harness.config import EndpointConfig, SamplingConfig
from harness.errors import ConfigError, LLMError
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.records import Message, SampleId, UsageRecord


class ScriptedServer:
    """Answers chat and embedding requests; `script` holds (status, body, headers, delay_s)
    replies used first, in order; then it answers 200. Records every request body."""

    def __init__(self, *, delay_s: float = 0.0, usage: bool = True, ok_headers=None):
        """`ok_headers(body)`: headers of each 200 answer (e.g. x-ratelimit-* announcements)."""
        self.requests: list[dict] = []
        self.times: list[float] = []  # time.monotonic() of each request's arrival
        self.ok_headers = ok_headers
        self.script: list[tuple[int, dict, dict, float]] = []
        self.delay_s = delay_s
        self.usage = usage
        self.active = 0
        self.max_active = 0
        # When set: each request is held until this many are in flight at once (30 s at most),
        # so a test of concurrency does not depend on how fast a loaded machine sends them.
        self.hold_until_active: int | None = None
        app = FastAPI()

        async def reply(request: Request, ok) -> JSONResponse:
            body = await request.json()
            self.requests.append(body)
            self.times.append(time.monotonic())
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                for _ in range(3000):
                    if self.hold_until_active is None or self.max_active >= self.hold_until_active:
                        break
                    await asyncio.sleep(0.01)
                if self.script:
                    status, payload, headers, delay = self.script.pop(0)
                    await asyncio.sleep(delay)
                    if status != 200:
                        return JSONResponse(payload, status_code=status, headers=headers)
                await asyncio.sleep(self.delay_s)
                return JSONResponse(ok(body), headers=self.ok_headers(body) if self.ok_headers else None)
            finally:
                self.active -= 1

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            def ok(body):
                out = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": f"answer seed={body.get('seed')}"}}]}
                if self.usage:
                    out["usage"] = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
                                    "prompt_tokens_details": {"cached_tokens": 20}}
                return out
            return await reply(request, ok)

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            def ok(body):
                return {"object": "list", "model": body["model"],
                        "data": [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]}
                                 for i, t in enumerate(body["input"])],
                        "usage": {"prompt_tokens": 7, "total_tokens": 7}}
            return await reply(request, ok)

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", limit_concurrency=1000,
                                                     backlog=1024))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)

    def fail(self, status: int, error: dict | None = None, headers: dict | None = None, times: int = 1,
             delay_s: float = 0.0) -> None:
        for _ in range(times):
            self.script.append((status, {"error": error or {"message": f"scripted {status}"}}, headers or {}, delay_s))

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def server():
    with ScriptedServer() as s:
        yield s


def sid(agent: int = 0, problem: str = "p1", rnd: int = 0) -> SampleId:
    return SampleId(iteration=0, split="test", problem_id=problem, agent=agent, round=rnd)


def client(url: str, run_dir: Path, *, kind: str = "openai", sampling: SamplingConfig | None = None, **kw) -> LLMClient:
    ep_fields = {k: kw.pop(k) for k in ("concurrency", "timeout_s", "max_retries") if k in kw}
    endpoint = EndpointConfig(kind=kind, base_url=url, api_key_env="TEST_KEY_ENV", **ep_fields)
    return LLMClient(base_url=url, api_key="test-key", run_dir=run_dir, endpoint=endpoint,
                     sampling=sampling or SamplingConfig(max_tokens=64), **kw)


Q = [Message(role="user", content="What is 2+3?")]


# ----------------------------------------------------------------------------- terminal errors

@pytest.mark.parametrize("status,error,expect", [
    (401, {"message": "Incorrect API key", "code": "invalid_api_key"}, "authentication failed at {url}: check the key in $TEST_KEY_ENV"),
    (403, {"message": "no access", "code": "model_not_allowed"}, "permission denied at {url}"),
    (400, {"message": "max_tokens is too large", "code": "invalid_request"}, "bad request for model 'gpt-4o-mini' at {url}"),
    (404, {"message": "The model does not exist", "code": "model_not_found"}, "model 'gpt-4o-mini' not found at {url}: check models.base"),
    (429, {"message": "You exceeded your current quota", "code": "insufficient_quota", "type": "insufficient_quota"},
     "insufficient quota at {url}: add credit"),
])
async def test_terminal_errors_fail_fast_with_advice(server, tmp_path, status, error, expect):
    server.fail(status, error, times=10)
    async with client(server.base_url, tmp_path, max_retries=5) as c:
        with pytest.raises(LLMError) as info:
            await c.chat("gpt-4o-mini", Q, sid())
    assert len(server.requests) == 1  # no retry
    assert expect.format(url=server.base_url) in str(info.value)
    assert read_jsonl(tmp_path / "usage.jsonl") == []  # nothing was paid, nothing recorded


# ----------------------------------------------------------------------------- transient errors

async def test_retry_after_is_honoured(server, tmp_path):
    server.fail(429, {"message": "Rate limit reached", "code": "rate_limit_exceeded"}, headers={"retry-after": "1"})
    async with client(server.base_url, tmp_path) as c:
        result = await c.chat("gpt-4o-mini", Q, sid())
    assert result.usage.attempts == 2 and len(server.requests) == 2
    # The second attempt waited the 1 s the server asked for (our own first backoff is <= 0.5 s).
    assert server.times[1] - server.times[0] >= 1.0


async def test_retry_after_ms_is_honoured(server, tmp_path):
    server.fail(503, {"message": "overloaded"}, headers={"retry-after-ms": "700"})
    async with client(server.base_url, tmp_path) as c:
        result = await c.chat("gpt-4o-mini", Q, sid())
    assert result.usage.attempts == 2 and server.times[1] - server.times[0] >= 0.7


async def test_gives_up_after_max_retries_naming_model_url_attempts(server, tmp_path):
    server.fail(500, {"message": "boom"}, headers={"retry-after-ms": "10"}, times=10)
    async with client(server.base_url, tmp_path, max_retries=2) as c:
        with pytest.raises(LLMError) as info:
            await c.chat("gpt-4o-mini", Q, sid())
    msg = str(info.value)
    assert "'gpt-4o-mini'" in msg and server.base_url in msg and "after 3 attempt(s)" in msg and "500" in msg
    assert len(server.requests) == 3


async def test_timeout_is_retried(server, tmp_path):
    server.fail(200, {}, delay_s=1.5)  # first request hangs past the client's timeout
    async with client(server.base_url, tmp_path, timeout_s=0.5) as c:
        result = await c.chat("gpt-4o-mini", Q, sid())
    assert result.usage.attempts == 2 and result.text.startswith("answer")


# ----------------------------------------------------------------------------- what is sent

async def test_extra_body_only_for_vllm_and_seed_per_sample(server, tmp_path):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=32, extra_body={"top_k": 20, "min_p": 0.05})
    async with client(server.base_url, tmp_path / "a", kind="vllm", sampling=sampling) as c:
        await c.chat("base", Q, sid(0))
        await c.chat("base", Q, sid(1))
    async with client(server.base_url, tmp_path / "b", kind="openai", sampling=sampling) as c:
        await c.chat("gpt-4o-mini", Q, sid(0))
    vllm0, vllm1, openai0 = server.requests
    assert vllm0["top_k"] == 20 and vllm0["min_p"] == 0.05
    assert "top_k" not in openai0 and "min_p" not in openai0
    assert vllm0["temperature"] == 0.7 and vllm0["top_p"] == 0.9 and vllm0["max_completion_tokens"] == 32
    assert "max_tokens" not in vllm0 and "max_tokens" not in openai0  # deprecated in OpenAI's API and in vLLM
    assert vllm0["seed"] != vllm1["seed"] and vllm0["seed"] == openai0["seed"]
    unseeded = SamplingConfig(seeded=False)
    async with client(server.base_url, tmp_path / "c", sampling=unseeded) as c:
        await c.chat("gpt-4o-mini", Q, sid(0))
    assert "seed" not in server.requests[-1]


# ----------------------------------------------------------------------------- usage and prices

async def test_usage_lines_cost_and_unknown_price(server, tmp_path):
    async with client(server.base_url, tmp_path) as c:
        known = await c.chat("gpt-4o-mini", Q, sid(0), purpose="summary")
        unknown = await c.chat("my-local-model", Q, sid(1))
        again = await c.chat("my-local-model", Q, sid(1))
        totals = c.totals()
    assert unknown.usage.cost_usd is None and not unknown.cached  # unknown, never $0
    lines = [json.loads(x) for x in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    first = UsageRecord.model_validate(lines[0])
    assert first.purpose == "summary" and first.sample == sid(0) and not first.cached and first.attempts == 1
    assert (first.prompt_tokens, first.completion_tokens, first.cached_prompt_tokens) == (100, 50, 20)
    assert first.cost_usd == pytest.approx((80 * 0.15 + 20 * 0.075 + 50 * 0.60) / 1e6)
    assert first.latency_s > 0 and known.usage == first
    assert lines[1]["cost_usd"] is None and lines[1]["model"] == "my-local-model"  # null, never 0
    assert again.cached and lines[2]["cached"] is True and lines[2]["cost_usd"] == 0.0
    assert totals.calls == 2 and totals.cache_hits == 1 and totals.unknown_cost_calls == 1
    assert totals.unknown_cost_models == ["my-local-model"] and totals.cost_usd == pytest.approx(first.cost_usd)
    assert len(server.requests) == 2


async def test_price_override_from_config(server, tmp_path):
    async with client(server.base_url, tmp_path, prices={"my-*": {"input": 1.0, "output": 2.0}}) as c:
        r = await c.chat("my-local-model", Q, sid())
    assert r.usage.cost_usd == pytest.approx((100 * 1.0 + 50 * 2.0) / 1e6)


def test_bad_price_override_fails_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="prices.my-model"):
        client("http://127.0.0.1:9/v1", tmp_path, prices={"my-model": {"input": 1.0, "outptu": 2.0}})


async def test_missing_usage_charges_the_estimate(tmp_path):
    with ScriptedServer(usage=False) as s:
        async with client(s.base_url, tmp_path) as c:
            r = await c.chat("gpt-4o-mini", Q, sid())
    assert r.usage.prompt_tokens is None and r.usage.cost_usd and r.usage.cost_usd > 0


async def test_budget_refuses_unpriced_model_before_calling(server, tmp_path):
    async with client(server.base_url, tmp_path, budget_usd=1.0) as c:
        with pytest.raises(ConfigError, match="price of model 'my-local-model' is unknown"):
            await c.chat("my-local-model", Q, sid())
    assert server.requests == []


# ----------------------------------------------------------------------------- cache, dedup, embeddings

async def test_identical_concurrent_requests_share_one_call(tmp_path):
    with ScriptedServer(delay_s=0.3) as s:
        async with client(s.base_url, tmp_path) as c:
            a, b = await asyncio.gather(c.chat("gpt-4o-mini", Q, sid()), c.chat("gpt-4o-mini", Q, sid()))
    assert a.text == b.text and len(s.requests) == 1 and sorted([a.cached, b.cached]) == [False, True]


async def test_embeddings_are_cached_and_recorded(server, tmp_path):
    texts = ["a", "bb", "ccc"]
    async with client(server.base_url, tmp_path) as c:
        v1 = await c.embed("text-embedding-3-small", texts)
        v2 = await c.embed("text-embedding-3-small", texts)
    assert v1 == v2 == [[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]
    assert len(server.requests) == 1
    lines = read_jsonl(tmp_path / "usage.jsonl", UsageRecord)
    assert [r.purpose for r in lines] == ["embed", "embed"] and [r.cached for r in lines] == [False, True]
    assert lines[0].cost_usd == pytest.approx(7 * 0.02 / 1e6)


# ----------------------------------------------------------------------------- concurrency

async def test_concurrency_limit_is_respected(tmp_path):
    with ScriptedServer(delay_s=0.2) as s:
        async with client(s.base_url, tmp_path, concurrency=4) as c:
            await asyncio.gather(*(c.chat("gpt-4o-mini", Q, sid(a)) for a in range(12)))
    assert s.max_active == 4


@pytest.mark.slow
async def test_connection_pool_does_not_cap_concurrency_64(tmp_path):
    # 64 calls at concurrency 64 must all be in flight at once (the HTTP pool is sized to the
    # semaphore): the server, holding each until 64 are open, sees all 64, not rounds of 16-32.
    with ScriptedServer() as s:
        async with client(s.base_url, tmp_path, concurrency=64) as c:
            # The first call to a server goes alone (its headers may announce rate limits).
            await c.chat("gpt-4o-mini", Q, sid(0, "warm-up"))
            s.hold_until_active = 64
            await asyncio.gather(*(c.chat("gpt-4o-mini", Q, sid(a)) for a in range(64)))
    assert s.max_active == 64


async def test_several_servers_share_the_agents(tmp_path):
    """One vLLM per GPU: agent n's calls go to server n mod count, and every call is answered."""
    with ScriptedServer() as a, ScriptedServer() as b:
        endpoint = EndpointConfig(kind="vllm", api_key_env=None)
        async with LLMClient(base_url=[a.base_url, b.base_url], api_key="EMPTY", run_dir=tmp_path,
                             endpoint=endpoint, sampling=SamplingConfig(max_tokens=16)) as c:
            results = await asyncio.gather(*(
                c.chat("base", [Message(role="user", content=f"agent {n} asks")], sid(agent=n)) for n in range(4)))
    assert all(r.text.startswith("answer") for r in results)
    seen = lambda server: sorted(r["messages"][0]["content"] for r in server.requests)  # noqa: E731
    assert seen(a) == ["agent 0 asks", "agent 2 asks"] and seen(b) == ["agent 1 asks", "agent 3 asks"]


async def test_cancelling_one_of_two_identical_requests_does_not_cancel_the_other(tmp_path):
    with ScriptedServer(delay_s=0.3) as server:
        async with client(server.base_url, tmp_path) as c:
            first = asyncio.create_task(c.chat("gpt-4o-mini", Q, sid()))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(c.chat("gpt-4o-mini", Q, sid()))  # shares the first's call
            await asyncio.sleep(0.05)
            first.cancel()
            result = await second
    assert result.text.startswith("answer")
    with pytest.raises(asyncio.CancelledError):
        await first
