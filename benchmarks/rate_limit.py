"""Pacing under a rate limit: achieved throughput as a share of the limit, and failed calls.

For each limit (an RPM limit, then separately a TPM limit) and each configured concurrency, a
fresh simulator runs in its own process (as any real server would) with that limit and a
simulated latency. Its budget is first drained, so what is measured is the sustained rate, not
the minute's worth of burst a full budget allows. Then one LLMClient sends `--seconds` worth of
calls at the limit (`max_retries=0`: a 429 must not need a retry) and we report

  share of limit   what was used / what the server could admit: the budget left after the drain
                   plus limit/60 per second until the last answer. RPM: calls; TPM: tokens as the
                   server counts them (prompt tokens + max_tokens, as OpenAI counts TPM)
  failed calls     calls that raised (target 0)
  429s             rate-limited answers the client met (not failures; they pause the pacer)

Target (issue): >= 90% of the limit and 0 failed calls at every concurrency.

    python benchmarks/rate_limit.py [--seconds 25] [--concurrency 4 64 256] [--out benchmarks/results/rate_limit.md]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx2

from harness.config import EndpointConfig, SamplingConfig
from harness.errors import HarnessError
from harness.llm import LLMClient
from harness.records import Message, SampleId
from harness.testing.sim_process import simulator_process

PROMPT = "Compute {i}+3*4+5-6*7. Reason step by step and put the final answer in \\boxed{{}}."


async def drain(base_url: str, kind: str, max_tokens: int) -> tuple[float, float]:
    """Spend the server's budget until it refuses, so the measurement starts from an (almost)
    empty one. Returns what the server says is left and when (time.perf_counter())."""
    body = {"model": "sim-base", "messages": [{"role": "user", "content": "1+1"}], "max_completion_tokens": max_tokens}
    header = f"x-ratelimit-remaining-{'requests' if kind == 'rpm' else 'tokens'}"
    async with httpx2.AsyncClient(timeout=30) as http:
        async def post() -> tuple[httpx2.Response, float]:
            reply = await http.post(f"{base_url}/chat/completions", json=body)
            return reply, time.perf_counter()

        while True:
            replies = await asyncio.gather(*(post() for _ in range(64)))
            refused = [(float(r.headers[header]), t) for r, t in replies if r.status_code == 429]
            if refused:
                return min(refused)  # a 429 is answered at once, so its reading is as of its arrival


async def measure(base_url: str, *, concurrency: int, calls: int, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = EndpointConfig(kind="simulator", concurrency=concurrency, max_retries=0)
        async with LLMClient(base_url=base_url, api_key="x", run_dir=Path(tmp), endpoint=endpoint,
                             sampling=SamplingConfig(max_tokens=max_tokens), seed=0) as client:
            async def one(i: int):
                sample = SampleId(iteration=0, split="bench", problem_id=f"p{i}", agent=0, round=0)
                return await client.chat("sim-base", [Message(role="user", content=PROMPT.format(i=i))], sample)

            start = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(calls)), return_exceptions=True)
            end = time.perf_counter()
            elapsed = end - start
            pacing = client.pacing()[base_url]
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    for exc in failed[:3]:
        print(f"  failed: {exc if isinstance(exc, HarnessError) else repr(exc)}", file=sys.stderr)
    return {"ok": len(ok), "failed": len(failed), "elapsed": elapsed, "end": end, "rate_limited": int(pacing["rate_limited"]),
            "retried": sum(r.usage.attempts > 1 for r in ok),
            "tokens": sum((r.usage.prompt_tokens or 0) + max_tokens for r in ok)}


def run_case(kind: str, limit: int, concurrency: int, seconds: float, latency_ms: float, max_tokens: int) -> dict:
    per_s = limit / 60
    with simulator_process(f"--{kind}-limit", str(limit), "--latency-ms", str(latency_ms),
                           "--latency-jitter-ms", str(latency_ms / 4)) as url:
        left, drained_at = asyncio.run(drain(url, kind, max_tokens=4000 if kind == "tpm" else 1))
        # Calls for about `seconds` at the limit: 1 request each, or prompt (~40) + max_tokens tokens each.
        calls = int(per_s * seconds) if kind == "rpm" else int(per_s * seconds / (40 + max_tokens))
        r = asyncio.run(measure(url, concurrency=concurrency, calls=calls, max_tokens=max_tokens))
    used = r["ok"] if kind == "rpm" else r["tokens"]
    # What the server could have admitted: what was left after the drain, plus the refill since.
    allowed = left + per_s * (r["end"] - drained_at)
    r.update(kind=kind, limit=limit, concurrency=concurrency, calls=calls, share=used / allowed)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rpm", type=int, default=600, help="the RPM limit (requests per minute)")
    p.add_argument("--tpm", type=int, default=60_000, help="the TPM limit (tokens per minute)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 64, 256])
    p.add_argument("--seconds", type=float, default=25.0, help="length of each measurement at the limit")
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = p.parse_args()

    rows = []
    for kind, limit in (("rpm", args.rpm), ("tpm", args.tpm)):
        for concurrency in args.concurrency:
            r = run_case(kind, limit, concurrency, args.seconds, args.latency_ms, args.max_tokens)
            rows.append(r)
            print(f"{kind.upper()} limit {limit}, concurrency {concurrency:>3}: {r['share']:.1%} of the limit over "
                  f"{r['elapsed']:.1f}s, {r['ok']}/{r['calls']} calls answered, {r['failed']} failed, "
                  f"{r['rate_limited']} 429s met, {r['retried']} calls retried", flush=True)
    ok = all(r["share"] >= 0.9 and r["failed"] == 0 for r in rows)
    print(f"target (>= 90% of the limit, 0 failed calls, at every concurrency): {'met' if ok else 'NOT met'}")
    if args.out:
        lines = [
            "# Rate-limit pacing benchmark (simulated server)",
            "",
            f"`python benchmarks/rate_limit.py --seconds {args.seconds:g}` on {platform.machine()}, Python "
            f"{platform.python_version()}. The simulator (a test double, in its own process) enforces the limit "
            f"as a budget refilled continuously; it is drained first, so the numbers are the sustained rate. "
            f"Simulated latency {args.latency_ms:g} ms (jitter {args.latency_ms / 4:g} ms), max_tokens "
            f"{args.max_tokens}, `endpoint.max_retries=0` (a 429 must not need a retry). TPM counts prompt tokens "
            f"plus max_tokens per request, as OpenAI counts it. Share of limit = what was used / what the server "
            f"could admit (the budget left after the drain plus limit/60 a second until the last answer); the "
            f"rest is the first call's round trip (it goes alone, to read the limits), the last call's latency, "
            f"and the pacer's margin of about one latency's worth of budget.",
            "",
            "| limit | concurrency | calls | elapsed (s) | share of limit | failed calls | 429s met | calls retried |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(f"| {r['limit']} {r['kind'].upper()} | {r['concurrency']} | {r['calls']} | {r['elapsed']:.1f} | "
                         f"{r['share']:.1%} | {r['failed']} | {r['rate_limited']} | {r['retried']} |")
        lines += ["", f"Target: >= 90% of the limit and 0 failed calls at every concurrency: **{'met' if ok else 'not met'}**.", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
