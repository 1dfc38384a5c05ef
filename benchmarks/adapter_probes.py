"""How far a trained LoRA adapter moves the probe text's log-probabilities, next to an adapter that
changes nothing, on a real vLLM CPU server: the numbers behind `serve.probe.tolerance`
(harness/probes.py, docs/serving/adapter-probes.md).

One adapter trained by the local provider (the preset's LoRA settings: r, alpha, learning rate,
batch size; --examples chat examples, --epochs), and a fresh PEFT LoRA of the same rank (B all zeros,
PEFT's initial state), are loaded into one vLLM server with the base model; the probe runs as the
loop runs it (base, each adapter, base again, one request at a time) --repeats times, through
LLMClient. Reports each adapter's max / mean |Δ logprob| against the base, the base's own noise, the
verdict at the default tolerance, and the wall time of one probe request.

    python benchmarks/adapter_probes.py --model tiny    [--out benchmarks/results/adapter_probes.md]
    python benchmarks/adapter_probes.py --model smollm2 --examples 8 --epochs 1 --append
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

from harness.config import EndpointConfig, Hyperparameters, SamplingConfig, load_config
from harness.errors import AdapterNotApplied
from harness.llm import LLMClient
from harness.models import resolve
from harness.probe_settings import AdapterProbeConfig
from harness.probes import probe_adapters
from harness.providers.base import FinetuneRequest, JobStatus
from harness.providers.local import LocalProvider
from harness.serve import VLLMServer, load_adapters
from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def train(work: Path, model: str, cfg, examples: int, epochs: int, threads: int | None) -> str:
    local = cfg.finetune.local.model_copy(update={"threads": threads, "device": "cpu"})
    provider = LocalProvider(work / "jobs", local, base_model_path=model, max_lora_rank=8, base_names={"base"})
    state = await provider.submit(FinetuneRequest(
        training_file=write_chat_jsonl(work / "data.jsonl", n=examples), base_model="base",
        hyperparameters=Hyperparameters(n_epochs=epochs, batch_size=cfg.finetune.hyperparameters.batch_size),
        metadata={"run": "bench", "iteration": "1", "role": "generator", "agent": "0"}))
    done = await provider.wait(state.job_id, poll_interval_s=1, max_interval_s=2)
    if done.status != JobStatus.SUCCEEDED:
        raise SystemExit(f"training failed: {done.error}")
    return done.artifact_path


def untrained(work: Path, model: str, r: int, alpha: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = work / "untrained"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                   LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear")).save_pretrained(out)
    return out


async def measure(url: str, key: str, adapters: dict[str, str], work: Path, repeats: int) -> tuple[dict, list[float]]:
    await load_adapters(url, adapters, api_key=key)
    settings, last, seconds = AdapterProbeConfig(), {}, []
    async with LLMClient(base_url=url, api_key=key, run_dir=work / "run", sampling=SamplingConfig(),
                         endpoint=EndpointConfig(kind="vllm", api_key_env=None, max_retries=0)) as client:
        for _ in range(repeats):
            for name in adapters:
                t0 = time.monotonic()
                try:
                    record = await probe_adapters(client, [url], "base", [name], settings=settings, iteration=1,
                                                  out_path=work / "run" / "adapter-probes.json")
                    probe = record.probes[-1]
                except AdapterNotApplied:
                    from harness.probes import AdapterProbes

                    record = AdapterProbes.model_validate_json((work / "run" / "adapter-probes.json").read_bytes())
                    probe = next(p for p in record.probes if p.adapter == name)
                seconds.append((time.monotonic() - t0) / 3)  # base, adapter, base
                last.setdefault(name, []).append(probe)
    return last, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "adapter_probes.md")
    p.add_argument("--append", action="store_true", help="add a section to --out instead of replacing it")
    args = p.parse_args()

    cfg = load_config("vllm-tiny" if args.model == "tiny" else "smollm2", [])
    work = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    model = str(build_tiny_model(work / "tiny")) if args.model == "tiny" else resolve("harness:smollm2")
    load_before = os.getloadavg()
    t0 = time.monotonic()
    trained = asyncio.run(train(work, model, cfg, args.examples, args.epochs, args.threads))
    train_s = time.monotonic() - t0
    zero = untrained(work, model, cfg.finetune.local.r, cfg.finetune.local.alpha)
    serve = cfg.serve.model_copy(update={"model": model, "port": free_port(), "manage": True,
                                         "python": str(REPO / ".venv-vllm" / "bin" / "python")})
    key = "bench"
    server = VLLMServer(serve, agents=2, log_path=work / "vllm.log", api_key=key)
    server.start()
    try:
        asyncio.run(server.wait_healthy())
        probes, seconds = asyncio.run(measure(server.base_url, key, {"trained": trained, "untrained": str(zero)},
                                              work, args.repeats))
    finally:
        server.stop()

    lines = [f"## {args.model}: {'SmolLM2-135M-Instruct' if args.model == 'smollm2' else 'the tiny test model'}", "",
             f"Command: `python benchmarks/adapter_probes.py --model {args.model} --examples {args.examples} "
             f"--epochs {args.epochs} --repeats {args.repeats} --threads {args.threads}`", "",
             f"- Trained adapter: the local provider, LoRA r {cfg.finetune.local.r}, alpha {cfg.finetune.local.alpha}, "
             f"learning rate {cfg.finetune.local.learning_rate:g}, batch size {cfg.finetune.hyperparameters.batch_size}, "
             f"{args.examples} chat examples x {args.epochs} epoch(s) ({train_s:.0f} s); untrained: a fresh PEFT LoRA "
             f"of the same rank (B all zeros).",
             f"- Server: vLLM 0.32 CPU build, dtype {serve.dtype}; probe text: the built-in one; default tolerance "
             f"{AdapterProbeConfig().tolerance:g}.",
             f"- Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work; load average "
             f"before {' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
             "", "| adapter | tokens | max \\|Δ logprob\\| (min..max over repeats) | mean \\|Δ logprob\\| | base noise | verdict |",
             "|---|---|---|---|---|---|"]
    for name, runs in probes.items():
        maxes = [r.max_abs_delta for r in runs]
        lines.append(f"| {name} | {runs[0].tokens} | {statistics.median(maxes):.3g} ({min(maxes):.3g}..{max(maxes):.3g}) "
                     f"| {statistics.median(r.mean_abs_delta for r in runs):.3g} | {max(r.base_noise for r in runs):.3g} "
                     f"| {', '.join(sorted({r.verdict for r in runs}))} |")
    lines += ["", f"One probe request (median over {len(seconds)}): {statistics.median(seconds) * 1000:.0f} ms.", ""]
    header = ["# Adapter probes: how far a trained adapter moves the probe text (real vLLM CPU server)", "",
              "`benchmarks/adapter_probes.py`; what the numbers mean: docs/serving/adapter-probes.md.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text(encoding="utf-8") if args.append and args.out.exists() else "\n".join(header)
    args.out.write_text(old.rstrip("\n") + "\n\n" + "\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
