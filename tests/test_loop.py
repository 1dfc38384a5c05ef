"""`python -m harness.loop` end to end, as a user runs it (subprocess, real simulator on 127.0.0.1)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.fileio import read_jsonl
from harness.records import DebateRecord, RunSummary, UsageRecord


def _only_run_dir(tmp_path: Path) -> Path:
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_default_command_runs_the_demo_end_to_end(cli, tmp_path):
    # How long it takes is measured in benchmarks/demo_time.py, not here (a loaded machine).
    result = cli()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SIMULATED" in out and "accuracy" in out
    run_dir = _only_run_dir(tmp_path)
    assert str(run_dir.name) in out
    for name in ("config.yaml", "usage.jsonl", "cache.sqlite", "summary.json", "iter-0/debate-test.jsonl",
                 "iter-0/metrics.json"):
        assert (run_dir / name).is_file(), name
    summary = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert summary.finished and summary.simulated
    test0 = summary.iterations[0].splits["test"]
    assert test0.n == 100 and 0.0 < test0.accuracy <= 1.0


def test_bad_config_fails_before_any_call_naming_the_field(cli, tmp_path):
    result = cli("--set", "debate.rounds=0")
    assert result.returncode == 2
    assert "field 'debate.rounds'" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_missing_data_file_names_the_file(cli, tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    result = cli("--set", "task.name=gsm8k", "--set", f"task.source={missing}", "--set", f"task.test_source={missing}")
    assert result.returncode != 0
    assert str(missing) in result.stdout.replace("\n", "")


def test_an_existing_run_is_not_overwritten(cli, tmp_path):
    assert cli("--run-dir", "r", "--set", "task.n_test=5").returncode == 0
    result = cli("--run-dir", "r")
    assert result.returncode == 2 and "--resume" in result.stdout


@pytest.mark.slow
def test_a_run_killed_mid_debate_resumes_without_repeating_finished_problems(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "harness.loop", "--run-dir", str(run_dir), "--set", "task.n_test=60",
            "--set", "finetune.iterations=0",
            "--set", "endpoint.simulator.latency_ms=40", "--set", "endpoint.concurrency=6"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records_path = run_dir / "iter-0" / "debate-test.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if records_path.exists() and len(records_path.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r.problem.id for r in read_jsonl(records_path, DebateRecord)}
    assert 10 <= len(finished) < 60
    calls_before = len(read_jsonl(run_dir / "usage.jsonl"))

    result = subprocess.run([sys.executable, "-m", "harness.loop", "--resume", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_jsonl(records_path, DebateRecord)
    ids = [r.problem.id for r in records]
    assert len(ids) == len(set(ids)) == 60
    resumed = read_jsonl(run_dir / "usage.jsonl", UsageRecord)[calls_before:]
    assert resumed, "the resumed session made the remaining calls"
    debate_calls = [u for u in resumed if u.sample is not None]  # embeddings for diversity carry none
    assert not any(u.sample.problem_id in finished for u in debate_calls), "finished problems were debated again"


@pytest.mark.slow
def test_sigterm_mid_debate_stops_the_run_like_ctrl_c(tmp_path):
    """`kill PID` cancels the run (its servers stopped, its directory unlocked): exit 130 and the
    resume command, whatever Python was running when the signal came (a KeyboardInterrupt raised
    inside a destructor used to be swallowed, and the run went on)."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "harness.loop", "--run-dir", str(run_dir), "--set", "task.n_test=60",
            "--set", "finetune.iterations=0", "--set", "endpoint.simulator.latency_ms=100",
            "--set", "endpoint.concurrency=2"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    records_path = run_dir / "iter-0" / "debate-test.jsonl"
    while proc.poll() is None and not (records_path.exists() and records_path.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate()
    assert proc.returncode == 130, out
    assert "interrupted" in out and "--resume" in out
    assert len(read_jsonl(records_path, DebateRecord)) < 60


@pytest.mark.slow
def test_a_run_killed_while_jobs_run_resumes_without_a_second_job(tmp_path):
    import asyncio

    from openai import AsyncOpenAI

    from harness.config import SimulatorConfig
    from harness.registry import Registry
    from harness.sim import SimServer

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "harness.loop", "--run-dir", str(run_dir), "--set", "task.n_test=10",
            "--set", "task.n_train=40", "--set", "finetune.iterations=1",
            "--set", "endpoint.simulator.job_seconds=6"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    running = []
    while time.monotonic() < deadline and len(running) < 6:
        try:
            reg = Registry.load(run_dir / "registry.json")
            running = [e for e in reg.entries if e.job_id and e.status in ("queued", "running", "validating_files")]
        except Exception:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(running) == 6, "all six jobs were running when the run was killed"

    result = subprocess.run([sys.executable, "-m", "harness.loop", "--resume", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    reg = Registry.load(run_dir / "registry.json")
    assert {e.job_id for e in reg.entries} == {e.job_id for e in running}
    assert all(e.status == "succeeded" for e in reg.entries)

    async def jobs_on_server():
        with SimServer(SimulatorConfig(), state_dir=run_dir / "simulator") as sim:
            client = AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
            page = await client.fine_tuning.jobs.list(limit=100)
            await client.close()
            return page.data
    jobs = asyncio.run(jobs_on_server())
    assert len(jobs) == 6, "no job was created twice"


def test_dry_run_prints_the_plan_and_calls_nothing(cli, tmp_path):
    result = cli("--dry-run", "--set", "endpoint.kind=openai", "--set", "models.base=gpt-4.1-mini",
                 "--set", "endpoint.base_url=http://127.0.0.1:9/v1", "--set", "finetune.iterations=1",
                 "--run-dir", "planned", env={"OPENAI_API_KEY": "not-a-real-key"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "iter 0: debate test" in out and "iter 0: debate train" in out and "finetune 6 models" in out
    assert "iter 1: debate test" in out and "nothing was called" in out
    assert not (tmp_path / "planned").exists()


@pytest.mark.slow
def test_the_same_config_and_seed_reproduce_the_same_results(cli, tmp_path):
    small = ["--set", "task.n_test=20", "--set", "task.n_train=40", "--set", "finetune.iterations=1"]
    for name in ("a", "b"):
        assert cli("--run-dir", name, *small).returncode == 0
    a, b = (RunSummary.model_validate_json((tmp_path / n / "summary.json").read_text()) for n in "ab")
    assert [it.splits for it in a.iterations] == [it.splits for it in b.iterations]
    assert [it.generators for it in a.iterations] == [it.generators for it in b.iterations]


@pytest.mark.slow
def test_the_budget_cap_stops_the_run_cleanly_and_a_higher_cap_resumes_it(cli, tmp_path):
    # The cap reserves each call's worst case (max_tokens of output) while it is in flight.
    small = ["--set", "task.n_test=30", "--set", "finetune.iterations=0", "--set", "endpoint.concurrency=6",
             "--set", "sampling.max_tokens=100"]
    result = cli("--run-dir", "r", *small, "--set", "budget.max_cost_usd=0.003")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "budget cap reached" in result.stdout and "--resume" in result.stdout
    run_dir = tmp_path / "r"
    usage = read_jsonl(run_dir / "usage.jsonl", UsageRecord)
    assert 0 < sum(u.cost_usd or 0 for u in usage) <= 0.003
    finished = read_jsonl(run_dir / "iter-0" / "debate-test.jsonl", DebateRecord)
    assert 0 < len(finished) < 30, "problems finished before the cap are saved"

    result = cli("--resume", "r", "--set", "budget.max_cost_usd=1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(read_jsonl(run_dir / "iter-0" / "debate-test.jsonl", DebateRecord)) == 30


@pytest.mark.slow
def test_an_agent_with_too_little_data_keeps_its_model_and_the_run_says_so(cli, tmp_path):
    from harness.registry import Registry

    result = cli("--run-dir", "r", "--set", "task.n_test=10", "--set", "task.n_train=12",
                 "--set", "finetune.iterations=1", "--set", "finetune.min_examples=11")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept previous model" in result.stdout
    reg = Registry.load(tmp_path / "r" / "registry.json")
    kept = [e for e in reg.entries if e.status == "kept"]
    assert kept and all(e.model_id == "sim-base" and "< 11" in e.note for e in kept)
    summary = RunSummary.model_validate_json((tmp_path / "r" / "summary.json").read_text())
    it1 = summary.iterations[1]
    for e in kept:
        models = it1.generators if e.role == "generator" else it1.critics
        assert models[e.agent] == "sim-base"


def test_resume_refuses_changes_that_would_contradict_finished_work(cli, tmp_path):
    assert cli("--run-dir", "r", "--set", "task.n_test=5", "--set", "finetune.iterations=0").returncode == 0
    result = cli("--resume", "r", "--set", "debate.agents=5", "--set", "budget.max_cost_usd=3")
    assert result.returncode == 2
    assert "debate.agents cannot change" in result.stdout.replace("\n", " ")
    assert "budget.max_cost_usd cannot" not in result.stdout
    # Restating a saved value is not a change (a comparison resumes its methods this way).
    assert cli("--resume", "r", "--set", "debate.agents=3", "--set", "task.n_test=5").returncode == 0
    # How many jobs train at once, and with how many threads, changes nothing they learn.
    assert cli("--resume", "r", "--set", "finetune.local.max_parallel_jobs=4",
               "--set", "finetune.local.threads=1").returncode == 0


@pytest.mark.slow
def test_failed_jobs_are_reported_and_not_retried_after_the_next_iteration_debated(cli, tmp_path):
    from harness.registry import Registry

    small = ["--set", "task.n_test=10", "--set", "task.n_train=30", "--set", "finetune.iterations=1",
             "--set", "endpoint.simulator.job_failure_rate=1.0"]
    result = cli("--run-dir", "r", *small)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.replace("\n", " ")
    assert "warning:" in out and "that agent kept sim-base" in out
    summary = RunSummary.model_validate_json((tmp_path / "r" / "summary.json").read_text())
    assert len(summary.warnings) == 6
    assert summary.iterations[1].generators == ["sim-base"] * 3  # debated with the fallback models
    jobs_before = {e.job_id for e in Registry.load(tmp_path / "r" / "registry.json").entries}

    # Resuming the finished run does not retry them: iteration 1 already debated without them.
    assert cli("--resume", "r").returncode == 0
    assert {e.job_id for e in Registry.load(tmp_path / "r" / "registry.json").entries} == jobs_before
