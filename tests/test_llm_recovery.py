"""Paid calls lost to a crash are accounted, and a damaged cache is detected and repaired.

A real SIGKILL of a process with calls in flight; the state a crash leaves between an answer's
cache row and its usage line (built by hand: no process can be stopped reliably between two
statements); a cache file with a damaged page."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import EndpointConfig, SamplingConfig, SimulatorConfig
from harness.errors import BudgetExceeded, DataError
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.llm.cache import ResponseCache, cache_key
from harness.llm.journal import JOURNAL_NAME
from harness.llm.pricing import estimate_cost
from harness.records import Message, SampleId, UsageRecord
from harness.sim import SimServer

from conftest import REPO, run_cli

PROMPT = "Compute 3+4*5+6-7*8. Reason step by step and put the final answer in \\boxed{}."
MAX_TOKENS = 200

CHILD = """
import asyncio, sys
from pathlib import Path
from harness.config import EndpointConfig, SamplingConfig
from harness.llm import LLMClient
from harness.records import Message, SampleId

async def main(url, run_dir, n):
    endpoint = EndpointConfig(kind="simulator")
    async with LLMClient(base_url=url, api_key="k", run_dir=Path(run_dir), endpoint=endpoint,
                         sampling=SamplingConfig(max_tokens=%d)) as c:
        await asyncio.gather(*(c.chat("sim-base", [Message(role="user", content=%r)],
                                      SampleId(iteration=0, split="test", problem_id=f"p{i}", agent=0, round=0))
                               for i in range(n)))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""" % (MAX_TOKENS, PROMPT)


def sid(i: int) -> SampleId:
    return SampleId(iteration=0, split="test", problem_id=f"p{i}", agent=0, round=0)


def client(url: str, run_dir: Path, **kw) -> LLMClient:
    return LLMClient(base_url=url, api_key="k", run_dir=run_dir, endpoint=EndpointConfig(kind="simulator"),
                     sampling=SamplingConfig(max_tokens=MAX_TOKENS), **kw)


async def ask(c: LLMClient, n: int):
    return await asyncio.gather(*(c.chat("sim-base", [Message(role="user", content=PROMPT)], sid(i)) for i in range(n)))


def journal_states(run_dir: Path) -> list[str]:
    return [json.loads(line)["state"] for line in (run_dir / JOURNAL_NAME).read_text().splitlines()]


# ----------------------------------------------------------------------------- calls in flight at a SIGKILL

@pytest.mark.slow
async def test_calls_in_flight_at_a_sigkill_are_reported_and_counted_against_the_budget(tmp_path):
    n = 6
    with SimServer(SimulatorConfig(latency_ms=60_000)) as slow:  # answers never come back in time
        child = subprocess.Popen([sys.executable, "-c", CHILD, slow.base_url, str(tmp_path), str(n)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            deadline = time.monotonic() + 60
            while (not (tmp_path / JOURNAL_NAME).exists() or journal_states(tmp_path).count("sent") < n):
                assert time.monotonic() < deadline and child.poll() is None, "the child never sent its calls"
                await asyncio.sleep(0.05)
            child.send_signal(signal.SIGKILL)  # all n requests are at the server, none answered
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
    worst = estimate_cost("sim-base", len(PROMPT), MAX_TOKENS)
    assert worst and worst > 0
    with SimServer(SimulatorConfig()) as sim:
        # The next session reports them, and the cap counts them at their worst case.
        async with client(sim.base_url, tmp_path, budget_usd=worst * (n + 0.5)) as c:
            assert len(c.notes) == 1 and f"{n} model call(s) were in flight" in c.notes[0]
            totals = c.totals()
            assert totals.calls == 0 and totals.unanswered_calls == n
            assert totals.unanswered_cost_usd == pytest.approx(n * worst)
            with pytest.raises(BudgetExceeded, match="may have been billed without an answer"):
                await ask(c, 1)
        # With room in the budget the work is done (nothing was cached: no answer came back).
        async with client(sim.base_url, tmp_path, budget_usd=1.0) as c:
            results = await ask(c, n)
            assert not any(r.cached for r in results)
        # A later session still counts them: once, not again as newly lost.
        async with client(sim.base_url, tmp_path) as c:
            assert c.notes == [] and c.totals().unanswered_calls == n and c.totals().calls == n
    assert journal_states(tmp_path).count("lost") == n


def test_the_loop_reports_calls_lost_in_a_crash_on_resume(cli, tmp_path):
    run = tmp_path / "run"
    first = cli("--set", "task.n_test=3", "--set", "finetune.iterations=0", "--run-dir", str(run), timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    # What a SIGKILL leaves for a request sent but never answered: its "sent" line, nothing else.
    lost = {"id": "f" * 32, "state": "sent", "ts": time.time(), "key": "0" * 64, "model": "sim-base",
            "purpose": "debate", "est_cost_usd": 0.25}
    with open(run / JOURNAL_NAME, "a") as f:
        f.write(json.dumps(lost) + "\n")
    again = cli("--resume", str(run), timeout=120)
    out = " ".join(again.stdout.split())
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 model call(s) were in flight when an earlier session of this run stopped" in out
    assert "1 call may have been billed without an answer (worst case $0.2500" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["usage"]["unanswered_calls"] == 1 and summary["usage"]["unanswered_cost_usd"] == 0.25


# ----------------------------------------------------------------------------- an answer without its usage line

async def test_a_crash_between_the_cache_row_and_the_usage_line_neither_pays_twice_nor_loses_the_line(tmp_path):
    with SimServer(SimulatorConfig(seed=3)) as sim:
        async with client(sim.base_url, tmp_path) as c:
            first = await ask(c, 3)
        lines = (tmp_path / "usage.jsonl").read_text().splitlines()
        journal = (tmp_path / JOURNAL_NAME).read_text().splitlines()
        # The crash came after the third answer's cache row, before its usage line and journal close.
        (tmp_path / "usage.jsonl").write_text("\n".join(lines[:2]) + "\n")
        (tmp_path / JOURNAL_NAME).write_text("\n".join(j for j in journal if '"answered"' not in j
                                                       or first[2].usage.call_id not in j) + "\n")
        async with client(sim.base_url, tmp_path) as c:
            assert c.notes == []  # nothing lost: the answer is in the cache
            totals = c.totals()
            again = await ask(c, 3)
    assert totals.calls == 3 and totals.unanswered_calls == 0
    assert totals.cost_usd == pytest.approx(sum(r.usage.cost_usd for r in first))
    assert all(r.cached for r in again)  # not paid twice
    records = read_jsonl(tmp_path / "usage.jsonl", UsageRecord)
    assert sorted(r.call_id for r in records if not r.cached) == sorted(r.usage.call_id for r in first)


async def test_a_crash_after_the_usage_line_does_not_write_it_twice(tmp_path):
    with SimServer(SimulatorConfig(seed=3)) as sim:
        async with client(sim.base_url, tmp_path) as c:
            await ask(c, 2)
        journal = (tmp_path / JOURNAL_NAME).read_text().splitlines()
        (tmp_path / JOURNAL_NAME).write_text("\n".join(j for j in journal if '"answered"' not in j) + "\n")
        async with client(sim.base_url, tmp_path) as c:
            assert c.notes == [] and c.totals().calls == 2 and c.totals().unanswered_calls == 0
    assert len(read_jsonl(tmp_path / "usage.jsonl")) == 2


# ----------------------------------------------------------------------------- a damaged cache

def _damage_one_leaf_page(path: Path) -> None:
    """Overwrite one table leaf page in the middle of the file (page size 4096, SQLite's default)."""
    data = bytearray(path.read_bytes())
    page = 4096
    leaves = [p for p in range(1, len(data) // page) if data[p * page] == 0x0D]
    victim = leaves[len(leaves) // 2]
    data[victim * page:(victim + 1) * page] = bytes([0xA5]) * page
    path.write_bytes(bytes(data))


def test_a_damaged_cache_is_detected_and_repaired_keeping_every_readable_answer(tmp_path):
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    n = 2000
    for i in range(n):
        cache.put(cache_key({"i": i}), "chat", "sim-base", {"text": f"answer {i} " + "x" * 300})
    cache.close()
    _damage_one_leaf_page(path)

    with pytest.raises(DataError) as info:
        LLMClient(base_url="http://127.0.0.1:9/v1", api_key="k", run_dir=tmp_path, endpoint=EndpointConfig(),
                  sampling=SamplingConfig())
    msg = str(info.value)
    assert str(path) in msg and "damaged" in msg and f"python -m harness.llm.cache repair {tmp_path}" in msg

    proc = run_cli("harness.llm.cache", "repair", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    kept = int(proc.stdout.split("kept ")[1].split()[0])
    unreadable = int(proc.stdout.split("; ")[1].split()[0])
    assert kept + unreadable == n and n - 20 <= kept < n  # one page of rows lost, every other row kept
    assert list(tmp_path.glob("cache.sqlite.damaged-*"))  # the damaged file is kept for inspection

    repaired = ResponseCache(path)
    assert len(repaired) == kept
    answers = [repaired.get(cache_key({"i": i})) for i in range(n)]
    assert sum(a is not None for a in answers) == kept
    assert answers[0] == {"text": "answer 0 " + "x" * 300} and answers[-1]["text"].startswith(f"answer {n - 1} ")
    repaired.close()
    assert run_cli("harness.llm.cache", "check", str(tmp_path), cwd=tmp_path).stdout.endswith(f"ok, {kept} answers\n")
