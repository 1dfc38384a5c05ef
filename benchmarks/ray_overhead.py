"""What submitting a finetuning job through Ray costs over starting it as a subprocess.

    python benchmarks/ray_overhead.py [--repeats 3] [--out benchmarks/results/ray_overhead.json]

Starts a one-node Ray cluster (CPU only) in namespaces of its own (harness.testing.ray_cluster),
then, inside them, trains the same tiny-model LoRA job (harness.testing.tiny_model, 16 examples,
1 epoch) through the local provider with each runner, one job at a time, alternating runners,
`--repeats` times each, and reports per runner the wall time from submit to the provider
reading the job as succeeded, split into "until the job's process started" (launch overhead:
for Ray, scheduling, the job supervisor and runtime env) and "training" (what the job itself
took), and "after" (from the job's last status to the provider seeing it end). Both runners'
jobs train with OMP_NUM_THREADS=1: Ray sets that for a job of 1 CPU (num_cpus_per_job), and
the benchmark sets it for the subprocess too, so the two differ only in how the job is started.
The ratio of the medians is the headline. The model is tiny on purpose: the overhead is
a constant per job, so on a real 7B job (tens of minutes) it vanishes; here it is most visible.
"""

from __future__ import annotations

import argparse
import asyncio
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def one_job(runner: str, work: Path, model: Path, data: Path, i: int) -> dict:
    from harness.config import Hyperparameters, LocalFinetuneConfig
    from harness.providers.base import FinetuneRequest, JobStatus
    from harness.providers.local import LocalProvider
    from harness.testing.ray_cluster import ADDRESS

    cfg = LocalFinetuneConfig(runner=runner, device="cpu", max_parallel_jobs=1,
                              ray={"address": ADDRESS, "num_gpus_per_job": 0, "num_cpus_per_job": 1})
    provider = LocalProvider(work / f"{runner}-{i}", cfg, base_model_path=str(model), base_names={"base"})
    await provider.runner.check()  # the cluster's connection is set up before the clock starts
    started = time.perf_counter()
    wall0 = time.time()
    state = await provider.submit(FinetuneRequest(
        training_file=data, base_model="base", hyperparameters=Hyperparameters(n_epochs=1, batch_size=2),
        metadata={"run": f"bench-{runner}", "iteration": str(i), "role": "generator", "agent": "0"}))
    done = await provider.wait(state.job_id, poll_interval_s=0.2, max_interval_s=0.2)
    total = time.perf_counter() - started
    if done.status is not JobStatus.SUCCEEDED:
        raise RuntimeError(f"{runner} job failed: {done.error}")
    status = json.loads((provider.jobs_dir / state.job_id / "status.json").read_text())
    return {"runner": runner, "repeat": i, "total_s": round(total, 3),
            "until_process_started_s": round(status["started_at"] - wall0, 3),
            "training_s": round(status["finished_at"] - status["started_at"], 3),
            "after_s": round(wall0 + total - status["finished_at"], 3)}


async def measure(repeats: int) -> list[dict]:
    from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        model = build_tiny_model(work / "tiny-model")
        data = write_chat_jsonl(work / "data.jsonl", n=16)
        rows = []
        for i in range(repeats):
            for runner in ("subprocess", "ray"):
                rows.append(await one_job(runner, work, model, data, i))
                print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(rows: list[dict]) -> dict:
    out = {}
    for runner in ("subprocess", "ray"):
        mine = [r for r in rows if r["runner"] == runner]
        out[runner] = {k: {"median": round(statistics.median(r[k] for r in mine), 3),
                           "min": min(r[k] for r in mine), "max": max(r[k] for r in mine)}
                       for k in ("total_s", "until_process_started_s", "training_s", "after_s")}
    out["ratio_total_ray_over_subprocess"] = round(out["ray"]["total_s"]["median"] / out["subprocess"]["total_s"]["median"], 2)
    out["ray_extra_s_per_job"] = round(out["ray"]["total_s"]["median"] - out["subprocess"]["total_s"]["median"], 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray_overhead.json")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in the cluster's namespaces
    args = p.parse_args()
    if args.inside:
        print("ROWS " + json.dumps(asyncio.run(measure(args.repeats))), flush=True)
        return 0
    from harness.testing.ray_cluster import NamespacedRay, missing

    if (why := missing()) is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1
    load_before = [round(x, 1) for x in os.getloadavg()]
    cluster = NamespacedRay(num_cpus=2).start()
    try:
        out = cluster.run([sys.executable, __file__, "--inside", "--repeats", str(args.repeats)],
                          timeout=3600, cwd=ROOT, capture_output=False, stdout=subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        cluster.stop()
    if out.returncode != 0:
        print(out.stdout, file=sys.stderr)
        return 1
    rows = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))[5:])
    import ray

    result = {"command": f"python benchmarks/ray_overhead.py --repeats {args.repeats}",
              "measured_at": time.strftime("%Y-%m-%d %H:%M"), "ray": ray.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU, shared with other work",
              "job": "tiny random Llama (~0.4M params), LoRA r=8, 16 examples, 1 epoch, batch 2, CPU, OMP_NUM_THREADS=1",
              "cluster": "one-node Ray head, 2 logical CPUs, no GPU, dashboard on, in its own network namespace",
              "load_average_1_5_15min": {"before": load_before, "after": [round(x, 1) for x in os.getloadavg()]},
              "repeats": args.repeats, "summary": summarize(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
