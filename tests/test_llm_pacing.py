"""Rate limits are paced, not fought; what goes on the wire follows OpenAI's current chat API;
nothing listening at base_url says so at once. Real HTTP on 127.0.0.1: the simulator, or the
scripted server of test_llm_server.py (which records every request body and arrival time)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from pathlib import Path

import pytest

from harness.config import EndpointConfig, SamplingConfig, SimulatorConfig
from harness.errors import LLMError
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.llm.cache import ResponseCache
from harness.records import Message, SampleId, UsageRecord
from harness.sim import SimServer
from test_llm_server import ScriptedServer
from local_processes import free_port

Q = [Message(role="user", content="What is 2+3?")]
RATE_LIMITED = {"message": "Rate limit reached for requests", "code": "rate_limit_exceeded", "type": "requests"}


def sid(agent: int = 0, problem: str = "p1") -> SampleId:
    return SampleId(iteration=0, split="test", problem_id=problem, agent=agent, round=0)


def make_client(url: str, run_dir: Path, *, kind: str = "openai", sampling: SamplingConfig | None = None,
                **endpoint) -> LLMClient:
    ep = EndpointConfig(kind=kind, base_url=url, api_key_env=None, **endpoint)
    return LLMClient(base_url=url, api_key="test-key", run_dir=run_dir, endpoint=ep,
                     sampling=sampling or SamplingConfig(max_tokens=64))


# ----------------------------------------------------------------------------- pacing

@pytest.mark.slow
def test_the_loop_finishes_under_a_sustained_rpm_limit_without_retries(cli, tmp_path):
    """The issue's reproduction, scaled down: ~180 calls against 170 requests a minute. Before
    pacing, each 429 used up a retry and the run died; now it waits for the budget, and with
    max_retries=0 no call may even need a retry."""
    run = tmp_path / "run"
    proc = cli("--set", "task.n_test=20", "--set", "finetune.iterations=0", "--set", "endpoint.simulator.rpm_limit=170",
               "--set", "endpoint.max_retries=0", "--run-dir", str(run), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = read_jsonl(run / "usage.jsonl", UsageRecord)
    calls = [r for r in lines if not r.cached]
    assert len(calls) > 170  # more than the first minute's budget: the run had to be paced
    assert {r.attempts for r in calls} == {1}  # and it never sent a call into a 429
    assert "error" not in proc.stdout.lower()


async def test_429s_do_not_use_up_retries(tmp_path):
    with ScriptedServer() as server:
        server.fail(429, RATE_LIMITED, headers={"retry-after-ms": "50"}, times=5)
        async with make_client(server.base_url, tmp_path, max_retries=0) as c:
            result = await c.chat("gpt-4.1-mini", Q, sid())
    assert result.text.startswith("answer") and result.usage.attempts == 6 and len(server.requests) == 6


async def test_a_limit_that_never_lifts_ends_with_a_clear_message(tmp_path):
    with ScriptedServer() as server:
        server.fail(429, RATE_LIMITED, headers={"retry-after-ms": "100"}, times=10_000)
        async with make_client(server.base_url, tmp_path, max_retries=6, rate_limit_wait_s=1.5) as c:
            t0 = time.monotonic()
            with pytest.raises(LLMError) as info:
                await c.chat("gpt-4.1-mini", Q, sid())
            elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "rate limit (HTTP 429)" in msg and "none got through for 1.5s" in msg and "endpoint.rate_limit_wait_s" in msg
    # more 429s than max_retries allowed, all waited out, for the whole 1.5 s (a lower bound: a
    # loaded machine only waits longer)
    assert elapsed >= 1.5 and len(server.requests) > 7


async def test_a_request_larger_than_the_whole_tpm_limit_fails_at_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="harness.llm.retry")
    with SimServer(SimulatorConfig(tpm_limit=1000)) as sim:
        async with make_client(sim.base_url, tmp_path, kind="simulator",
                               sampling=SamplingConfig(max_tokens=2000)) as c:
            with pytest.raises(LLMError, match="larger than the whole tokens-per-minute limit.*sampling.max_tokens"):
                await c.chat("sim-base", Q, sid())
            waited = c.pacing()[sim.base_url]["waited_s"]
    assert waited == 0 and "retrying" not in caplog.text  # refused before waiting for a budget it can never get


async def test_the_configured_rpm_is_respected(tmp_path):
    # A server that announces nothing: endpoint.rpm_limit=120 alone paces, 2 a second.
    with ScriptedServer() as server:
        async with make_client(server.base_url, tmp_path, concurrency=64, rpm_limit=120) as c:
            await asyncio.gather(*(c.chat("gpt-4.1-mini", Q, sid(a)) for a in range(9)))
    t = [x - server.times[0] for x in server.times]
    assert len(t) == 9
    # A burst of one second's worth (2), then one every 0.5 s: never ahead of the configured rate.
    assert all(t[i] >= (i - 2) * 0.5 - 0.02 for i in range(9)), t


async def test_the_servers_rate_limit_headers_are_read_and_obeyed(tmp_path):
    # The server never refuses; it only announces 60 requests a minute with 3 left. The client
    # must pace itself from those headers: after the first three, one call a second.
    start = time.monotonic()
    served = [0]

    def announce(body) -> dict:
        served[0] += 1
        left = max(0, math.floor(3 + (time.monotonic() - start) * 1.0 - served[0]))
        return {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": str(left),
                "x-ratelimit-reset-requests": f"{60 - left}s"}

    with ScriptedServer(ok_headers=announce) as server:
        async with make_client(server.base_url, tmp_path, concurrency=64) as c:
            results = await asyncio.gather(*(c.chat("gpt-4.1-mini", Q, sid(a)) for a in range(6)))
    t = [x - server.times[0] for x in server.times]
    assert len(results) == 6 and all(r.usage.attempts == 1 for r in results)
    # The three announced at once, then about one a second (lower bounds: load only adds delay).
    assert t[-1] >= 2.5 and c.pacing()[server.base_url]["waited_s"] > 0, t


# ----------------------------------------------------------------------------- nothing listening

async def test_nothing_listening_says_cannot_connect_at_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="harness.llm.retry")
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with make_client(url, tmp_path, max_retries=6) as c:
        with pytest.raises(LLMError) as info:
            await c.chat("gpt-4.1-mini", Q, sid())
    msg = str(info.value)
    assert msg == (f"cannot connect to {url}: nothing is listening there; is the server running / is "
                   f"endpoint.base_url right?")
    assert "retrying" not in caplog.text  # not minutes of backoff: no retry at all


def test_the_loop_says_cannot_connect(cli, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = cli("--set", "endpoint.kind=openai", "--set", f"endpoint.base_url={url}", "--set", "models.base=gpt-4.1-mini",
               "--set", "task.n_test=3", "--set", "finetune.iterations=0", "--run-dir", str(tmp_path / "run"),
               env={"OPENAI_API_KEY": "not-a-real-key"}, timeout=120)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert f"cannot connect to {url}: nothing is listening there; is the server running / is endpoint.base_url right?" in out
    assert "timed out" not in out and "rate-limiting" not in out


# ----------------------------------------------------------------------------- the request on the wire

async def test_reasoning_models_get_only_what_they_accept(tmp_path, caplog):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=48)
    with ScriptedServer() as server, caplog.at_level(logging.WARNING, logger="harness.llm.client"):
        async with make_client(server.base_url, tmp_path / "openai", sampling=sampling) as c:
            await c.chat("o4-mini", Q, sid(0))
            await c.chat("o4-mini", Q, sid(1))
            await c.chat("ft:gpt-5-mini-2025-08-07:my-org::abc123", Q, sid(2))
            await c.chat("gpt-4.1-mini", Q, sid(3))
        async with make_client(server.base_url, tmp_path / "vllm", kind="vllm", sampling=sampling) as c:
            await c.chat("o4-mini", Q, sid(0))  # a vLLM model of that name is no OpenAI reasoning model
        async with make_client(server.base_url, tmp_path / "old", sampling=sampling, reasoning_models=[],
                               max_tokens_param="max_tokens") as c:
            await c.chat("o4-mini", Q, sid(0))
    reasoning, again, finetuned, chat, vllm, overridden = server.requests
    for body in (reasoning, again, finetuned):
        assert body["max_completion_tokens"] == 48
        assert "temperature" not in body and "top_p" not in body and "max_tokens" not in body
    assert chat["temperature"] == 0.7 and chat["top_p"] == 0.9 and chat["max_completion_tokens"] == 48
    assert "max_tokens" not in chat  # deprecated in OpenAI's API
    assert vllm["temperature"] == 0.7 and vllm["max_completion_tokens"] == 48 and "max_tokens" not in vllm
    assert overridden["temperature"] == 0.7 and overridden["max_tokens"] == 48
    warnings = [r.getMessage() for r in caplog.records if "reasoning model" in r.getMessage()]
    assert len(warnings) == 2  # once per model, not once per call
    assert "'o4-mini'" in warnings[0] and "sampling.temperature=0.7 and sampling.top_p=0.9 is not sent" in warnings[0]


async def test_the_simulator_honours_max_completion_tokens(tmp_path):
    with SimServer(SimulatorConfig(seed=1)) as sim:
        async with make_client(sim.base_url, tmp_path, kind="simulator", sampling=SamplingConfig(max_tokens=3)) as c:
            result = await c.chat("sim-base", Q, sid())
    assert result.finish_reason == "length" and result.usage.completion_tokens <= 4


# Keys computed by the harness before requests were sent with max_completion_tokens: a run cached
# then must still find its answers.
OLD_KEYS = [
    ("openai", "gpt-4o-mini", SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=32),
     "3bb4e3a6d9a1b26ff73930eb21388329dd54c147a8c5ca909e65d2319978672b"),
    ("openai", "o4-mini", SamplingConfig(temperature=1.0, max_tokens=64),
     "996974575dc48eaaa9698b50528d69c325e7d18d72ad7f2d2cc14ccf70ea6972"),
    ("vllm", "base", SamplingConfig(temperature=0.7, max_tokens=32, extra_body={"top_k": 20}),
     "52ca01a5d1cb6217e69a9a9cac7d32fda3ebbdbc8d1dbb8a04c9ca21091ec6e2"),
]


@pytest.mark.parametrize("kind,model,sampling,key", OLD_KEYS)
async def test_a_run_cached_before_the_wire_change_still_hits_its_cache(tmp_path, kind, model, sampling, key):
    # The cache an earlier version wrote: the old schema, no usage column.
    db = sqlite3.connect(tmp_path / "cache.sqlite")
    db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,"
               " value TEXT NOT NULL, created REAL NOT NULL)")
    db.execute("INSERT INTO responses VALUES (?, 'chat', ?, ?, 0)",
               (key, model, json.dumps({"text": "the old answer", "finish_reason": "stop"})))
    db.commit()
    db.close()
    dead = f"http://127.0.0.1:{free_port()}/v1"  # any call would fail: only the cache can answer
    endpoint = EndpointConfig(kind=kind, api_key_env=None, max_retries=0)
    sample = SampleId(iteration=0, split="test", problem_id="p1", agent=1, round=0)
    async with LLMClient(base_url=dead, api_key="k", run_dir=tmp_path, endpoint=endpoint, sampling=sampling, seed=3) as c:
        result = await c.chat(model, Q, sample)
    assert result.cached and result.text == "the old answer"
    assert len(ResponseCache(tmp_path / "cache.sqlite")) == 1
