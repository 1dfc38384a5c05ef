"""Chaos suite: kill `python -m harness.loop` with SIGKILL at random moments of every stage, resume
it until it finishes, and check that nothing was lost, duplicated or paid twice.

Every trial runs the same small configuration (simulator, one finetuning iteration) in its own
run directory, and `--kills` times picks a stage, waits until the run is inside it (read from the
files the run writes), waits a random moment more and sends SIGKILL; then `--resume` continues
it. The stages:

  debate-test   iteration 0's test debate, after a random number of finished problems
  debate-train  iteration 0's train debate, likewise
  ftdata        the moment the train debate is complete (data building, metrics, first uploads)
  submit        the first upload or job of the finetuning stage
  wait          all jobs created and still running
  debate-test-1 iteration 1's test debate
  summary       iteration 1's debate complete (metrics, diversity, summary.json, exit)

Every other trial (`--storm alternate`, the default) is a fault storm: the simulator also answers with 500s, hangs past the client
timeout and 429s under an RPM limit (`endpoint.simulator.*`). Malformed answers are on in every
run, the reference included: they are drawn from each request's seed, so they are part of the
result, while errors, hangs and 429s are retried and must leave no trace in it.

Checks, against one uninterrupted reference run with the same seed:
  records    every debate file holds each problem exactly once, the reference's problems
  jobs       the simulator (its state is RUN_DIR/simulator/) holds one job per model, as many
             as the reference
  paid       no call with a sample identity appears twice in usage.jsonl as paid (not cached)
  metrics    summary.json's metrics and society equal the reference's

    python benchmarks/chaos.py [--trials 30] [--kills 3] [--storm alternate|always|never]
                               [--out benchmarks/results/chaos.md] [--seed 0] [--workdir DIR]

Exit status 0 when every trial passed every check, 1 otherwise (the failed trials' run
directories and logs are kept and named).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("debate-test", "debate-train", "ftdata", "submit", "wait", "debate-test-1", "summary")
# Jobs last long enough that a kill can land while they run, even right after a resume.
N_TEST, N_TRAIN, JOB_S = 10, 20, 3.0
BASE = ["--set", f"task.n_test={N_TEST}", "--set", f"task.n_train={N_TRAIN}", "--set", "finetune.iterations=1",
        "--set", f"endpoint.simulator.job_seconds={JOB_S}", "--set", "finetune.poll_interval_s=0.1",
        "--set", "endpoint.simulator.latency_ms=10", "--set", "endpoint.simulator.latency_jitter_ms=5",
        "--set", "endpoint.concurrency=8", "--set", "endpoint.simulator.malformed_rate=0.05",
        "--set", "endpoint.max_retries=12", "--set", "endpoint.timeout_s=2"]
STORM = ["--set", "endpoint.simulator.error_rate=0.05", "--set", "endpoint.simulator.timeout_rate=0.01",
         "--set", "endpoint.simulator.rpm_limit=6000"]


@dataclass
class Trial:
    n: int
    storm: bool
    kills: list[str] = field(default_factory=list)  # "stage" of each SIGKILL sent
    missed: list[str] = field(default_factory=list)  # stages the run passed before the kill came
    errors: int = 0  # sessions that stopped with an error (resumed all the same)
    sessions: int = 0
    session_starts: list[float] = field(default_factory=list)  # wall clock of each process start
    checks: dict[str, str] = field(default_factory=dict)  # name -> "ok" or what went wrong
    calls: int = 0  # paid calls in usage.jsonl
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(v == "ok" for v in self.checks.values())


# ----------------------------------------------------------------------------- reading a run

def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def registry_entries(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "registry.json").read_text()).get("entries", [])
    except (OSError, ValueError):
        return []


def stage_reached(stage: str, run_dir: Path, threshold: int) -> bool:
    it0, it1 = run_dir / "iter-0", run_dir / "iter-1"
    if stage == "debate-test":
        return lines(it0 / "debate-test.jsonl") >= threshold
    if stage == "debate-train":
        return lines(it0 / "debate-train.jsonl") >= threshold
    if stage == "ftdata":
        return lines(it0 / "debate-train.jsonl") >= N_TRAIN
    if stage == "submit":
        return any((run_dir / "simulator" / "files").glob("*.json")) or any(e.get("job_id") for e in registry_entries(run_dir))
    if stage == "wait":  # every model registered (an agent with too little data keeps its model), a job running
        entries = registry_entries(run_dir)
        return len(entries) == 6 and any(e.get("job_id") and e["status"] not in ("succeeded", "failed", "cancelled")
                                         for e in entries)
    if stage == "debate-test-1":
        return lines(it1 / "debate-test.jsonl") >= threshold
    if stage == "summary":
        return lines(it1 / "debate-test.jsonl") >= N_TEST
    raise ValueError(stage)


def delay_after(stage: str, rng: random.Random) -> float:
    """How long after the stage is reached the kill comes."""
    return {"ftdata": rng.uniform(0, 0.05), "submit": rng.uniform(0, 0.03), "wait": rng.uniform(0, 0.8 * JOB_S),
            "summary": rng.uniform(0, 0.15)}.get(stage, 0.0)


# ----------------------------------------------------------------------------- running

def loop_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.loop", *args]


def session(cmd: list[str], cwd: Path, log: Path, kill_at: str | None, rng: random.Random, run_dir: Path,
            timeout_s: float = 300, starts: list[float] | None = None) -> str:
    """One process of the loop: 'killed', 'missed' (it finished before the kill came), 'done' or 'error'."""
    threshold = rng.randint(1, (N_TRAIN if kill_at == "debate-train" else N_TEST) - 1)
    if starts is not None:
        starts.append(time.time())
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_at is not None and stage_reached(kill_at, run_dir, threshold):
                time.sleep(delay_after(kill_at, rng))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return "killed"
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            return "error"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if kill_at is not None:
        return "missed"
    return "done" if proc.returncode == 0 else "error"


def run_trial(trial: Trial, work: Path, kills: int, rng: random.Random) -> Path:
    run_dir = work / f"trial-{trial.n}"
    args = [*BASE, *(STORM if trial.storm else [])]
    log = work / f"trial-{trial.n}.log"
    started = time.monotonic()
    plan = sorted(rng.sample(STAGES, min(kills, len(STAGES))), key=STAGES.index)
    cmd = loop_cmd("--run-dir", str(run_dir), *args)
    for stage in plan:
        trial.sessions += 1
        outcome = session(cmd, work, log, stage, rng, run_dir, starts=trial.session_starts)
        if outcome == "killed":
            trial.kills.append(stage)
        elif outcome == "missed":
            trial.missed.append(stage)
        cmd = loop_cmd("--resume", str(run_dir))
    for _ in range(6):  # finish it; a session stopped by an error (e.g. retries used up) is resumed
        trial.sessions += 1
        outcome = session(cmd, work, log, None, rng, run_dir, starts=trial.session_starts)
        if outcome == "done":
            break
        trial.errors += 1
    trial.wall_s = time.monotonic() - started
    return run_dir


# ----------------------------------------------------------------------------- checking

def debate_ids(run_dir: Path) -> dict[str, list[str]]:
    out = {}
    for path in sorted(run_dir.glob("iter-*/debate-*.jsonl")):
        rel = str(path.relative_to(run_dir))
        out[rel] = [json.loads(line)["problem"]["id"] for line in path.read_text().splitlines() if line.strip()]
    return out


def sim_jobs(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "simulator" / "jobs").glob("*.json"))]


def paid_calls(run_dir: Path) -> list[tuple[str, float, bool]]:
    """(identity, time, last line of usage.jsonl before a later line's session) of each paid call."""
    recs = [json.loads(line) for line in (run_dir / "usage.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for i, rec in enumerate(recs):
        if not rec.get("cached") and rec.get("sample"):
            s = rec["sample"]
            key = (f"{rec['model']}|{rec.get('purpose')}|it{s['iteration']}/{s['split']}/{s['problem_id']}/"
                   f"{s.get('role')}{s['agent']}/r{s['round']}/s{s.get('sample', 0)}")
            out.append((key, rec["ts"], i + 1 < len(recs) and recs[i + 1]["ts"]))
    return out


def paid_keys(run_dir: Path) -> list[str]:
    return [k for k, _, _ in paid_calls(run_dir)]


def paid_twice(run_dir: Path, session_starts: list[float]) -> list[str]:
    """Calls recorded as paid more than once, each with a diagnosis: when the first record is the
    last line a killed session wrote, the kill fell between the call's usage line and its cache
    entry (the window issue 10 point 6 closes), and the resumed session asked again."""
    calls = paid_calls(run_dir)
    first: dict[str, tuple[float, float | bool]] = {}
    out = []
    for key, ts, next_ts in calls:
        if key not in first:
            first[key] = (ts, next_ts)
            continue
        ts0, next0 = first[key]
        restart = next((s for s in session_starts if s > ts0), None)
        last_line = restart is not None and (next0 is False or next0 >= restart)
        out.append(f"{key} ({'the last line before a kill: usage written, cache entry not' if last_line else 'not at a kill'})")
    return out


def results(run_dir: Path) -> tuple[list, list, list]:
    summary = json.loads((run_dir / "summary.json").read_text())
    its = summary["iterations"]
    return ([it["splits"] for it in its], [it["generators"] for it in its], [it["critics"] for it in its])


def check(trial: Trial, run_dir: Path, ref: Path) -> None:
    c = trial.checks
    if not (run_dir / "summary.json").exists() or not json.loads((run_dir / "summary.json").read_text())["finished"]:
        c["finished"] = "the run did not finish"
        return
    c["finished"] = "ok"
    ids, ref_ids = debate_ids(run_dir), debate_ids(ref)
    bad = [f"{f}: {len(v)} records, {len(set(v))} problems (reference {len(ref_ids.get(f, []))})"
           for f, v in ids.items() if len(v) != len(set(v)) or set(v) != set(ref_ids.get(f, []))]
    bad += [f"{f} missing" for f in ref_ids if f not in ids]
    c["records"] = "; ".join(bad) or "ok"
    jobs, ref_jobs = sim_jobs(run_dir), sim_jobs(ref)
    per_model = Counter((j["metadata"]["iteration"], j["metadata"]["role"], j["metadata"]["agent"]) for j in jobs)
    twice = {k: n for k, n in per_model.items() if n > 1}
    c["jobs"] = "ok" if not twice and len(jobs) == len(ref_jobs) else \
        f"{len(jobs)} jobs (reference {len(ref_jobs)}); created twice: {twice}"
    trial.calls = len(paid_keys(run_dir))
    repeated = paid_twice(run_dir, trial.session_starts)
    c["paid"] = "ok" if not repeated else f"{len(repeated)} call(s) paid twice: {'; '.join(repeated)}"
    got, want = results(run_dir), results(ref)
    c["metrics"] = "ok" if got == want else "metrics or society differ from the reference"


# ----------------------------------------------------------------------------- report

def report(trials: list[Trial], ref_calls: int, ref_wall: float, args: argparse.Namespace) -> str:
    kills = Counter(s for t in trials for s in t.kills)
    missed = Counter(s for t in trials for s in t.missed)
    passed = sum(t.ok for t in trials)
    lines_ = [
        "# Chaos suite: SIGKILL and fault storms, then --resume",
        "",
        f"`python benchmarks/chaos.py --trials {args.trials} --kills {args.kills} --storm {args.storm} --seed {args.seed}` "
        f"({time.strftime('%Y-%m-%d')}). Simulated models (a test double): this measures the harness's "
        f"crash safety, not model quality.",
        "",
        f"Each trial: {N_TEST} test / {N_TRAIN} train problems, 3 agents, 2 rounds, 1 finetuning iteration "
        f"(6 simulated jobs of {JOB_S:.0f}s), malformed answers 5%; fault storms ({args.storm}): 5% HTTP 500, "
        f"1% hangs past the 2s client timeout, 429s under a 6000 RPM limit. Reference: one uninterrupted "
        f"run, {ref_calls} paid calls, {ref_wall:.0f}s.",
        "",
        f"**{passed} of {len(trials)} trials passed every check**; {sum(kills.values())} SIGKILLs landed, "
        f"{sum(missed.values())} came after their stage had passed (the session then finished normally).",
        "",
        "| stage | kills landed | missed |",
        "|---|---:|---:|",
        *[f"| {s} | {kills[s]} | {missed[s]} |" for s in STAGES],
        "",
        "| trial | storm | kills (stage) | sessions | stopped by error | paid calls | records | jobs | paid twice | metrics | wall |",
        "|---:|:---:|---|---:|---:|---:|:---:|:---:|:---:|:---:|---:|",
    ]
    for t in trials:
        mark = lambda k: "ok" if t.checks.get(k) == "ok" else "**FAIL**"  # noqa: E731
        lines_.append(f"| {t.n} | {'yes' if t.storm else ''} | {', '.join(t.kills) or '-'} | {t.sessions} | {t.errors} | "
                      f"{t.calls} | {mark('records')} | {mark('jobs')} | {mark('paid')} | {mark('metrics')} | "
                      f"{t.wall_s:.0f}s |")
    failures = [(t.n, k, v) for t in trials for k, v in t.checks.items() if v != "ok"]
    if failures:
        lines_ += ["", "## Failures", "", *[f"- trial {n}, {k}: {v}" for n, k, v in failures]]
    lines_ += ["", "`paid calls`: paid (not cached) calls in usage.jsonl; a call a kill caught in flight is "
               "not in it (it is asked again after the resume). `paid twice`: a call recorded as paid twice, which "
               "must never happen. `stopped by error`: sessions that ended with an error (e.g. retries used up "
               "in a storm) and were resumed like a killed one.", ""]
    return "\n".join(lines_)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial (at most one per stage)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--storm", choices=("alternate", "always", "never"), default="alternate",
                   help="which trials are fault storms (default: every other one)")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    p.add_argument("--workdir", type=Path, help="keep the run directories here (default: a temporary folder)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env_root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (env_root, os.environ.get("PYTHONPATH")) if x)
    ref = work / "reference"
    started = time.monotonic()
    if session(loop_cmd("--run-dir", str(ref), *BASE), work, work / "reference.log", None, rng, ref) != "done":
        print(f"the reference run failed; see {work / 'reference.log'}", file=sys.stderr)
        return 2
    ref_wall = time.monotonic() - started
    ref_calls = len(paid_keys(ref))
    trials = []
    for n in range(1, args.trials + 1):
        trial = Trial(n=n, storm=args.storm == "always" or (args.storm == "alternate" and n % 2 == 0))
        run_dir = run_trial(trial, work, args.kills, rng)
        check(trial, run_dir, ref)
        trials.append(trial)
        print(f"trial {n}: {'storm, ' if trial.storm else ''}kills {trial.kills or '-'}, missed {trial.missed or '-'}, "
              f"{'ok' if trial.ok else trial.checks} ({trial.wall_s:.0f}s)", flush=True)
        if args.workdir is None and trial.ok:
            shutil.rmtree(run_dir, ignore_errors=True)
    text = report(trials, ref_calls, ref_wall, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    if all(t.ok for t in trials):
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    print(f"run directories and logs of the failed trials: {work}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
