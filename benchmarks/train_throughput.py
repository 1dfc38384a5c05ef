"""Local LoRA training throughput through the harness vs a plain TRL script, on the real model.

On the same chat JSONL (SmolLM2 debate-style arithmetic examples: generator examples and
critic conversations whose first answer has weight 0, as harness.ftdata writes them; or any
chat JSONL given with --data), interleaved repeats of

  A  harness  harness.providers.local.LocalProvider: submit a job (its own process running
              harness.providers.local_train) and wait for it as the loop does
              (finetune.poll_interval_s of the `smollm2` preset);
  B  plain    a plain TRL SFTTrainer script (written below) in its own process: the same model,
              LoRA r/alpha/dropout/targets, epochs, batch size, learning rate, scheduler,
              max_length, seed and float32 weights, the same data as a `messages` dataset.

Both run the same forward and backward passes over the same tokens (the harness's per-turn loss
mask changes which tokens carry loss, not how many are computed). Measured both ways:
  train tokens/s  tokens of the training set x epochs / the Trainer's own train_runtime
  end-to-end      wall seconds from starting the job to having the adapter (process start,
                  imports, model load, tokenization, training, saving; for A also the polling)
Reported per pair as harness / plain (tokens/s ratio >= 1 and time ratio <= 1: no slower):
median, min..max, n.

    python benchmarks/train_throughput.py [--examples 16] [--role generator] [--epochs 1]
        [--batch-size 4] [--repeats 3] [--threads N] [--plain-gc on|off|default] [--data FILE]
        [--out benchmarks/results/train_throughput.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.config import load_config
from harness.models import resolve
from harness.prompts import Prompts
from harness.providers.base import FinetuneRequest
from harness.providers.local import LocalProvider
from harness.tasks import load_split

PLAIN_SCRIPT = r'''
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

cfg = json.loads(sys.argv[1])
rows = []
with open(cfg["data"], encoding="utf-8") as f:
    for line in f:
        if line.strip():
            rows.append({"messages": [{"role": m["role"], "content": m["content"]}
                                      for m in json.loads(line)["messages"]]})
args = SFTConfig(output_dir=cfg["out"] + "/checkpoints", num_train_epochs=cfg["epochs"],
                 per_device_train_batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
                 lr_scheduler_type="linear", max_length=cfg["max_length"], seed=cfg["seed"],
                 use_cpu=True, bf16=False, save_strategy="no", report_to=[],
                 model_init_kwargs={"dtype": torch.float32},
                 **({} if cfg["gradient_checkpointing"] is None else {"gradient_checkpointing": cfg["gradient_checkpointing"]}))
trainer = SFTTrainer(model=cfg["model"], args=args, train_dataset=Dataset.from_list(rows),
                     peft_config=LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                                            target_modules=cfg["target_modules"], task_type="CAUSAL_LM"))
metrics = trainer.train().metrics
trainer.model.save_pretrained(cfg["out"] + "/adapter")
print("RESULT " + json.dumps({"train_runtime": metrics["train_runtime"],
                              "tokens": sum(len(x) for x in trainer.train_dataset["input_ids"]),
                              "examples": len(trainer.train_dataset),
                              "gradient_checkpointing": args.gradient_checkpointing}))
'''

ANSWERS = [
    "To find the value of the expression {q}, we add the numbers from left to right.\n\n"
    "{steps}\n\nTherefore, the final result is \\boxed{{{v}}}.",
    "Let's work this out step by step.\n\nThe expression is {q}. There is only addition, so we can add "
    "the terms in order:\n{steps}\n\nThe value of the expression is {v}.\n\n\\boxed{{{v}}}",
    "Step 1: Write down the expression: {q}.\nStep 2: Add the terms one at a time.\n{steps}\n"
    "Step 3: Check the sum once more; it is {v}.\n\nFinal answer: \\boxed{{{v}}}",
]


def _answer(question: str, terms: list[int], rng: random.Random, wrong: bool = False) -> str:
    total, steps = terms[0], []
    for t in terms[1:]:
        steps.append(f"{total} + {t} = {total + t}")
        total += t
    value = total + (rng.choice([-10, -1, 1, 2, 10]) if wrong else 0)
    if wrong:
        steps[-1] = steps[-1].rsplit("=", 1)[0] + f"= {value}"
    return rng.choice(ANSWERS).format(q=question, steps="\n".join(steps), v=value)


def build_data(path: Path, n: int, role: str, seed: int = 0) -> None:
    """n debate-style chat examples on the `smollm2` preset's task, in harness.ftdata's shape: a
    generator file holds [task prompt, answer]; a critic file [task prompt, first answer (weight
    0; one in three wrong), the other agents' digest, revised answer]. One role per file, as the
    loop trains them (a job never mixes the two)."""
    cfg = load_config("smollm2")
    prompts = Prompts(cfg.task.name, cfg.task.prompts_dir)
    problems = load_split(cfg.task.model_copy(update={"n_train": n}), "train")
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(problems):
            expr = re.search(r"\d[\d\s+*-]*\d|\d", p.question).group(0).replace(" ", "")
            terms = [int(x) for x in re.findall(r"\d+", expr)]
            msgs = [{"role": "user", "content": prompts.question(p.question)},
                    {"role": "assistant", "content": _answer(expr, terms, rng, wrong=role == "critic" and i % 3 == 0)}]
            if role == "critic":
                v = sum(terms)
                summary = (f"Both other agents add the terms of {expr} in order. Agent 1 writes "
                           f"{' + '.join(map(str, terms))} = {v} and answers {v}. Agent 2 gets the same sum, "
                           f"{v}, checking each partial sum, and answers {v}.")
                msgs[1]["weight"] = 0
                msgs += [{"role": "user", "content": prompts.debate_summary(summary, question=p.question)},
                         {"role": "assistant", "content": _answer(expr, terms, rng)}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def train_runtime(log: Path) -> float:
    """The Trainer's own measure of its training loop, from the job's log (its final log line)."""
    found = re.findall(r"'train_runtime': '?([0-9.]+)", log.read_text(encoding="utf-8", errors="replace"))
    if not found:
        raise RuntimeError(f"no train_runtime in {log}")
    return float(found[-1])


def dataset_tokens(model_dir: str, data: Path, max_length: int) -> int:
    from transformers import AutoTokenizer

    from harness.providers.weighted_examples import read_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(ex["input_ids"]) for ex in read_examples(data, tok, max_length)[0])


async def run_harness(cfg, model_dir: str, data: Path, tmp: Path, i: int) -> dict:
    local = cfg.finetune.local.model_copy(update={"device": "cpu"})
    provider = LocalProvider(tmp, local, base_model_path=model_dir, max_lora_rank=cfg.serve.max_lora_rank,
                             base_names={cfg.models.base}, seed=cfg.seed)
    t0 = time.perf_counter()
    state = await provider.submit(FinetuneRequest(
        training_file=data, base_model=cfg.models.base, hyperparameters=cfg.finetune.hyperparameters,
        metadata={"run": f"bench{i}", "iteration": "0", "role": "generator", "agent": "0"}, seed=cfg.seed))
    state = await provider.wait(state.job_id, poll_interval_s=cfg.finetune.poll_interval_s)
    wall = time.perf_counter() - t0
    await provider.close()
    job_dir = tmp / "local-jobs" / state.job_id
    if state.status.value != "succeeded":
        raise RuntimeError(f"harness job {state.status.value}: {state.error}")
    log = (job_dir / "train.log").read_text(encoding="utf-8", errors="replace")
    return {"wall": wall, "train_runtime": train_runtime(job_dir / "train.log"),
            "gradient_checkpointing": "gradient checkpointing on" in log}


def run_plain(cfg, model_dir: str, data: Path, tmp: Path, plain_gc: bool | None) -> dict:
    local, hp = cfg.finetune.local, cfg.finetune.hyperparameters
    spec = {"data": str(data), "out": str(tmp), "model": model_dir, "epochs": hp.n_epochs,
            "batch_size": hp.batch_size, "learning_rate": local.learning_rate * hp.learning_rate_multiplier,
            "max_length": local.max_length, "seed": cfg.seed, "r": local.r, "alpha": local.alpha,
            "dropout": local.dropout, "target_modules": local.target_modules,
            "gradient_checkpointing": plain_gc}
    script = tmp / "plain_sft.py"
    script.write_text(PLAIN_SCRIPT, encoding="utf-8")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the plain TRL script failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    return {"wall": wall, **result}


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, n {len(xs)})"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Sized to finish in ~10 minutes on 2 shared CPU cores; raise them on a real machine.
    p.add_argument("--examples", type=int, default=16, help="examples to build (ignored with --data)")
    p.add_argument("--role", choices=["generator", "critic"], default="generator", help="which kind of file to build")
    p.add_argument("--data", type=Path, help="a chat JSONL to train on instead of the built examples")
    p.add_argument("--epochs", type=int, default=1, help="0: the smollm2 preset's")
    p.add_argument("--batch-size", type=int, help="default: the smollm2 preset's")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both sides (default: torch's, one per core)")
    p.add_argument("--plain-gc", type=lambda v: {"on": True, "off": False, "default": None}[v], default=None,
                   metavar="{on,off,default}", help="the plain script's gradient checkpointing (default: TRL's)")
    p.add_argument("--out", type=Path, help="write the markdown result here")
    args = p.parse_args()

    overrides = []
    if args.epochs:
        overrides.append(f"finetune.hyperparameters.n_epochs={args.epochs}")
    if args.batch_size:
        overrides.append(f"finetune.hyperparameters.batch_size={args.batch_size}")
    cfg = load_config("smollm2", overrides)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # both sides' processes inherit it
    model_dir = resolve(cfg.serve.model)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    data = args.data or work / "train.jsonl"
    if args.data is None:
        build_data(data, args.examples, args.role, cfg.seed)
    n_examples = sum(1 for line in open(data, encoding="utf-8") if line.strip())
    tokens = dataset_tokens(model_dir, data, cfg.finetune.local.max_length)
    hp = cfg.finetune.hyperparameters
    load_before, t_start = loadavg(), time.perf_counter()
    rows = []
    for i in range(args.repeats):
        pair = {}
        # Alternate which goes first, so a drift in the machine's load does not favour one side.
        for side in (("harness", "plain") if i % 2 == 0 else ("plain", "harness")):
            tmp = work / f"{side}-{i}"
            tmp.mkdir()
            pair[side] = (asyncio.run(run_harness(cfg, model_dir, data, tmp, i)) if side == "harness"
                          else run_plain(cfg, model_dir, data, tmp, args.plain_gc))
        h, pl = pair["harness"], pair["plain"]
        h["tps"] = tokens * hp.n_epochs / h["train_runtime"]
        pl["tps"] = pl["tokens"] * hp.n_epochs / pl["train_runtime"]
        rows.append(pair)
        print(f"repeat {i + 1}: harness {h['tps']:.1f} tok/s, {h['wall']:.1f} s end to end; plain {pl['tps']:.1f} "
              f"tok/s, {pl['wall']:.1f} s end to end ({pl['tokens']} tokens per epoch vs the harness's {tokens})",
              flush=True)
    load_after = loadavg()
    tps_ratio = [r["harness"]["tps"] / r["plain"]["tps"] for r in rows]
    wall_ratio = [r["harness"]["wall"] / r["plain"]["wall"] for r in rows]
    local = cfg.finetune.local
    lines = [
        "# Local LoRA training throughput: harness vs a plain TRL script (real model)",
        "",
        f"Command: `python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"- Model: SmolLM2-135M-Instruct (`harness:smollm2`), float32 on CPU; LoRA r {local.r}, alpha {local.alpha}, "
        f"dropout {local.dropout}, targets {local.target_modules}; {hp.n_epochs} epochs, batch size {hp.batch_size}, "
        f"learning rate {local.learning_rate}, max_length {local.max_length}.",
        f"- Data: {n_examples} chat examples ({'given: ' + str(args.data) if args.data else f'built: debate-style arithmetic {args.role} examples'}), "
        f"{tokens} tokens per epoch (the plain script's tokenization: {rows[0]['plain']['tokens']}).",
        f"- Plain script: TRL SFTTrainer on a `messages` dataset, float32, TRL's defaults otherwise; gradient "
        f"checkpointing: plain {'on' if rows[0]['plain']['gradient_checkpointing'] else 'off'}, harness "
        f"{'on' if rows[0]['harness']['gradient_checkpointing'] else 'off'}.",
        f"- Threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset: one per core)')} for both.",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other work; load average "
        f"(1, 5, 15 min) before {load_before}, after {load_after}.",
        f"- Repeats interleaved, the order alternating (A B, B A, ...); n = {len(rows)}; whole benchmark "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        "| repeat | harness tok/s | plain tok/s | ratio | harness end-to-end s | plain end-to-end s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        h, pl = r["harness"], r["plain"]
        lines.append(f"| {i + 1} | {h['tps']:.1f} | {pl['tps']:.1f} | {h['tps'] / pl['tps']:.3f} | {h['wall']:.1f} | "
                     f"{pl['wall']:.1f} | {h['wall'] / pl['wall']:.3f} |")
    lines += ["", f"**harness / plain training tokens/s: median {spread(tps_ratio)}** (target: >= 1.0).",
              f"**harness / plain end-to-end time: median {spread(wall_ratio)}** (target: <= 1.0)."]
    text = "\n".join(lines) + "\n"
    shutil.rmtree(work, ignore_errors=True)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
