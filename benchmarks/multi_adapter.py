"""The resident multi-adapter trainer vs one process per job, at the `smollm2` preset's sizes.

One iteration of the preset trains 2N = 6 LoRA adapters (3 agents x generator and critic) on
SmolLM2-135M-Instruct, each on its own 12-30 debate-style examples (the counts real runs of the
preset gave), with the preset's batch size, epochs, learning rate, LoRA shape, max_length,
threads and max_parallel_jobs. Interleaved repeats (A B A B ...) of

  A  per_job   the 6 jobs as the provider runs them today: `python -m harness.providers.local_train
               --job-dir DIR` each, at most max_parallel_jobs at once (1 in the preset);
  B  resident  one `python -m harness.providers.resident_train --job-dir D1 ... --job-dir D6`
               (checkpoints after every step, as the provider launches it).

Measured: wall seconds from the first process start to the last exit; peak memory as the RSS of
every process alive (the whole tree: psutil, sampled every 0.1 s), its maximum over the run, and
per job process its own peak RSS. Ratios: wall resident / per_job per pair (a pair runs its two
sides back to back) and their median, peak RSS of the resident process / the largest peak RSS of
one per-job process. Each adapter's losses are compared between the two sides too (same seeds:
they must be equal).

    python benchmarks/multi_adapter.py [--repeats 2] [--counts 12,18,24,30,16,22]
        [--out benchmarks/results/multi-adapter] [--append] [--summarize]

The committed result (benchmarks/results/multi-adapter/) is three pairs at these default sizes on
a machine with nothing else running; its loaded-pair/ folder holds an earlier pair whose two sides
ran under different loads, and small-4-examples/ a run at `--counts 4,4,4,4,4,4` (2 steps per
adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from harness.config import load_config  # noqa: E402
from harness.fileio import read_jsonl, write_json, write_jsonl_atomic  # noqa: E402
from harness.models import resolve  # noqa: E402
from harness.prompts import Prompts  # noqa: E402
from harness.providers.local_train import LoraSpec  # noqa: E402
from harness.tasks import load_split  # noqa: E402
from harness.testing.local_jobs import write_job  # noqa: E402

SAMPLE_S = 0.1
RATIOS = ("wall_ratio", "wall_ratio_per_pair", "memory_ratio_vs_one_job", "max_abs_loss_difference")  # printed


def _reply(a: int, op: str, b: int, value: int) -> str:
    """A reply of the length SmolLM2 gives to the preset's prompt (~60 tokens)."""
    return (f"To find the result of {a} {op} {b}, we apply the operation to the two numbers. "
            f"{a} {op} {b} equals {value}. So the result of the expression is {value}. "
            f"My answer is {value}.")


def build_data(path: Path, n: int, role: str, seed: int, cfg) -> None:
    """n chat examples on the preset's task in harness.ftdata's shape: a generator example is
    [task prompt, reply]; a critic example [task prompt, first reply (weight 0; one in three
    wrong), the other agents' replies (concatenated, the preset's debate mode), revised reply]."""
    prompts = Prompts(cfg.task.name, cfg.task.prompts_dir)
    problems = load_split(cfg.task.model_copy(update={"n_train": n, "seed": seed}), "train")
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(problems):
            a, op, b = (i * 7 + seed) % 10, "+-*"[(i + seed) % 3], (i * 3 + 2 * seed) % 10
            value = ops[op](a, b)
            msgs = [{"role": "user", "content": prompts.question(p.question)},
                    {"role": "assistant", "content": _reply(a, op, b, value + (1 if role == "critic" and i % 3 == 0 else 0))}]
            if role == "critic":
                msgs[1]["weight"] = 0
                others = [(k, _reply(a, op, b, value)) for k in (1, 2)]
                msgs += [{"role": "user", "content": prompts.debate(others, question=p.question)},
                         {"role": "assistant", "content": _reply(a, op, b, value)}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def make_jobs(root: Path, data: list[Path], model: str, cfg) -> list[Path]:
    local, hp = cfg.finetune.local, cfg.finetune.hyperparameters
    dirs = []
    for i, path in enumerate(data):
        job_dir = write_job(root / f"job{i}", base_model_path=model, training_file=path, metadata={"agent": str(i // 2)},
                            lora=LoraSpec(r=local.r, alpha=local.alpha, dropout=local.dropout,
                                          target_modules=local.target_modules),
                            learning_rate=local.learning_rate, epochs=hp.n_epochs, batch_size=hp.batch_size,
                            max_length=local.max_length, seed=cfg.seed, device="cpu", threads=local.threads,
                            max_lora_rank=cfg.serve.max_lora_rank)
        dirs.append(job_dir)
    return dirs


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def run_side(side: str, dirs: list[Path], parallel: int) -> dict:
    """Run one side to the end, sampling the RSS of every live process of it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if side == "resident":
        commands = [[sys.executable, "-m", "harness.providers.resident_train",
                     *[a for d in dirs for a in ("--job-dir", str(d))]]]
        logs = [dirs[0] / "train.log"]
    else:
        commands = [[sys.executable, "-m", "harness.providers.local_train", "--job-dir", str(d)] for d in dirs]
        logs = [d / "train.log" for d in dirs]
    pending = list(zip(commands, logs))
    running: list[tuple[subprocess.Popen, psutil.Process, int]] = []
    peaks: list[int] = []
    peak_tree, codes = 0, []
    load_before = os.getloadavg()
    start, start_epoch = time.perf_counter(), time.time()
    while pending or running:
        while pending and len(running) < parallel:
            command, log = pending.pop(0)
            p = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
            peaks.append(0)
            running.append((p, psutil.Process(p.pid), len(peaks) - 1))
        tree = 0
        for p, proc, k in running:
            own = _rss(proc) + sum(_rss(c) for c in _children(proc))
            peaks[k] = max(peaks[k], own)
            tree += own
        peak_tree = max(peak_tree, tree)
        for item in [r for r in running if r[0].poll() is not None]:
            codes.append(item[0].returncode)
            running.remove(item)
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"{side}: a process failed (exit codes {codes}); see the train.log files under {dirs[0].parent}")
    rows = {d.name: read_jsonl(d / "progress.jsonl") for d in dirs}
    losses = {k: [r["loss"] for r in v] for k, v in rows.items()}
    # When each step was logged, in seconds from the side's start: startup vs per-step costs.
    step_times = {k: [round(r["time"] - start_epoch, 2) for r in v] for k, v in rows.items()}
    return {"side": side, "wall_s": round(wall, 2), "peak_rss_tree_mb": round(peak_tree / 2**20, 1),
            "peak_rss_per_process_mb": [round(x / 2**20, 1) for x in peaks],
            "steps": {k: len(v) for k, v in losses.items()}, "losses": losses, "step_times_s": step_times,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def summarize(records: list[dict], counts: list[int], cfg, command: str | None = None) -> dict:
    paired = {r["repeat"] for r in records if r["side"] == "resident"}
    per_job = sorted((r for r in records if r["side"] == "per_job" and r["repeat"] in paired), key=lambda r: r["repeat"])
    resident = sorted((r for r in records if r["side"] == "resident"), key=lambda r: r["repeat"])
    pair_ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(per_job, resident)]
    one_job = [max(r["peak_rss_per_process_mb"]) for r in per_job]
    mem_ratios = [b["peak_rss_tree_mb"] / o for b, o in zip(resident, one_job)]
    loss_diff = max(abs(x - y) for a, b in zip(per_job, resident) for k in a["losses"]
                    for x, y in zip(a["losses"][k], b["losses"][k]))
    result = {
        # The median of the pairs' own ratios: each pair ran its two sides back to back, under
        # about the same load, which a ratio of the two sides' medians would mix across pairs.
        "wall_ratio": round(statistics.median(pair_ratios), 3),
        "wall_ratio_per_pair": [round(x, 3) for x in pair_ratios],
        "memory_ratio_vs_one_job": round(statistics.median(mem_ratios), 3),
        "memory_ratio_per_pair": [round(x, 3) for x in mem_ratios],
        "per_job_wall_s": [r["wall_s"] for r in per_job], "resident_wall_s": [r["wall_s"] for r in resident],
        "per_job_peak_tree_mb": [r["peak_rss_tree_mb"] for r in per_job],
        "one_job_peak_mb": one_job, "resident_peak_mb": [r["peak_rss_tree_mb"] for r in resident],
        "max_abs_loss_difference": loss_diff,
        "n": len(resident), "adapters": len(counts), "examples_per_adapter": counts,
        "steps_per_adapter": per_job[0]["steps"],
        "settings": {"model": cfg.serve.model, "batch_size": cfg.finetune.hyperparameters.batch_size,
                     "epochs": cfg.finetune.hyperparameters.n_epochs, "threads": cfg.finetune.local.threads,
                     "max_parallel_jobs": cfg.finetune.local.max_parallel_jobs, "learning_rate": cfg.finetune.local.learning_rate,
                     "r": cfg.finetune.local.r, "max_length": cfg.finetune.local.max_length,
                     "resident_checkpoint_every": 1},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "load_per_item": [{"side": r["side"], "repeat": r["repeat"], "started_at": r.get("started_at"),
                                       "before": r["load_before"],
                                       "after": r["load_after"]} for r in records]},
        "command": command or "python benchmarks/multi_adapter.py " + " ".join(sys.argv[1:]),
    }
    return result


def write_result(out: Path, records: list[dict], counts: list[int], cfg, command: str | None = None) -> dict:
    """OUT/result.json from the whole pairs among `records`."""
    if not any(r["side"] == "resident" for r in records):
        raise SystemExit(f"{out / 'records.jsonl'} holds no whole pair to summarize")
    result = summarize(records, counts, cfg, command)
    write_json(out / "result.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--counts", default="12,18,24,30,16,22", help="examples per adapter (gen0,crit0,gen1,...)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/multi-adapter")
    parser.add_argument("--append", action="store_true",
                        help="keep the pairs already in OUT/records.jsonl and add --repeats more (a run cut short); "
                             "a last pair whose resident side was lost (a kill) gets that side first")
    parser.add_argument("--summarize", action="store_true",
                        help="run nothing: rewrite OUT/result.json from OUT/records.jsonl (after pairs were "
                             "moved between folders), keeping the command that produced them")
    args = parser.parse_args()
    cfg = load_config("smollm2")
    counts = [int(x) for x in args.counts.split(",")]
    records_path = args.out / "records.jsonl"
    if args.summarize:  # the command that produced the records stays the one recorded
        previous = args.out / "result.json"
        command = json.loads(previous.read_text(encoding="utf-8")).get("command") if previous.exists() else None
        result = write_result(args.out, read_jsonl(records_path), counts, cfg, command)
        print(json.dumps({k: result[k] for k in RATIOS}))
        return
    model = resolve(cfg.serve.model)
    work = Path(tempfile.mkdtemp(prefix="multi-adapter-"))
    data = []
    for i, n in enumerate(counts):
        path = work / f"data{i}.jsonl"
        build_data(path, n, "generator" if i % 2 == 0 else "critic", i, cfg)
        data.append(path)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    todo: list[tuple[int, str]] = []
    if args.append and records_path.exists():
        records = read_jsonl(records_path)
        sides = {r["repeat"]: [o["side"] for o in records if o["repeat"] == r["repeat"]] for r in records}
        # Whole pairs are kept; so is the last pair if only its resident side was lost (the
        # per_job side runs first), which then runs before anything else.
        cut = max((k for k, s in sides.items() if s == ["per_job"]), default=None)
        records = [r for r in records if len(sides[r["repeat"]]) == 2 or r["repeat"] == cut]
        write_jsonl_atomic(records_path, records)
        if cut is not None:
            todo.append((cut, "resident"))
    else:
        records_path.unlink(missing_ok=True)
    parallel = cfg.finetune.local.max_parallel_jobs
    first = 1 + max((r["repeat"] for r in records), default=-1)
    todo += [(repeat, side) for repeat in range(first, first + args.repeats) for side in ("per_job", "resident")]
    for repeat, side in todo:
        dirs = make_jobs(work / f"r{repeat}-{side}", data, model, cfg)
        record = {"repeat": repeat, "started_at": round(time.time(), 1),
                  **run_side(side, dirs, 1 if side == "resident" else parallel)}
        records.append(record)
        with open(records_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"repeat {repeat} {side}: {record['wall_s']} s, peak tree {record['peak_rss_tree_mb']} MB, "
              f"load {record['load_before']}", flush=True)
        shutil.rmtree(work / f"r{repeat}-{side}")
        if side == "resident":
            # After every pair, so a run cut short still leaves its finished pairs' result.
            write_result(args.out, records, counts, cfg)
    result = write_result(args.out, records, counts, cfg)
    print(json.dumps({k: result[k] for k in RATIOS}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
