"""Experiment tracking (`tracking.backend`), as a user sees it in the tracker: the demo on the
simulator with each offline backend, then the tracked run read back through the tracker's own
API: metrics per iteration, the config, the finetuning jobs' loss curves, the report; a resumed
run continues the same tracked run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import load_config
from harness.errors import ConfigError
from harness.records import RunSummary
from harness.registry import Registry
from harness.tracking.base import STATE_FILE, TrackingState

SMALL = ["--set", "task.n_test=10", "--set", "task.n_train=20", "--set", "finetune.iterations=1"]


def _summary(run_dir: Path) -> RunSummary:
    return RunSummary.model_validate_json((run_dir / "summary.json").read_text())


def _trained_jobs(run_dir: Path) -> dict[str, str]:
    """{job id: curve prefix} of the jobs that trained (a 'kept' model has no job)."""
    reg = Registry.load(run_dir / "registry.json")
    return {e.job_id: f"finetune/iter-{e.iteration}/{e.role}-{e.agent}"
            for e in reg.entries if e.job_id and e.status == "succeeded"}


def _state(run_dir: Path) -> TrackingState:
    return TrackingState.model_validate_json((run_dir / STATE_FILE).read_text())


# ----------------------------------------------------------------------------- config

def test_the_backend_is_set_by_config_or_set_and_a_bad_value_names_the_field():
    assert load_config("demo").tracking.backend == "none"
    assert load_config("demo", ["tracking.backend=mlflow"]).tracking.backend == "mlflow"
    with pytest.raises(ConfigError, match="tracking.backend"):
        load_config("demo", ["tracking.backend=tensorboard"])
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        load_config("demo", ["tracking.tracking_uri=https://me:secret@mlflow.example.com"])


def test_environment_variables_name_the_project_unless_the_config_does(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp-env")
    assert load_config("demo", ["tracking.backend=wandb"]).tracking.resolved_project() == "from-env"
    assert load_config("demo", ["tracking.backend=mlflow"]).tracking.resolved_project() == "exp-env"
    cfg = load_config("demo", ["tracking.backend=mlflow", "tracking.project=mine"])
    assert cfg.tracking.resolved_project() == "mine"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert load_config("demo", ["tracking.backend=wandb"]).tracking.resolved_mode() == "offline"


def test_a_hosted_jobs_loss_is_read_from_its_metrics_event_or_its_message():
    from types import SimpleNamespace

    from harness.providers.openai_ft import loss_point

    openai_event = SimpleNamespace(type="metrics", message="Step 12/100: training loss=0.41",
                                   data={"step": 12, "train_loss": 0.41, "total_steps": 100})
    assert (loss_point(openai_event).step, loss_point(openai_event).loss) == (12, 0.41)
    message_only = SimpleNamespace(type="message", message="step 7: training loss=1.5e-1", data=None)
    assert (loss_point(message_only).step, loss_point(message_only).loss) == (7, 0.15)
    assert loss_point(SimpleNamespace(message="Fine-tuning job started", data={})) is None


# ----------------------------------------------------------------------------- MLflow

def _mlflow(tmp_path: Path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def _mlflow_env(uri: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "tests"}


@pytest.mark.slow
def test_a_run_killed_between_iterations_resumes_into_one_mlflow_run_that_holds_everything(tmp_path):
    uri, client = _mlflow(tmp_path)
    run_dir = tmp_path / "r"
    env = {**os.environ, **_mlflow_env(uri), "COLUMNS": "200"}
    # A slow second iteration (few calls at once, each 20 ms) leaves time to kill it mid-way.
    args = [sys.executable, "-m", "harness.loop", "--run-dir", str(run_dir), *SMALL, "--set", "task.n_test=20",
            "--set", "tracking.backend=mlflow"]
    proc = subprocess.Popen([*args, "--set", "endpoint.simulator.latency_ms=20", "--set", "endpoint.concurrency=3"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _state(run_dir).runs["mlflow"].iterations == [0]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run was still going after its first iteration was tracked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    result = subprocess.run([sys.executable, "-m", "harness.loop", "--resume", str(run_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tracked with mlflow" in result.stdout

    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, "the resumed session continued the tracked run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.info.run_id == _state(run_dir).runs["mlflow"].run_id
    summary = _summary(run_dir)
    history = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(it.iteration, it.splits["test"].accuracy)
                                                          for it in summary.iterations], "each iteration once"
    for name in ("test/stderr", "test/accuracy_round_1", "diversity/consensus", "seconds/debate_test",
                 "usage/prompt_tokens", "usage/cost_usd"):
        assert name in run.data.metrics, name
    assert run.data.metrics["usage/calls"] == summary.usage["calls"]
    assert run.data.params["debate.agents"] == "3" and run.data.params["task.n_test"] == "20"

    jobs = _trained_jobs(run_dir)
    assert jobs
    for prefix in jobs.values():
        curve = sorted(client.get_metric_history(run.info.run_id, f"{prefix}/loss"), key=lambda m: m.step)
        assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and len(curve) > 3, prefix
        assert curve[0].value > curve[-1].value, "the simulated loss falls"

    artifacts = {a.path for d in ("run", "report", "tables") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"run/config.yaml", "run/summary.json", "report/report.md", "report/accuracy.png",
            "tables/metrics_table.json"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "tables/metrics_table.json",
                                                      str(tmp_path))).read_text())
    # iteration 0 also debated the train split (its data trained iteration 1); the last did not
    assert sorted(row[1:3] for row in table["data"]) == [[0, "test"], [0, "train"], [1, "test"]]


def test_an_unreachable_tracker_is_a_warning_and_the_run_finishes(cli, tmp_path):
    pytest.importorskip("mlflow")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    result = cli("--run-dir", "r", "--set", "task.n_test=5", "--set", "finetune.iterations=0",
                 "--set", "tracking.backend=mlflow", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "tracking: the mlflow tracker failed" in out and "the run goes on without it" in out
    assert _summary(tmp_path / "r").finished


def test_a_backend_that_is_not_installed_stops_before_the_run_naming_the_extra(cli, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    # Makes `import trackio` fail in the child process, as on a machine without the extra.
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'trackio' or name.startswith('trackio.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'trackio'\")\n"
        "sys.meta_path.insert(0, _Hide())\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    result = cli("--run-dir", "r", "--set", "task.n_test=5", "--set", "tracking.backend=trackio", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "pip install trackio" in out and "'trackio' extra" in out and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "r" / "usage.jsonl").exists(), "nothing was called"


# ----------------------------------------------------------------------------- trackio

def _trackio_logs(trackio_dir: Path, project: str, run: str) -> list[dict]:
    """What `trackio show` plots, read in a fresh process (trackio fixes its folder at import)."""
    code = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
            "import trackio\n"
            "runs = [r['name'] for r in SQLiteStorage.get_run_records(sys.argv[1])]\n"
            "logs = SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])\n"
            "config = [r.config for r in trackio.Api().runs(sys.argv[1])]\n"
            "print(json.dumps({'runs': runs, 'logs': logs, 'config': config}, default=str))\n")
    out = subprocess.run([sys.executable, "-c", code, project, run], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRACKIO_DIR": str(trackio_dir)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _series(logs: list[dict], key: str) -> list[tuple[int, float]]:
    return sorted((row["step"], row[key]) for row in logs if key in row)


@pytest.mark.slow
def test_trackio_holds_metrics_config_and_loss_curves_and_a_resumed_run_continues_it(cli, tmp_path):
    pytest.importorskip("trackio")
    env = {"TRACKIO_DIR": str(tmp_path / "trackio")}
    result = cli("--run-dir", "r", *SMALL, "--set", "tracking.backend=trackio", "--set", "tracking.project=tests",
                 env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "r"
    # One more iteration of the finished run (finetune.iterations may change on resume).
    result = cli("--resume", "r", "--set", "finetune.iterations=2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    data = _trackio_logs(tmp_path / "trackio", "tests", "r")
    assert data["runs"] == ["r"], "one tracked run for both sessions"
    logs = data["logs"]
    summary = _summary(run_dir)
    assert _series(logs, "test/accuracy") == [(it.iteration, it.splits["test"].accuracy) for it in summary.iterations]
    assert [s for s, _ in _series(logs, "usage/calls")] == [0, 1, 2]
    assert _series(logs, "diversity/pairwise_agreement")
    jobs = _trained_jobs(run_dir)
    assert {p.split("/")[1] for p in jobs.values()} == {"iter-1", "iter-2"}
    for prefix in jobs.values():
        curve = _series(logs, f"{prefix}/loss")
        assert len(curve) > 3 and curve[0][1] > curve[-1][1], prefix
    assert data["config"][0]["debate.agents"] == 3
    assert any(Path(tmp_path / "trackio" / "artifacts").rglob("*")), "report and summary stored as artifacts"
    assert sorted(_state(run_dir).runs["trackio"].iterations) == [0, 1, 2]


# ----------------------------------------------------------------------------- W&B (offline)

@pytest.mark.slow
def test_wandb_offline_resumes_the_same_run_id(cli, tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true"}
    result = cli("--run-dir", "r", *SMALL, "--set", "finetune.iterations=0", "--set", "tracking.backend=wandb",
                 "--set", "tracking.artifacts=false", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    result = cli("--resume", "r", "--set", "finetune.iterations=1", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = _state(tmp_path / "r").runs["wandb"].run_id
    sessions = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    # Offline, each session is a folder; `wandb sync` uploads both into the one run id.
    assert len(sessions) == 2 and all(s.name.endswith(f"-{run_id}") for s in sessions)
    assert all((s / f"run-{run_id}.wandb").stat().st_size > 0 for s in sessions)
    second = (sessions[1] / f"run-{run_id}.wandb").read_bytes()
    assert b"finetune/iter-1/" in second and b"test/accuracy" in second
