"""The Batch API's price on the demo: run the demo (simulator, same seed) once with direct calls and
once with `endpoint.batch=true`, and compare what they cost and what they found.

Reported per run: calls, batches, the debate calls' cost, the diversity stage's embedding calls'
cost (with endpoint.batch both go through the Batch API), the whole inference cost, wall time.
Then the ratios batch / direct (goal for the whole inference cost: 0.50 +- 0.01) and whether the
results are the same: every debate record (turns, answers, votes), every iteration's
metrics.json and diversity.json.
All prices are the simulator's nominal ones (a test double: nobody is billed).

    python benchmarks/batch_cost.py [--out benchmarks/results/batch-cost] [--workdir DIR]
                                    [--batch-seconds 0.5] [--set KEY=VALUE ...]

Exit status 0 when the whole inference cost ratio is within 0.50 +- 0.01 and the results are the
same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.fileio import read_jsonl, write_atomic  # noqa: E402
from harness.diversity import DiversityMetrics  # noqa: E402
from harness.records import DebateRecord, IterationMetrics, UsageRecord  # noqa: E402

DEBATE = ("debate", "summary")


def run(name: str, workdir: Path, extra: list[str]) -> dict:
    run_dir = workdir / name
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "harness.loop", "--run-dir", str(run_dir), *extra],
                            cwd=workdir, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - t0
    if result.returncode != 0:
        sys.exit(f"{name} run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    usage = read_jsonl(run_dir / "usage.jsonl", UsageRecord)
    paid = [u for u in usage if not u.cached]
    debate = [u for u in paid if u.purpose in DEBATE]
    batches = {u.batch_id for u in paid if u.batch_id}
    return {
        "run": name, "run_dir": str(run_dir), "wall_s": round(seconds, 1), "calls": len(paid),
        "debate_calls": len(debate), "batched_calls": sum(1 for u in paid if u.batch_id), "batches": len(batches),
        "prompt_tokens": sum(u.prompt_tokens or 0 for u in paid),
        "completion_tokens": sum(u.completion_tokens or 0 for u in paid),
        "debate_cost_usd": sum(u.cost_usd or 0.0 for u in debate),
        "embed_calls": sum(1 for u in paid if u.purpose == "embed"),
        "embed_cost_usd": sum(u.cost_usd or 0.0 for u in paid if u.purpose == "embed"),
        "other_cost_usd": sum(u.cost_usd or 0.0 for u in paid if u.purpose not in (*DEBATE, "embed")),
        "total_cost_usd": sum(u.cost_usd or 0.0 for u in paid),
    }


def same_results(a: Path, b: Path) -> dict:
    files = sorted(p.relative_to(a) for p in a.glob("iter-*/debate-*.jsonl"))
    differing = 0
    records = 0
    for rel in files:
        ra = {r.problem.id: r.model_dump() for r in read_jsonl(a / rel, DebateRecord)}
        rb = {r.problem.id: r.model_dump() for r in read_jsonl(b / rel, DebateRecord)} if (b / rel).exists() else {}
        records += len(ra)
        differing += sum(1 for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k))
    metrics = sorted(p.relative_to(a) for p in a.glob("iter-*/metrics.json"))
    same_metrics = all((b / rel).exists() and IterationMetrics.model_validate_json((a / rel).read_bytes())
                       == IterationMetrics.model_validate_json((b / rel).read_bytes()) for rel in metrics)
    accuracy = {str(rel.parent): IterationMetrics.model_validate_json((a / rel).read_bytes()).splits["test"].accuracy
                for rel in metrics}
    diversity = sorted(p.relative_to(a) for p in a.glob("iter-*/diversity.json"))
    same_diversity = all((b / rel).exists() and DiversityMetrics.model_validate_json((a / rel).read_bytes())
                         == DiversityMetrics.model_validate_json((b / rel).read_bytes()) for rel in diversity)
    dissimilarity = {str(rel.parent):
                     DiversityMetrics.model_validate_json((a / rel).read_bytes()).embedding_dissimilarity
                     for rel in diversity}
    return {"debate_records": records, "differing_records": differing, "metrics_files": len(metrics),
            "metrics_identical": same_metrics, "test_accuracy": accuracy, "diversity_files": len(diversity),
            "diversity_identical": same_diversity, "embedding_dissimilarity": dissimilarity}


def report(direct: dict, batch: dict, same: dict, args: argparse.Namespace) -> tuple[str, dict, bool]:
    ratio = batch["debate_cost_usd"] / direct["debate_cost_usd"]
    total_ratio = batch["total_cost_usd"] / direct["total_cost_usd"]
    embed_ratio = batch["embed_cost_usd"] / direct["embed_cost_usd"] if direct["embed_cost_usd"] else None
    ok = (abs(total_ratio - 0.5) <= 0.01 and same["differing_records"] == 0 and same["metrics_identical"]
          and same["diversity_identical"])
    data = {"config": {"preset": "demo", "batch_seconds": args.batch_seconds, "overrides": args.overrides},
            "direct": direct, "batch": batch, "debate_cost_ratio": round(ratio, 6),
            "embed_cost_ratio": None if embed_ratio is None else round(embed_ratio, 6),
            "total_cost_ratio": round(total_ratio, 6), "same_results": same, "goal_met": ok,
            "simulated": True, "python": sys.version.split()[0], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = ["calls", "debate_calls", "embed_calls", "batched_calls", "batches", "prompt_tokens", "completion_tokens",
            "debate_cost_usd", "embed_cost_usd", "other_cost_usd", "total_cost_usd", "wall_s"]
    fmt = {k: "{:.6f}" for k in ("debate_cost_usd", "embed_cost_usd", "other_cost_usd", "total_cost_usd")}
    lines = [
        "# Batch API vs direct calls on the demo (simulator)", "",
        f"`python benchmarks/batch_cost.py --batch-seconds {args.batch_seconds:g}"
        + "".join(f" --set {o}" for o in args.overrides) + f"` ({data['when']}; simulated prices, nobody billed).",
        "Both runs: the `demo` preset, seed 0 (100 train / 100 test arithmetic problems, 3 agents, 2 rounds with "
        "summaries, 2 finetuning iterations through the simulator's fine-tuning API); the batch run adds "
        "`endpoint.batch=true`.", "",
        "| | direct | batch |", "|---|---:|---:|",
        *(f"| {k} | {fmt.get(k, '{}').format(direct[k])} | {fmt.get(k, '{}').format(batch[k])} |" for k in rows), "",
        f"- **whole inference cost ratio batch / direct: {total_ratio:.4f}** (goal 0.50 ± 0.01): every debate and "
        "summary call, and every embedding call of the diversity stage, went through the Batch API, at half price.",
        f"- debate cost ratio: {ratio:.4f}; embedding cost ratio: "
        + (f"{embed_ratio:.4f}" if embed_ratio is not None else "n/a (no embedding calls)")
        + f"; other inference (neither): ${direct['other_cost_usd']:.6f} direct, ${batch['other_cost_usd']:.6f} batch.",
        f"- same results: {same['debate_records'] - same['differing_records']} of {same['debate_records']} debate "
        f"records identical (every turn, answer and vote), {same['metrics_files']} metrics.json files "
        f"{'identical' if same['metrics_identical'] else 'DIFFERENT'}, {same['diversity_files']} diversity.json files "
        f"{'identical' if same['diversity_identical'] else 'DIFFERENT'}; test accuracy per iteration "
        + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in same["test_accuracy"].items()) + "; embedding dissimilarity "
        + ", ".join(f"{k}: {v:.4f}" if v is not None else f"{k}: n/a"
                    for k, v in same["embedding_dissimilarity"].items())
        + ".",
        f"- wall time is the simulator's: each batch takes `endpoint.simulator.batch_seconds` "
        f"({args.batch_seconds:g} s) to complete; on OpenAI a batch takes up to its 24 h window.",
    ]
    return "\n".join(lines) + "\n", data, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batch-cost")
    p.add_argument("--workdir", type=Path, default=None, help="where the two run directories go (default: a temp dir)")
    p.add_argument("--batch-seconds", type=float, default=0.5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="batch-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    common = [x for o in args.overrides for x in ("--set", o)]
    direct = run("direct", workdir, common)
    batch = run("batch", workdir, [*common, "--set", "endpoint.batch=true",
                                   "--set", f"endpoint.simulator.batch_seconds={args.batch_seconds}",
                                   "--set", "endpoint.batch_settings.poll_interval_s=0.1",
                                   "--set", "endpoint.batch_settings.gather_s=0.2"])
    same = same_results(Path(direct["run_dir"]), Path(batch["run_dir"]))
    text, data, ok = report(direct, batch, same, args)
    args.out.mkdir(parents=True, exist_ok=True)
    for d in (data["direct"], data["batch"]):
        d.pop("run_dir")
    write_atomic(args.out / "README.md", text)
    write_atomic(args.out / "result.json", json.dumps(data, indent=2) + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
