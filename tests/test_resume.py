"""Resume and operator mistakes (issue 10, points 2-5): what a user notices when a file is lost,
damaged or edited by hand, or a first attempt fails before any work. The loop runs as a user runs
it (subprocess, the simulator on 127.0.0.1); jobs are counted on the simulator's side, whose
state lives in RUN_DIR/simulator/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.fileio import read_jsonl
from harness.records import DebateRecord, RunSummary, UsageRecord

SMALL = ["--set", "task.n_test=4", "--set", "finetune.iterations=0"]
TRAIN = ["--set", "task.n_test=4", "--set", "task.n_train=24", "--set", "finetune.iterations=1",
         "--set", "endpoint.simulator.job_seconds=0.3", "--set", "finetune.poll_interval_s=0.1"]


def jobs_on_simulator(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "simulator" / "jobs").glob("*.json"))]


def summary(run_dir: Path) -> RunSummary:
    return RunSummary.model_validate_json((run_dir / "summary.json").read_text())


def out(result) -> str:
    return (result.stdout + result.stderr).replace("\n", " ")


def gsm8k_file(path: Path, n: int) -> Path:
    rows = [{"question": f"Sam has {i} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- point 2: run identity

@pytest.mark.slow
def test_a_lost_or_damaged_registry_and_run_id_never_submit_a_job_twice(cli, tmp_path):
    run_dir = tmp_path / "r"
    assert cli("--run-dir", "r", *TRAIN).returncode == 0
    jobs = jobs_on_simulator(run_dir)
    assert jobs, "the run trained"
    finished = summary(run_dir)
    assert finished.finished

    # Every place that holds the run id locally is gone: registry.json, run.json, config.yaml's first line.
    (run_dir / "registry.json").unlink()
    (run_dir / "run.json").unlink()
    config = run_dir / "config.yaml"
    config.write_text("".join(config.read_text().splitlines(keepends=True)[1:]))
    result = cli("--resume", "r")
    assert result.returncode == 0, out(result)
    assert "registry.json was missing; it was rebuilt" in out(result)
    assert jobs_on_simulator(run_dir) == jobs, "no job was created twice"
    again = summary(run_dir)
    assert again.finished and [it.splits for it in again.iterations] == [it.splits for it in finished.iterations]
    assert json.loads((run_dir / "run.json").read_text())["run"] == jobs[0]["metadata"]["harness_run"]

    # A damaged registry is set aside and rebuilt the same way.
    (run_dir / "registry.json").write_text('{"run": "r", "entr')
    result = cli("--resume", "r")
    assert result.returncode == 0, out(result)
    assert list(run_dir.glob("registry.json.damaged-*")), "the damaged file is kept for inspection"
    assert jobs_on_simulator(run_dir) == jobs
    registry = json.loads((run_dir / "registry.json").read_text())
    assert {e["job_id"] for e in registry["entries"] if e["job_id"]} == {j["id"] for j in jobs}


def test_conflicting_run_ids_stop_before_anything_is_created(cli, tmp_path):
    run_dir = tmp_path / "r"
    assert cli("--run-dir", "r", *SMALL).returncode == 0
    registry = json.loads((run_dir / "registry.json").read_text())
    registry["run"] = "someone-else-1234"
    (run_dir / "registry.json").write_text(json.dumps(registry))
    result = cli("--resume", "r", "--set", "finetune.iterations=1")
    assert result.returncode == 1
    assert "the run's id is not the same everywhere" in out(result) and "someone-else-1234" in out(result)
    assert not (run_dir / "simulator" / "jobs").exists(), "no job was created"


async def test_local_jobs_give_back_a_lost_run_id_and_registry(tmp_path):
    """The local provider's jobs carry the same metadata in local-jobs/<job>/spec.json."""
    import hashlib

    from harness.config import LocalFinetuneConfig, load_config
    from harness.identity import establish
    from harness.providers.base import FinetuneRequest
    from harness.providers.local import LocalProvider

    run_dir = tmp_path / "r"
    data = run_dir / "iter-0" / "ftdata" / "generator-0.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "\\boxed{2}"}]}) + "\n")
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    # A stand-in trainer that stays alive (the job reads as running) and ignores its arguments.
    trainer = tmp_path / "trainer"
    trainer.write_text("#!/bin/sh\nsleep 30\n")
    trainer.chmod(0o755)
    cfg = load_config(None, ["finetune.provider=local", "finetune.iterations=1", "serve.model=/models/base"])
    provider = LocalProvider(run_dir, LocalFinetuneConfig(python=str(trainer)), base_model_path="/models/base",
                             base_names={"sim-base"})
    metadata = {"harness_run": "demo-0badc0de", "iteration": "1", "role": "generator", "agent": "0",
                "data_sha256": sha[:16]}
    try:
        first = await provider.submit(FinetuneRequest(training_file=data, base_model="sim-base", metadata=metadata))
        # No run.json, no registry.json, no config.yaml: only the job and the data file remain.
        identity, registry, notes = await establish(cfg, run_dir, provider)
        assert identity.run == "demo-0badc0de"
        entry = registry.get(1, "generator", 0)
        assert entry is not None and entry.job_id == first.job_id and entry.data_sha256 == sha
        again = await provider.submit(FinetuneRequest(training_file=data, base_model="sim-base", metadata=metadata))
        assert again.job_id == first.job_id
        assert len(list((run_dir / "local-jobs").glob("*/spec.json"))) == 1, "no second job"
    finally:
        await provider.cancel(first.job_id)


@pytest.mark.slow
def test_a_resumed_session_that_stops_keeps_the_finished_summary(cli, tmp_path):
    run_dir = tmp_path / "r"
    assert cli("--run-dir", "r", *TRAIN).returncode == 0
    finished = (run_dir / "summary.json").read_text()
    spent = summary(run_dir).usage["cost_usd"]
    # Extend the run with a budget that stops it during the new train debate.
    result = cli("--resume", "r", "--set", "finetune.iterations=2", "--set", f"budget.max_cost_usd={spent + 0.0005}")
    assert result.returncode == 3, out(result)
    assert (run_dir / "summary.json").read_text() == finished


# ----------------------------------------------------------------------------- point 3: frozen settings

def test_a_hand_edit_of_config_yaml_is_refused_naming_field_and_values(cli, tmp_path):
    run_dir = tmp_path / "r"
    assert cli("--run-dir", "r", *SMALL).returncode == 0
    calls = len(read_jsonl(run_dir / "usage.jsonl"))
    config = run_dir / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("temperature: 1.0", "temperature: 0.7").replace("n_test: 4", "n_test: 9"))
    result = cli("--resume", "r")
    assert result.returncode == 2
    text = out(result)
    assert "sampling.temperature: 1.0 when the run started, 0.7 now (config.yaml was edited)" in text
    assert "task.n_test: 4 when the run started, 9 now" in text
    assert len(read_jsonl(run_dir / "usage.jsonl")) == calls, "nothing was paid into the half-done split"
    # A --set that restores the saved value is accepted; so is undoing the edit.
    assert cli("--resume", "r", "--set", "sampling.temperature=1.0", "--set", "task.n_test=4").returncode == 0
    config.write_text(original)
    assert cli("--resume", "r").returncode == 0


# ----------------------------------------------------------------------------- point 4: nothing finished yet

def test_an_error_before_any_work_accepts_the_fix(cli, tmp_path):
    good = gsm8k_file(tmp_path / "gsm8k.jsonl", 12)
    missing = tmp_path / "nowhere" / "gsm8k.jsonl"
    result = cli("--run-dir", "r", "--set", "task.name=gsm8k", "--set", f"task.source={missing}",
                 "--set", "task.n_train=8", *SMALL)
    assert result.returncode == 1
    assert f"python -m harness.loop --resume r --set task.source=<fixed value>" in out(result)
    result = cli("--resume", "r", "--set", f"task.source={good}")
    assert result.returncode == 0, out(result)
    assert len(read_jsonl(tmp_path / "r" / "iter-0" / "debate-test.jsonl", DebateRecord)) == 4

    # A bad prompts folder or model name: the message says what to type, and the folder is reusable.
    result = cli("--run-dir", "p", "--set", "task.prompts_dir=/no/such/prompts", *SMALL)
    assert result.returncode == 2
    assert "python -m harness.loop --resume p --set task.prompts_dir=<fixed value>" in out(result)
    assert cli("--run-dir", "p", *SMALL).returncode == 0, "the folder of a run that finished nothing is reused"
    result = cli("--run-dir", "m", "--set", "models.base=no-such-model", *SMALL)
    assert result.returncode == 1
    assert "python -m harness.loop --resume m --set models.base=<fixed value>" in out(result)
    assert cli("--resume", "m", "--set", "models.base=sim-base").returncode == 0


# ----------------------------------------------------------------------------- point 5: clear errors

def test_a_non_utf8_or_empty_data_file_is_named_and_refused(cli, tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"question": "Caf\xe9 sells 3 cakes", "answer": "#### 3"}\n')
    result = cli("--set", "task.name=gsm8k", "--set", f"task.source={latin}", *SMALL)
    assert result.returncode == 1
    assert f"{latin} line 1: not UTF-8 text" in out(result)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli("--set", "task.name=gsm8k", "--set", f"task.source={empty}", *SMALL)
    assert result.returncode == 1
    assert "no test problems to evaluate (task.n_test = 4)" in out(result) and str(empty) in out(result)

    result = cli("--set", "task.n_test=0", "--set", "finetune.iterations=0")
    assert result.returncode == 2 and "task.n_test is 0: there is nothing to evaluate" in out(result)


def test_an_empty_config_file_is_an_error_not_the_defaults(cli, tmp_path):
    (tmp_path / "mine.yaml").write_text("# nothing here yet\n")
    result = cli("--config", "mine.yaml")
    assert result.returncode == 2
    assert "mine.yaml: the file is empty" in out(result)
    assert not (tmp_path / "runs").exists()

    # A run's own config.yaml emptied (a save cut short): refused, and restored from run.json.
    assert cli("--run-dir", "r", *SMALL).returncode == 0
    (tmp_path / "r" / "config.yaml").write_text("")
    result = cli("--resume", "r")
    assert result.returncode == 2 and "python -m harness.repair r" in out(result)
    result = cli("r", module="harness.repair")
    assert result.returncode == 0 and "config.yaml was empty: restored from run.json" in out(result)
    assert cli("--resume", "r").returncode == 0


def test_a_corrupt_line_is_named_and_repair_keeps_every_whole_record(cli, tmp_path):
    run_dir = tmp_path / "r"
    assert cli("--run-dir", "r", "--set", "task.n_test=6", "--set", "finetune.iterations=0").returncode == 0
    debates = run_dir / "iter-0" / "debate-test.jsonl"
    lines = debates.read_bytes().splitlines(keepends=True)
    # Line 2 damaged by a disk error, line 4 glued to a torn record: 5 whole records remain.
    lines[1] = b"\x00\x00\xff garbage\n"
    lines[3] = b'{"schema_version": 1, "iterat' + lines[3]
    debates.write_bytes(b"".join(lines))
    usage = run_dir / "usage.jsonl"
    usage_lines = usage.read_bytes().splitlines(keepends=True)
    usage_lines[0] = b"not json at all\n"
    usage.write_bytes(b"".join(usage_lines))

    result = cli("--resume", "r")
    assert result.returncode == 1
    text = out(result)
    assert "usage.jsonl:1: not valid JSON" in text or "debate-test.jsonl:2: not UTF-8 text" in text
    assert "python -m harness.repair r" in text

    result = cli("r", module="harness.repair")
    assert result.returncode == 0, out(result)
    assert "iter-0/debate-test.jsonl: kept 5 whole records" in out(result)
    assert "recovered 1 record(s) from inside them" in out(result)
    assert len(read_jsonl(usage, UsageRecord)) == len(usage_lines) - 1
    assert list(run_dir.glob("repair-*/iter-0/debate-test.jsonl")), "the damaged original is kept"

    result = cli("--resume", "r")
    assert result.returncode == 0, out(result)
    ids = [r.problem.id for r in read_jsonl(debates, DebateRecord)]
    assert len(ids) == len(set(ids)) == 6, "the one lost problem was debated again, none twice"


def test_a_damaged_diversity_json_does_not_break_the_report_and_is_rebuilt(cli, tmp_path):
    from harness.analysis import load_run
    from harness.diversity import DiversityMetrics

    run_dir = tmp_path / "r"
    assert cli("--run-dir", "r", *SMALL).returncode == 0
    path = run_dir / "iter-0" / "diversity.json"
    path.write_text('{"iteration": 0, "spl')
    assert load_run(run_dir).diversity == [], "the damaged file is left out, not a crash"
    assert cli("--resume", "r").returncode == 0
    DiversityMetrics.model_validate_json(path.read_text())


def test_leftover_temporary_files_are_removed_on_resume(cli, tmp_path):
    run_dir = tmp_path / "r"
    assert cli("--run-dir", "r", *SMALL).returncode == 0
    leftovers = [run_dir / ".summary.json.k3j_9x2a.tmp", run_dir / "iter-0" / ".metrics.json.ab12cd34.tmp"]
    for p in leftovers:
        p.write_text("{")
    assert cli("--resume", "r").returncode == 0
    assert not any(p.exists() for p in leftovers)


# ----------------------------------------------------------------------------- point 7: the fine-tuning API

def test_hyperparameters_and_seed_outside_the_api_ranges_fail_before_any_call(cli, tmp_path):
    for setting, shown in (("finetune.hyperparameters.n_epochs=60", "n_epochs = 60"),
                           ("finetune.hyperparameters.batch_size=300", "batch_size = 300"),
                           ("seed=-5", "seed = -5")):
        result = cli("--run-dir", "r", "--set", "finetune.iterations=1", "--set", setting)
        assert result.returncode == 2, out(result)
        assert shown in out(result) and "OpenAI's fine-tuning API accepts" in out(result)
    assert not (tmp_path / "r").exists(), "refused before the run started"


@pytest.mark.slow
def test_a_paused_job_is_reported_and_never_resubmitted(cli, tmp_path):
    run_dir = tmp_path / "r"
    paused = [*TRAIN, "--set", "endpoint.simulator.job_pause_rate=1", "--set", "finetune.paused_timeout_s=0.5"]
    result = cli("--run-dir", "r", *paused)
    assert result.returncode == 0, out(result)
    warnings = summary(run_dir).warnings
    assert warnings and all("paused" in w and "finetune.paused_timeout_s" in w for w in warnings)
    jobs = jobs_on_simulator(run_dir)
    assert len(jobs) == len(warnings)
    assert cli("--resume", "r").returncode == 0
    assert jobs_on_simulator(run_dir) == jobs
