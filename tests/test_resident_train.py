"""The resident multi-adapter trainer: several LoRA jobs in one process, trained exactly as
separate local_train jobs would be (tiny random model built offline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the `local` extra (torch, transformers, peft, trl) is not installed")

from harness.config import LocalFinetuneConfig, load_config  # noqa: E402
from harness.providers import local_dist, local_train, resident_train  # noqa: E402
from harness.providers.base import FinetuneRequest, JobStatus  # noqa: E402
from harness.providers.local import LocalProvider  # noqa: E402
from harness.providers.runners import read_launch  # noqa: E402
from harness.providers.runners.subprocesses import alive  # noqa: E402
from harness.testing.local_jobs import progress, write_job  # noqa: E402
from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records_factory import make_record  # noqa: E402

# Measured: losses and adapter weights are bit-identical (difference 0.0) between the resident
# process and separate jobs, and after a kill and resume; the tolerance leaves room for another
# BLAS build's summation order, no more.
TOL = 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resident")
    build_tiny_model(root / "model")
    for i, n in enumerate((5, 7, 9)):
        write_chat_jsonl(root / f"data{i}.jsonl", n=n)
    return root


def make_job(job_dir: Path, tiny: Path, i: int, **over) -> Path:
    return write_job(job_dir, base_model_path=tiny / "model", training_file=tiny / f"data{i}.jsonl", learning_rate=5e-3,
                     epochs=2, batch_size=2, seed=i, device="cpu", threads=1, max_lora_rank=8, **over)


def weights(job_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(job_dir / "adapter" / "adapter_model.safetensors")


def assert_same_training(a: Path, b: Path) -> None:
    pa, pb = progress(a), progress(b)
    assert [p["step"] for p in pa] == [p["step"] for p in pb]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(pa, pb)) <= TOL
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL


def run_resident(dirs: list[Path]) -> int:
    return resident_train.main([a for d in dirs for a in ("--job-dir", str(d))])


@pytest.fixture(scope="module")
def separate(tiny, tmp_path_factory) -> list[Path]:
    """Three local_train jobs, the third continuing the first one's adapter."""
    root = tmp_path_factory.mktemp("separate")
    dirs = [make_job(root / "j0", tiny, 0), make_job(root / "j1", tiny, 1)]
    for d in dirs:
        assert local_train.main(["--job-dir", str(d)]) == 0
    dirs.append(make_job(root / "j2", tiny, 2, init_adapter=str(dirs[0] / "adapter")))
    assert local_train.main(["--job-dir", str(dirs[2])]) == 0
    return dirs


def test_one_process_trains_every_adapter_as_separate_jobs_do(tiny, separate, tmp_path):
    dirs = [make_job(tmp_path / "j0", tiny, 0), make_job(tmp_path / "j1", tiny, 1),
            make_job(tmp_path / "j2", tiny, 2, init_adapter=str(separate[0] / "adapter"))]
    assert run_resident(dirs) == 0
    for mine, theirs in zip(dirs, separate):
        status = json.loads((mine / "status.json").read_text())
        assert status["status"] == "succeeded" and status["step"] == status["total_steps"] == len(progress(theirs))
        assert_same_training(mine, theirs)
        assert not (mine / "checkpoints").exists()
    # The continued adapter really started from the first job's: it differs from a fresh start.
    assert progress(dirs[2])[0]["loss"] != progress(dirs[0])[0]["loss"]


@pytest.mark.slow
def test_a_killed_resident_process_resumes_each_adapter_without_training_a_step_twice(tiny, separate, tmp_path):
    dirs = [make_job(tmp_path / f"j{i}", tiny, i) for i in range(2)]
    command = [sys.executable, "-m", "harness.providers.resident_train",
               *[a for d in dirs for a in ("--job-dir", str(d))]]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = [len(progress(d)) if (d / "progress.jsonl").exists() else 0 for d in dirs]
            if min(done) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert min(done) >= 2 and any((d / "checkpoints").exists() for d in dirs), (tmp_path / "log").read_text()
    assert run_resident(dirs) == 0
    for mine, theirs in zip(dirs, separate):
        steps = [p["step"] for p in progress(mine)]
        assert steps == list(range(1, len(progress(theirs)) + 1)), "a step recorded twice or missing"
        assert_same_training(mine, theirs)


def test_a_group_never_mixes_base_models(tiny, tmp_path):
    dirs = [make_job(tmp_path / "j0", tiny, 0, max_steps=1),
            make_job(tmp_path / "j1", tiny, 1, full_finetune=True)]
    assert run_resident(dirs) == 1  # the full finetune fails; the LoRA job trains
    assert json.loads((dirs[0] / "status.json").read_text())["status"] == "succeeded"
    failed = json.loads((dirs[1] / "status.json").read_text())
    assert failed["status"] == "failed" and "local_train" in failed["error"]


def meta(agent: int) -> dict[str, str]:
    return {"run": "t", "iteration": "1", "role": "critic", "agent": str(agent)}


async def test_the_provider_launches_a_batch_as_one_process_and_cancels_one_job_of_it(tiny, tmp_path):
    """...with the cores the jobs would have had apart: max_parallel_jobs 2 at 1 thread each
    give the one process 2 threads."""
    from harness.config import Hyperparameters

    p = LocalProvider(tmp_path / "run", LocalFinetuneConfig(trainer="resident", threads=1, max_parallel_jobs=2,
                                                            learning_rate=5e-3),
                      base_model_path=str(tiny / "model"), max_lora_rank=8, base_names={"base"})
    hp = Hyperparameters(n_epochs=3, batch_size=1)
    async with p.batch():
        states = [await p.submit(FinetuneRequest(training_file=tiny / f"data{i}.jsonl", base_model="base",
                                                 hyperparameters=hp, metadata=meta(i))) for i in range(3)]
        assert all(read_launch(p.jobs_dir / s.job_id) is None for s in states), "held until the batch ends"
    launches = [read_launch(p.jobs_dir / s.job_id) for s in states]
    assert len({launch.pid for launch in launches}) == 1
    assert launches[0].group == [s.job_id for s in states]
    assert all(alive(launches[0].pid, p.jobs_dir / s.job_id) for s in states)
    cancelled = await p.cancel(states[2].job_id)
    assert cancelled.status is JobStatus.CANCELLED
    assert alive(launches[0].pid, p.jobs_dir / states[0].job_id), "the other jobs' process goes on"
    for s in states[:2]:
        done = await p.wait(s.job_id, poll_interval_s=0.2, max_interval_s=1.0)
        assert done.status is JobStatus.SUCCEEDED, done.error
    last = await p.refresh(states[2].job_id)
    assert last.status is JobStatus.CANCELLED and not (p.jobs_dir / states[2].job_id / "adapter").exists()
    log = (p.jobs_dir / states[0].job_id / "train.log").read_text()
    assert "2 CPU threads" in log and "1 CPU threads" not in log, log


@pytest.mark.slow
async def test_a_resumed_provider_relaunches_a_killed_group_from_its_checkpoints(tiny, tmp_path):
    from harness.config import Hyperparameters

    def provider() -> LocalProvider:
        return LocalProvider(tmp_path / "run", LocalFinetuneConfig(trainer="resident", threads=1, learning_rate=5e-3),
                             base_model_path=str(tiny / "model"), max_lora_rank=8, base_names={"base"})

    p = provider()
    hp = Hyperparameters(n_epochs=2, batch_size=1)
    async with p.batch():
        states = [await p.submit(FinetuneRequest(training_file=tiny / f"data{i}.jsonl", base_model="base",
                                                 hyperparameters=hp, metadata=meta(i))) for i in range(2)]
    dirs = [p.jobs_dir / s.job_id for s in states]
    pid = read_launch(dirs[0]).pid
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(local_dist.has_checkpoint(d, 1) for d in dirs):
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
    while alive(pid, dirs[0]):
        time.sleep(0.05)
    again = provider()  # the resumed loop's
    async with again.batch():
        for s in states:
            assert (await again.refresh(s.job_id)).status is JobStatus.QUEUED
    assert read_launch(dirs[0]).pid != pid and read_launch(dirs[0]).group == [d.name for d in dirs]
    for s, d in zip(states, dirs):
        done = await again.wait(s.job_id, poll_interval_s=0.2, max_interval_s=1.0)
        assert done.status is JobStatus.SUCCEEDED, done.error
        steps = [row["step"] for row in progress(d)]
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] == json.loads((d / "status.json").read_text())["total_steps"]


@pytest.mark.slow
async def test_the_stage_registers_the_same_models_with_either_trainer(tiny, tmp_path):
    from rich.console import Console

    from harness.finetune import FinetuneStage
    from harness.ftdata import build_ftdata
    from harness.registry import Registry

    records = [make_record(f"p{i}", str(i), [[str(i), str(i)]] * 2, split="train") for i in range(4)]
    results = {}
    for trainer in ("per_job", "resident"):
        cfg = load_config(None, ["finetune.provider=local", "finetune.iterations=1", "finetune.min_examples=1",
                                 "finetune.hyperparameters.n_epochs=1", "finetune.hyperparameters.batch_size=2",
                                 "finetune.local.threads=1", f"finetune.local.trainer={trainer}",
                                 "finetune.local.max_parallel_jobs=4", "debate.agents=2", f"serve.model={tiny / 'model'}"])
        run_dir = tmp_path / trainer
        stats = build_ftdata(records, n_agents=2, cfg=cfg.finetune, out_dir=run_dir / "ftdata", seed=0)
        provider = LocalProvider(run_dir, cfg.finetune.local, base_model_path=str(tiny / "model"), max_lora_rank=8,
                                 base_names={"base", cfg.models.base})
        registry = Registry(run="t", base_model=cfg.models.base)
        entries = await FinetuneStage(cfg, provider, registry, run_dir / "registry.json", run_dir,
                                      Console(quiet=True)).run(stats, run_dir / "ftdata", target=1)
        pids = {read_launch(run_dir / "local-jobs" / e.job_id).pid for e in entries}
        assert len(pids) == (1 if trainer == "resident" else len(entries))
        results[trainer] = entries
    fields = ("iteration", "role", "agent", "status", "model_id", "parent_model", "n_examples", "trained_tokens",
              "data_sha256")
    assert [e.model_dump(include=set(fields)) for e in results["resident"]] == \
        [e.model_dump(include=set(fields)) for e in results["per_job"]]
    assert all(e.status == "succeeded" for e in results["resident"]) and len(results["resident"]) == 4
    for a, b in zip(results["per_job"], results["resident"]):
        wa = weights(tmp_path / "per_job" / "local-jobs" / a.job_id)
        wb = weights(tmp_path / "resident" / "local-jobs" / b.job_id)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL
