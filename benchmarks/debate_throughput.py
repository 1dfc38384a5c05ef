"""Debate throughput against the simulator with injected latency.

Runs the same debate twice in one process — once at the configured concurrency, once one call
at a time — and prints ratios, never a bare time:

  ours / ideal       ideal = latency x waves, waves = sum over rounds of the calls that must
                     follow each other in that round (1 in round 0; 1, or 2 with a summarizer
                     call first, later) x ceil(calls per step / concurrency)
  ours / sequential  the same work with concurrency 1

Target (issue): <= 1.3x the ideal bound at concurrency 64.

The simulator runs in its own process, as any real server would: in this process it would
compete with the harness for the same interpreter lock and the ratio would measure both.

    python benchmarks/debate_throughput.py [--problems 200] [--latency-ms 200] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path

from harness.config import EndpointConfig, SamplingConfig, TaskConfig
from harness.debate import Debater, DebateSettings, Society, problems_in_flight, run_debates
from harness.llm import LLMClient
from harness.prompts import Prompts
from harness.records import Message, SampleId
from harness.tasks import get_task, load_split
from harness.testing.sim_process import simulator_process


async def timed_debate(base_url: str, problems, *, agents: int, rounds: int, mode: str, concurrency: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = EndpointConfig(concurrency=concurrency, max_retries=0)
        async with LLMClient(base_url=base_url, api_key="x", run_dir=Path(tmp), endpoint=endpoint,
                             sampling=SamplingConfig(), seed=0) as client:
            society = Society(["sim-base"] * agents, ["sim-base"] * agents, "sim-base")
            debater = Debater(client, society, Prompts("arithmetic"), get_task("arithmetic").extract,
                              DebateSettings(rounds=rounds, mode=mode), iteration=0, split="test")
            # One call before the clock starts: connection set-up and the SDK's lazy imports are
            # start-up costs, not throughput.
            await client.chat("sim-base", [Message(role="user", content="What is 1+2*3+4-5*6?")],
                              SampleId(iteration=0, split="warmup", problem_id="warmup", agent=0, round=0))
            start = time.perf_counter()
            await run_debates(debater, problems, Path(tmp) / "debate.jsonl",
                              max_in_flight=problems_in_flight(concurrency, agents))
            return time.perf_counter() - start


def ideal_seconds(problems: int, agents: int, rounds: int, mode: str, concurrency: int, latency_s: float) -> float:
    per_step = math.ceil(problems * agents / concurrency)
    steps = 1 + (rounds - 1) * (2 if mode == "summarize" else 1)
    return steps * per_step * latency_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--mode", choices=["concatenate", "summarize"], default="concatenate")
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--skip-sequential", action="store_true", help="skip the one-call-at-a-time reference")
    args = p.parse_args()

    problems = load_split(TaskConfig(name="arithmetic", n_test=args.problems, seed=0), "test")
    latency_s = args.latency_ms / 1000
    with simulator_process("--latency-ms", str(args.latency_ms)) as base_url:
        kw = dict(agents=args.agents, rounds=args.rounds, mode=args.mode)
        ours = asyncio.run(timed_debate(base_url, problems, concurrency=args.concurrency, **kw))
        sequential = None if args.skip_sequential else asyncio.run(
            timed_debate(base_url, problems, concurrency=1, **kw))
    ideal = ideal_seconds(len(problems), args.agents, args.rounds, args.mode, args.concurrency, latency_s)
    print(f"debate of {len(problems)} problems x {args.agents} agents x {args.rounds} rounds ({args.mode}), "
          f"simulated latency {args.latency_ms:.0f} ms, concurrency {args.concurrency}")
    print(f"ours / ideal bound      = {ours / ideal:.3f}   (target <= 1.3)")
    if sequential is not None:
        print(f"ours / sequential run   = {ours / sequential:.4f}   (speed-up {sequential / ours:.1f}x)")


if __name__ == "__main__":
    main()
