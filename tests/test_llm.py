"""LLMClient against the built-in simulator over real HTTP on 127.0.0.1: distinct samples per
agent, resume without new calls, retries of injected 500s / 429s / hangs, terminal 404s, and the
budget cap across sessions."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from harness.config import EndpointConfig, SamplingConfig, SimulatorConfig
from harness.errors import BudgetExceeded, LLMError
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.llm.cache import ResponseCache
from harness.records import Message, SampleId, UsageRecord

SimServer = pytest.importorskip("harness.sim.server", reason="simulator not available").SimServer

PROMPT = [Message(role="user", content="Compute 3+4*5+6-7*8. Reason step by step and put the final answer in \\boxed{}.")]
DEAD_URL = "http://127.0.0.1:9/v1"  # nothing listens there: any network call would fail


def sid(agent: int, problem: str = "p1", rnd: int = 0) -> SampleId:
    return SampleId(iteration=0, split="train", problem_id=problem, agent=agent, round=rnd)


def client(url: str, run_dir: Path, *, max_tokens: int = 256, seed: int = 0, **kw) -> LLMClient:
    ep_fields = {k: kw.pop(k) for k in ("concurrency", "timeout_s", "max_retries") if k in kw}
    return LLMClient(base_url=url, api_key="simulated-key", run_dir=run_dir,
                     endpoint=EndpointConfig(kind="simulator", **ep_fields),
                     sampling=SamplingConfig(temperature=1.0, max_tokens=max_tokens), seed=seed, **kw)


def usage(run_dir: Path) -> list[UsageRecord]:
    return read_jsonl(run_dir / "usage.jsonl", UsageRecord)


async def ask_agents(c: LLMClient, n: int, problem: str = "p1") -> list[str]:
    results = await asyncio.gather(*(c.chat("sim-base", PROMPT, sid(a, problem)) for a in range(n)))
    return [r.text for r in results]


async def test_agents_stay_distinct_and_a_rerun_makes_no_call(tmp_path):
    with SimServer(SimulatorConfig(seed=1)) as sim:
        async with client(sim.base_url, tmp_path) as c:
            texts = await ask_agents(c, 8)
            first = c.totals()
    # Same prompt, eight sample identities: eight calls, eight cache entries, not one.
    assert first.calls == 8 and first.cache_hits == 0
    cache = ResponseCache(tmp_path / "cache.sqlite")
    assert len(cache) == 8
    cache.close()
    # Each agent was sent its own seed, so the simulated samples differ.
    assert len(set(texts)) > 1
    # The same work again in a new session, with the server gone: all from the cache.
    async with client(DEAD_URL, tmp_path, max_retries=0) as c:
        again = await ask_agents(c, 8)
        totals = c.totals()
    assert again == texts
    assert totals.calls == 8 and totals.cache_hits == 8  # earlier session counted, no new call
    lines = usage(tmp_path)
    assert [r.cached for r in lines] == [False] * 8 + [True] * 8
    assert all(r.cost_usd == 0.0 for r in lines[8:]) and all(r.cost_usd > 0 for r in lines[:8])


async def test_samples_are_reproducible_across_runs(tmp_path):
    with SimServer(SimulatorConfig(seed=1)) as sim:
        async with client(sim.base_url, tmp_path / "a") as c:
            a = await ask_agents(c, 6)
        async with client(sim.base_url, tmp_path / "b") as c:
            b = await ask_agents(c, 6)
        async with client(sim.base_url, tmp_path / "c", seed=7) as c:
            other_seed = await ask_agents(c, 6)
    assert a == b
    assert other_seed != a


async def test_injected_500s_are_retried(tmp_path):
    with SimServer(SimulatorConfig(seed=3, error_rate=0.5)) as sim:
            # Short backoff: the sim's 500s carry no retry-after, and the default waits (0.5 s doubling
        # to 20 s) would make an unlucky run of failures take a minute.
        async with client(sim.base_url, tmp_path, max_retries=8, backoff_base_s=0.02, backoff_cap_s=0.2) as c:
            texts = await asyncio.gather(*(c.chat("sim-base", PROMPT, sid(a, f"p{a}")) for a in range(16)))
    assert all(r.text for r in texts)
    attempts = {r.usage.sample.problem_id: r.usage.attempts for r in texts}
    assert sum(attempts.values()) > 16  # about half the first attempts failed
    assert {r.sample.problem_id: r.attempts for r in usage(tmp_path)} == attempts


@pytest.mark.slow
async def test_rate_limit_is_paced_from_the_servers_headers(tmp_path):
    # 120 requests per minute: a budget of 120 refilled at 2 a second. 130 calls at once: the
    # client learns the limit from the first answer's x-ratelimit-* headers and holds the last
    # ten back until the budget refills, instead of sending them into 429s.
    with SimServer(SimulatorConfig(seed=2, rpm_limit=120)) as sim:
        async with client(sim.base_url, tmp_path, max_retries=0, concurrency=64) as c:
            t0 = time.monotonic()
            results = await asyncio.gather(*(c.chat("sim-base", PROMPT, sid(a)) for a in range(130)))
            elapsed = time.monotonic() - t0
            pacing = c.pacing()[sim.base_url]
    assert len(results) == 130 and all(r.text for r in results)
    assert [r.usage.attempts for r in results] == [1] * 130 and pacing["rate_limited"] == 0
    # The last ten waited for the budget to refill (2 a second): held back, not sent into 429s.
    # Only lower bounds: a loaded machine makes this slower, never faster.
    assert pacing["waited_s"] > 0 and elapsed >= 4.0


async def test_hangs_are_cut_by_the_timeout_and_retried(tmp_path):
    with SimServer(SimulatorConfig(seed=5, timeout_rate=0.3)) as sim:
        async with client(sim.base_url, tmp_path, timeout_s=0.5, max_retries=8, backoff_base_s=0.02,
                          backoff_cap_s=0.2) as c:
            results = await asyncio.gather(*(c.chat("sim-base", PROMPT, sid(a)) for a in range(10)))
    assert all(r.text for r in results) and sum(r.usage.attempts for r in results) > 10


async def test_unknown_model_fails_fast(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="harness.llm.retry")
    with SimServer(SimulatorConfig()) as sim:
        async with client(sim.base_url, tmp_path, max_retries=6) as c:
            with pytest.raises(LLMError, match=r"model 'no-such-model' not found at .*check models.base"):
                await c.chat("no-such-model", PROMPT, sid(0))
    assert "retrying" not in caplog.text  # a 404 is final: no backoff, no second attempt
    assert usage(tmp_path) == []


async def test_budget_cap_stops_before_passing_it_and_counts_earlier_sessions(tmp_path):
    cap = 0.0015
    with SimServer(SimulatorConfig(seed=4)) as sim:
        done = 0
        async with client(sim.base_url, tmp_path, max_tokens=200, budget_usd=cap) as c:
            with pytest.raises(BudgetExceeded) as info:
                for i in range(10_000):
                    await c.chat("sim-base", PROMPT, sid(0, f"q{i}"))
                    done += 1
            spent = c.totals().cost_usd
        msg = str(info.value)
        assert "--set budget.max_cost_usd=" in msg and "resumes" in msg and f"{cap:g}" in msg
        assert 0 < spent <= cap and done > 5
        # A new session of the same run counts what was spent: it stops at once for new work,
        # while work already done is still served from the cache.
        async with client(sim.base_url, tmp_path, max_tokens=200, budget_usd=cap) as c:
            assert c.totals().cost_usd == pytest.approx(spent)
            assert (await c.chat("sim-base", PROMPT, sid(0, "q0"))).cached
            with pytest.raises(BudgetExceeded):
                await c.chat("sim-base", PROMPT, sid(0, f"q{done}"))
        # Raising the cap lets the run go on.
        async with client(sim.base_url, tmp_path, max_tokens=200, budget_usd=cap * 2) as c:
            assert not (await c.chat("sim-base", PROMPT, sid(0, f"q{done}"))).cached


async def test_budget_cap_holds_under_concurrency(tmp_path):
    cap = 0.002
    with SimServer(SimulatorConfig(seed=4, latency_ms=20)) as sim:
        async with client(sim.base_url, tmp_path, max_tokens=200, budget_usd=cap, concurrency=32) as c:
            results = await asyncio.gather(*(c.chat("sim-base", PROMPT, sid(0, f"q{i}")) for i in range(200)),
                                           return_exceptions=True)
            spent = c.totals().cost_usd
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert refused and len(refused) < 200
    assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, BudgetExceeded)]
    assert spent <= cap
