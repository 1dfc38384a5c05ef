"""Generation throughput of a debate through the harness vs a plain client, on the real model.

One vLLM CPU server (the `smollm2` preset's settings: SmolLM2-135M-Instruct, 1 GiB of KV cache)
serves, in one run, interleaved repeats of

  A  harness  the `smollm2` preset's debate (3 agents, 2 rounds, summarize) of P problems through
              harness.debate.run_debates and LLMClient at endpoint.concurrency C, fresh run dir
              (so fresh cache and usage log) each time;
  B  plain    AsyncOpenAI's chat.completions.create under a semaphore of C, sending exactly the
              requests that A just sent (rebuilt from A's debate records: each agent's
              conversation up to each of its turns, and the summarizer's request), all at once;
  and, to tell the client's cost from the debate's own order (--modes):
     ordered  the same requests through AsyncOpenAI in the debate's order: every problem at once,
              each round waiting for all agents, a summary before its agent's turn (a minimal
              hand-written debate driver: what the protocol itself costs);
     client   the same requests all at once through LLMClient.chat (the client's own cost).

With --dtypes float32,bfloat16 it instead compares the server's own speed per dtype (one server
after the other, the same 16 concurrent round-0 requests of 32 tokens, twice each).

Every call generates exactly --tokens tokens (vLLM's `ignore_eos` + `min_tokens`), so A and B
do the same work; throughput is completion tokens / wall seconds. vLLM's prefix cache is off:
B replays A's prompts, and cached prefixes would make B's prefill free. The ratio per pair is
harness / plain (1.0: nothing lost); reported: median, min..max, n. The client's CPU seconds per
call are reported too: on a machine with few cores they are taken from the server.

    python benchmarks/serve_throughput.py [--problems 12] [--concurrency 32] [--tokens 16]
        [--repeats 3] [--modes plain,ordered,client] [--out benchmarks/results/serve_throughput.md]
    python benchmarks/serve_throughput.py --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from harness.config import load_config
from harness.debate import Debater, DebateSettings, Society, problems_in_flight, run_debates
from harness.fileio import iter_jsonl
from harness.llm import LLMClient
from harness.prompts import Prompts
from harness.records import DebateRecord, Message, SampleId
from harness.serve import VLLMServer
from harness.tasks import get_task, load_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


Call = tuple[str, list[dict]]  # (model, messages)


def replayed_requests(records: list[DebateRecord], prompts: Prompts, cfg) -> list[list[list[list[Call]]]]:
    """Every call the debate made, rebuilt from its records, as [problem][round][agent] -> the
    calls that follow each other in that agent's turn: in summarize mode the summarizer's
    request (made from the other agents' previous-round answers, as harness.debate builds it),
    then the agent's own conversation up to that turn."""
    tree = []
    for rec in records:
        replies = [[m.content for m in t.messages if m.role == "assistant"] for t in rec.agents]
        rounds = []
        for rnd in range(cfg.debate.rounds):
            turns = []
            for t in rec.agents:
                calls = []
                if rnd > 0 and cfg.debate.mode == "summarize":
                    others = [(j, replies[j][rnd - 1]) for j in range(len(rec.agents)) if j != t.agent]
                    calls.append((cfg.summarizer, [{"role": "user",
                                                    "content": prompts.summarize(rec.problem.question, others)}]))
                turn = [i for i, m in enumerate(t.messages) if m.role == "assistant"][rnd]
                calls.append((t.models[rnd], [{"role": m.role, "content": m.content} for m in t.messages[:turn]]))
                turns.append(calls)
            rounds.append(turns)
        tree.append(rounds)
    return tree


def flat(tree) -> list[Call]:
    return [call for rounds in tree for turns in rounds for calls in turns for call in calls]


async def run_harness(cfg, url: str, problems, tmp: Path) -> dict:
    prompts = Prompts(cfg.task.name, cfg.task.prompts_dir)
    async with LLMClient(base_url=url, api_key="EMPTY", run_dir=tmp, endpoint=cfg.endpoint,
                         sampling=cfg.sampling, seed=cfg.seed) as client:
        society = Society([cfg.models.base] * cfg.debate.agents, [cfg.models.base] * cfg.debate.agents,
                          cfg.summarizer)
        debater = Debater(client, society, prompts, get_task(cfg.task.name).extract,
                          DebateSettings(rounds=cfg.debate.rounds, mode=cfg.debate.mode,
                                         grading_timeout_s=cfg.grading.timeout_s), iteration=0, split="test")
        c0, t0 = cpu_s(), time.perf_counter()
        await run_debates(debater, problems, tmp / "debate.jsonl",
                          max_in_flight=problems_in_flight(cfg.endpoint.concurrency, cfg.debate.agents))
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        totals = client.totals()
    records = list(iter_jsonl(tmp / "debate.jsonl", DebateRecord))
    order = {p.id: i for i, p in enumerate(problems)}
    records.sort(key=lambda r: order[r.problem.id])
    requests = replayed_requests(records, prompts, cfg)
    if len(flat(requests)) != totals.calls:
        raise RuntimeError(f"rebuilt {len(flat(requests))} requests from the records, but the harness made {totals.calls}")
    return {"wall": wall, "cpu": cpu, "calls": totals.calls, "completion": totals.completion_tokens,
            "prompt": totals.prompt_tokens, "requests": requests}


async def run_plain(cfg, url: str, tree, *, ordered: bool = False) -> dict:
    """The recorded requests through AsyncOpenAI under a semaphore of C: all at once (`ordered`
    False), or with the debate's order kept (a minimal hand-written debate driver: every
    problem at once, each round waiting for all agents, an agent's summary before its turn)."""
    s = cfg.sampling
    extra = dict(s.extra_body)
    sem = asyncio.Semaphore(cfg.endpoint.concurrency)
    results = []
    async with openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=cfg.endpoint.timeout_s) as oa:
        async def one(model: str, messages: list[dict]):
            async with sem:
                r = await oa.chat.completions.create(model=model, messages=messages, temperature=s.temperature,
                                                     max_tokens=s.max_tokens, extra_body=extra)
            results.append(r)

        async def turn(calls: list[Call]):
            for model, messages in calls:
                await one(model, messages)

        async def problem(rounds):
            for turns in rounds:
                await asyncio.gather(*(turn(calls) for calls in turns))

        c0, t0 = cpu_s(), time.perf_counter()
        if ordered:
            await asyncio.gather(*(problem(rounds) for rounds in tree))
        else:
            await asyncio.gather(*(one(m, msgs) for m, msgs in flat(tree)))
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {"wall": wall, "cpu": cpu, "calls": len(results),
            "completion": sum(r.usage.completion_tokens for r in results),
            "prompt": sum(r.usage.prompt_tokens for r in results)}


async def run_client(cfg, url: str, requests, tmp: Path) -> dict:
    """The same replay through the harness's client (cache, usage log, semaphore), no debate."""
    async with LLMClient(base_url=url, api_key="EMPTY", run_dir=tmp, endpoint=cfg.endpoint,
                         sampling=cfg.sampling, seed=cfg.seed) as client:
        c0, t0 = cpu_s(), time.perf_counter()
        await asyncio.gather(*(
            client.chat(model, [Message(**m) for m in msgs],
                        SampleId(iteration=0, split="replay", problem_id=str(i), agent=0, round=0))
            for i, (model, msgs) in enumerate(flat(requests))))
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        totals = client.totals()
    return {"wall": wall, "cpu": cpu, "calls": totals.calls, "completion": totals.completion_tokens,
            "prompt": totals.prompt_tokens}


def tps(r: dict) -> float:
    return r["completion"] / r["wall"]


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, n {len(xs)})"


def uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


MODES = {
    "plain": "AsyncOpenAI, all of A's requests at once under a semaphore of C",
    "ordered": "AsyncOpenAI, A's requests in the debate's order (each round waits for all agents; "
               "a summary before its agent's turn), every problem at once, semaphore of C",
    "client": "A's requests all at once through LLMClient.chat (cache, usage log, its semaphore)",
}


async def main_async(args) -> str:
    cfg = load_config("smollm2", [f"endpoint.concurrency={args.concurrency}", f"sampling.max_tokens={args.tokens}"])
    if not args.natural:
        cfg.sampling.extra_body = {"ignore_eos": True, "min_tokens": args.tokens}
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {sorted(MODES)}")
    port = free_port()
    serve = cfg.serve.model_copy(update={"port": port, "extra_args": [*cfg.serve.extra_args,
                                                                       "--no-enable-prefix-caching"]})
    problems = load_split(cfg.task.model_copy(update={"n_test": args.problems}), "test")
    load_before = uptime()
    log_dir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    server = VLLMServer(serve, agents=cfg.debate.agents, log_path=log_dir / "vllm.log")
    rows: list[dict] = []
    t_start = time.perf_counter()
    server.start()
    try:
        await server.wait_healthy()
        url = server.base_url
        print(f"server up after {time.perf_counter() - t_start:.0f} s at {url}", flush=True)
        # Warm-up, not timed: one short debate (first batches, connection set-up, lazy imports).
        with tempfile.TemporaryDirectory() as tmp:
            await run_harness(cfg, url, problems[:2], Path(tmp))
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                row = {"harness": await run_harness(cfg, url, problems, Path(tmp))}
            requests = row["harness"].pop("requests")
            # The replays alternate their order between repeats, so a drift in the machine's load
            # does not always favour the same one.
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                if mode == "client":
                    with tempfile.TemporaryDirectory() as tmp:
                        row[mode] = await run_client(cfg, url, requests, Path(tmp))
                else:
                    row[mode] = await run_plain(cfg, url, requests, ordered=mode == "ordered")
            rows.append(row)
            print(f"repeat {i + 1}: " + ", ".join(
                f"{k} {r['wall']:.1f} s {tps(r):.1f} tok/s ({r['completion']} completion, {r['prompt']} prompt "
                f"tokens, {r['cpu'] / r['calls'] * 1000:.1f} ms CPU/call)" for k, r in row.items()), flush=True)
    finally:
        server.stop()
    load_after = uptime()
    cols = ["harness", *modes]
    lines = [
        "# Debate generation throughput: harness vs a plain client (real model)",
        "",
        f"Command: `python benchmarks/serve_throughput.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"- Model: SmolLM2-135M-Instruct (`harness:smollm2`), vLLM CPU build, {cfg.serve.dtype}, KV cache 1 GiB, "
        f"prefix caching off, served with the `smollm2` preset's settings.",
        f"- Debate: {len(problems)} arithmetic problems ({cfg.task.arithmetic.terms} terms), "
        f"{cfg.debate.agents} agents, {cfg.debate.rounds} rounds, {cfg.debate.mode}; "
        f"{rows[0]['harness']['calls']} calls per repeat, concurrency {cfg.endpoint.concurrency} "
        f"(the harness keeps {problems_in_flight(cfg.endpoint.concurrency, cfg.debate.agents)} problems in flight).",
        f"- Generation: " + (f"exactly {args.tokens} tokens per call (`ignore_eos`, `min_tokens`), temperature "
                             f"{cfg.sampling.temperature}" if not args.natural else
                             f"natural length (max {args.tokens}), normalised by completion tokens"),
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_flags()}), shared with other work; load average "
        f"(1, 5, 15 min) before {load_before}, after {load_after}.",
        f"- Each repeat: the harness's debate (A), then replays of exactly the requests A sent: "
        + "; ".join(f"`{m}`: {MODES[m]}" for m in modes)
        + f" (replays in alternating order). n = {len(rows)}; whole benchmark {time.perf_counter() - t_start:.0f} s.",
        "",
        "| repeat | " + " | ".join(f"{c} tok/s" for c in cols) + " | " + " | ".join(f"harness/{m}" for m in modes)
        + " | " + " | ".join(f"{c} CPU ms/call" for c in cols) + " |",
        "|---|" + "---|" * (2 * len(cols) + len(modes)),
    ]
    for i, r in enumerate(rows):
        cells = [str(i + 1), *(f"{tps(r[c]):.1f}" for c in cols),
                 *(f"{tps(r['harness']) / tps(r[m]):.3f}" for m in modes),
                 *(f"{r[c]['cpu'] / r[c]['calls'] * 1000:.1f}" for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m in modes:
        ratio = spread([tps(r["harness"]) / tps(r[m]) for r in rows])
        lines.append(f"**harness / {m}: median {ratio}**" + (" (target: >= 0.95, the harness loses under 5 %)"
                                                               if m == "plain" else "") + ".")
    return "\n".join(lines) + "\n"


async def dtype_check(dtypes: list[str], n: int = 16, tokens: int = 32) -> str:
    """Generated tokens/s of the same n concurrent round-0 requests, one server per dtype."""
    cfg = load_config("smollm2")
    prompts = Prompts(cfg.task.name, cfg.task.prompts_dir)
    problems = load_split(cfg.task.model_copy(update={"n_test": n}), "test")
    requests = [[[[(cfg.models.base, [{"role": "user", "content": prompts.question(p.question)}])]]] for p in problems]
    cfg.sampling.max_tokens, cfg.sampling.extra_body = tokens, {"ignore_eos": True, "min_tokens": tokens}
    cfg.endpoint.concurrency = n
    load_before, rows = uptime(), []
    for dtype in dtypes:
        serve = cfg.serve.model_copy(update={"port": free_port(), "dtype": dtype})
        server = VLLMServer(serve, agents=cfg.debate.agents,
                            log_path=Path(tempfile.mkdtemp(prefix="serve-bench-")) / "vllm.log")
        server.start()
        try:
            await server.wait_healthy()
            await run_plain(cfg, server.base_url, requests[:4])  # warm-up
            for _ in range(2):
                rows.append((dtype, await run_plain(cfg, server.base_url, requests)))
        finally:
            server.stop()
    lines = ["## The server's speed per dtype", "",
             f"Command: `python benchmarks/serve_throughput.py {' '.join(sys.argv[1:])}`", "",
             f"{n} concurrent round-0 requests, {tokens} generated tokens each, twice per server; "
             f"CPU flags: {cpu_flags()}; load average before {load_before}, after {uptime()}.", "",
             "| dtype | wall s | generated tok/s |", "|---|---|---|"]
    lines += [f"| {d} | {r['wall']:.1f} | {tps(r):.1f} |" for d, r in rows]
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="generated tokens per call")
    p.add_argument("--natural", action="store_true", help="natural answer lengths (max --tokens) instead of fixed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="plain,ordered",
                   help=f"replays of the harness's requests to time, comma-separated: {', '.join(MODES)}")
    p.add_argument("--dtypes", help="compare the server's speed in these dtypes instead (e.g. float32,bfloat16)")
    p.add_argument("--out", type=Path, help="write the markdown result here")
    args = p.parse_args()
    # `kill PID` (or a timeout) must still reach the `finally` that stops the server.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    text = asyncio.run(dtype_check(args.dtypes.split(",")) if args.dtypes else main_async(args))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
