"""What a run counts as paid and as possibly paid, at the edges: a server that never takes the
requests, calls still in flight when the client closes, a usage line torn after its journal entry
was closed."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from harness.config import EndpointConfig, SamplingConfig, SimulatorConfig
from harness.errors import LLMError
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.llm.journal import JOURNAL_NAME
from harness.records import Message, SampleId, UsageRecord
from harness.sim import SimServer

from bad_endpoint import BadEndpoint

PROMPT = "Compute 3+4*5+6-7*8. Reason step by step and put the final answer in \\boxed{}."


def sid(i: int) -> SampleId:
    return SampleId(iteration=0, split="test", problem_id=f"p{i}", agent=0, round=0)


def client(url: str, run_dir: Path, **endpoint) -> LLMClient:
    return LLMClient(base_url=url, api_key="k", run_dir=run_dir, endpoint=EndpointConfig(**endpoint),
                     sampling=SamplingConfig(max_tokens=200), backoff_base_s=0.01, backoff_cap_s=0.02)


def ask(c: LLMClient, n: int, model: str = "sim-base"):
    return [c.chat(model, [Message(role="user", content=PROMPT)], sid(i)) for i in range(n)]


def journal(run_dir: Path) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for line in (run_dir / JOURNAL_NAME).read_text().splitlines():
        entry = json.loads(line)
        states.setdefault(entry["id"], []).append(entry["state"])
    return states


async def test_requests_that_never_reached_the_server_are_not_counted_as_possibly_billed(tmp_path):
    # A host that takes no connection (a listen queue of one that is never accepted): only the
    # request that got into the queue can have reached the server; every other attempt timed out
    # waiting to connect and cannot have been billed.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        n = 8
        async with client(url, tmp_path, kind="openai", timeout_s=1.0, max_retries=1) as c:
            with pytest.raises(LLMError) as info:
                await asyncio.gather(*ask(c, n, "gpt-4o-mini"))
            counted = c.totals().unanswered_calls
    assert 1 <= counted <= 2  # the queue holds one connection (two on some kernels)
    assert "has not answered once" in str(info.value) and "endpoint.base_url" in str(info.value)
    assert all(states in (["sent", "unanswered"], ["lost"]) for states in journal(tmp_path).values())


async def test_calls_still_in_flight_at_close_are_recorded_not_lost(tmp_path):
    with SimServer(SimulatorConfig(latency_ms=500)) as sim:
        c = client(sim.base_url, tmp_path)
        tasks = [asyncio.ensure_future(call) for call in ask(c, 4)]  # nobody waits for them
        await asyncio.sleep(0.2)
        await c.aclose()
        assert all(t.done() for t in tasks)
        assert all(states == ["sent", "answered"] for states in journal(tmp_path).values())
        async with client(sim.base_url, tmp_path) as again:
            assert again.notes == [] and again.totals().unanswered_calls == 0
            assert again.totals().calls == 4


async def test_a_failing_endpoint_leaves_no_request_open_or_counted(tmp_path):
    with BadEndpoint("html", delay_s=0.05) as server:
        async with client(server.base_url, tmp_path, kind="openai") as c:
            with pytest.raises(LLMError, match="endpoint.base_url"):
                await asyncio.gather(*ask(c, 6, "gpt-4o-mini"))
            await asyncio.sleep(0.3)  # the other calls end while the client is still open
    states = journal(tmp_path)
    assert states and all(s == ["sent", "refused"] for s in states.values()), states
    async with client(server.base_url, tmp_path, kind="openai") as again:
        assert again.notes == [] and again.totals().unanswered_calls == 0


async def test_a_torn_last_usage_line_is_restored_from_the_cache(tmp_path):
    with SimServer(SimulatorConfig(seed=3)) as sim:
        async with client(sim.base_url, tmp_path) as c:
            first = await asyncio.gather(*ask(c, 3))
        usage = tmp_path / "usage.jsonl"
        usage.write_bytes(usage.read_bytes()[:-25])  # the last line cut mid-write; its journal entry is closed
        assert all(s == ["sent", "answered"] for s in journal(tmp_path).values())
        async with client(sim.base_url, tmp_path) as c:
            totals = c.totals()
            again = await asyncio.gather(*ask(c, 3))
    assert totals.calls == 3 and totals.unanswered_calls == 0
    assert totals.cost_usd == pytest.approx(sum(r.usage.cost_usd for r in first))
    assert all(r.cached for r in again)
    records = read_jsonl(tmp_path / "usage.jsonl", UsageRecord)
    assert sorted(r.call_id for r in records if not r.cached) == sorted(r.usage.call_id for r in first)
