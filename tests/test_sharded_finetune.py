"""A local job over several processes (finetune.local.processes_per_job), its checkpoints and its
resume, on CPU processes over gloo: the loss curve of N processes is the one process's with the
same effective batch, and a job killed after a checkpoint and started again ends where an
uninterrupted one does (docs/finetuning/sharded.md)."""

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

from harness.config import Hyperparameters, LocalFinetuneConfig, load_config  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.providers import local_dist  # noqa: E402
from harness.providers.base import FinetuneRequest, JobStatus  # noqa: E402
from harness.providers.local import LocalProvider  # noqa: E402
from harness.providers.runners import Launch  # noqa: E402
from harness.providers.runners.subprocesses import SubprocessRunner  # noqa: E402
from harness.testing.local_jobs import progress, write_job  # noqa: E402
from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl  # noqa: E402

# Measured on this machine (2 CPU cores, torch 2.13 CPU, float32): per-step losses of 2
# processes and of 1 differ by at most 5e-7 (tiny model, full finetune and LoRA) -- the order
# of float32 rounding of a sum taken in another order. 1e-5 relative leaves room for other CPUs;
# a wrong batch split, data order or gradient average shifts losses by 1e-3 or more.
RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def make_job(job_dir: Path, model: Path, data: Path, **spec) -> Path:
    return write_job(job_dir, base_model_path=model, training_file=data,
                     **{"epochs": 2, "device": "cpu", "threads": 1, "learning_rate": 1e-3, **spec})


def start(job_dir: Path) -> subprocess.Popen:
    """The job as a runner starts it: its own session, so a kill of its group reaches every rank."""
    log = open(job_dir / "train.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "harness.providers.local_train", "--job-dir", str(job_dir)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run(job_dir: Path) -> dict:
    proc = start(job_dir)
    assert proc.wait(timeout=600) == 0, (job_dir / "train.log").read_text()[-3000:]
    return json.loads((job_dir / "status.json").read_text())


def losses(job_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in progress(job_dir)]


def assert_same_curve(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=RTOL)
    assert len({round(x, 3) for _, x in a}) > 1, "the loss must move, or equal curves prove nothing"


# ----------------------------------------------------------------------------- config

def test_the_effective_batch_must_divide_into_processes_and_batches():
    cfg = load_config("vllm", ["finetune.local.processes_per_job=2", "finetune.local.effective_batch_size=16"])
    assert cfg.finetune.local.accumulation_steps(cfg.finetune.hyperparameters.batch_size) == 2  # 4 x 2 x 2
    with pytest.raises(ConfigError, match=r"effective_batch_size: 12 is not a multiple of.*batch_size \(4\) x "
                                          r"finetune.local.processes_per_job \(2\) = 8"):
        load_config("vllm", ["finetune.local.processes_per_job=2", "finetune.local.effective_batch_size=12"])
    with pytest.raises(ConfigError, match="effective_batch_size"):  # smaller than one step's examples
        load_config("vllm", ["finetune.local.effective_batch_size=2"])


def test_bad_process_settings_are_refused_at_load():
    with pytest.raises(ConfigError, match="devices: 1 GPU.*processes_per_job is 2"):
        load_config("vllm", ["finetune.local.processes_per_job=2", "finetune.local.devices=[0]"])
    with pytest.raises(ConfigError, match="sharding: fsdp shards a full finetune"):
        load_config("vllm", ["finetune.local.processes_per_job=2", "finetune.local.sharding=fsdp"])
    with pytest.raises(ConfigError, match="processes_per_job"):
        load_config("vllm", ["finetune.local.processes_per_job=0"])
    with pytest.raises(ConfigError, match="lr_scheduler"):
        load_config("vllm", ["finetune.local.lr_scheduler=polynomial"])
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load_config("vllm", ["finetune.local.warmup_ratio=1.5"])


def test_a_resume_keeps_the_progress_up_to_its_checkpoint_even_after_a_torn_line(tmp_path):
    """A kill can cut progress.jsonl's last line in half; the resumed job (either trainer) keeps
    the steps up to its checkpoint and logs the rest anew, instead of failing on that line."""
    rows = [json.dumps({"step": k, "loss": 1.0 / k}) for k in (1, 2, 3)]
    (tmp_path / "progress.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    local_dist.trim_progress(tmp_path, 2)
    assert [r["step"] for r in progress(tmp_path)] == [1, 2]


def test_paper_open_holds_the_authors_recipe():
    cfg = load_config("paper-open", ["serve.model=meta-llama/Meta-Llama-3-8B-Instruct"])
    local, hp = cfg.finetune.local, cfg.finetune.hyperparameters
    assert local.full_finetune and local.learning_rate == 1e-5 and local.lr_scheduler == "cosine"
    assert local.warmup_ratio == 0.03 and local.max_length == 2048 and hp.n_epochs == 2
    assert hp.batch_size * local.processes_per_job * local.accumulation_steps(hp.batch_size) == 192
    assert cfg.sampling.max_tokens == 2048 and cfg.sampling.temperature == 1.0 and cfg.sampling.top_p == 0.9
    assert cfg.task.prompt_set == "authors" and cfg.task.name == "math" and cfg.serve.manage
    # Fewer GPUs: the accumulation makes up the effective batch.
    four = load_config("paper-open", ["finetune.local.processes_per_job=4"]).finetune.local
    assert four.accumulation_steps(hp.batch_size) == 12


def test_a_job_of_two_processes_gets_two_gpus_and_ray_asks_for_them():
    runner = SubprocessRunner(LocalFinetuneConfig(devices=[0, 1, 2, 3, 4], processes_per_job=2, max_parallel_jobs=4),
                              sys.executable)
    assert runner.slots([]) == 2  # five GPUs hold two jobs of two
    first = runner.pick_device([])
    second = runner.pick_device([Launch(devices=first)])
    assert first == "0,1" and second == "2,3"
    assert runner.slots([Launch(devices=first), Launch(devices=second)]) == 0
    assert LocalFinetuneConfig(processes_per_job=4).ray_gpus() == 4
    assert LocalFinetuneConfig(processes_per_job=4, ray={"num_gpus_per_job": 0}).ray_gpus() == 0  # a CPU cluster
    assert LocalFinetuneConfig().ray_gpus() == 1


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_two_processes_train_the_same_curve_as_one_full_finetune(tmp_path, tiny_model):
    """FSDP over 2 CPU processes, 1 example each, against 1 process with batches of 2."""
    data = write_chat_jsonl(tmp_path / "data.jsonl", n=8)
    one = make_job(tmp_path / "one", tiny_model, data, full_finetune=True, batch_size=2)
    two = make_job(tmp_path / "two", tiny_model, data, full_finetune=True, batch_size=1, processes=2,
                   sharding="fsdp")
    run(one)
    status = run(two)
    assert status["status"] == "succeeded" and status["step"] == status["total_steps"] == 8
    assert_same_curve(losses(two), losses(one))
    from safetensors.torch import load_file

    a, b = (load_file(job / "model" / "model.safetensors") for job in (one, two))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # measured 2e-6
    assert not (two / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_with_accumulation_train_the_same_lora_curve(tmp_path, tiny_model):
    """DDP over 2 processes x 1 example x 2 accumulation steps against 1 process x 4, with the
    cosine schedule and warmup (dropout off: its masks depend on the batch's shape)."""
    data = write_chat_jsonl(tmp_path / "data.jsonl", n=8)
    common = {"lora": {"dropout": 0.0}, "lr_scheduler": "cosine", "warmup_ratio": 0.25}
    one = make_job(tmp_path / "one", tiny_model, data, batch_size=4, **common)
    two = make_job(tmp_path / "two", tiny_model, data, batch_size=1, processes=2, gradient_accumulation_steps=2,
                   **common)
    run(one)
    run(two)
    assert_same_curve(losses(two), losses(one))
    rows = progress(two)
    assert rows[0]["learning_rate"] == 0 and rows[1]["learning_rate"] == pytest.approx(1e-3)  # warmup, then peak
    assert (two / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_smollm2_two_processes_match_one_full_finetune(tmp_path):
    """The real model's architecture (tied embeddings, SmolLM2's tokenizer) through FSDP. LoRA over
    DDP is checked on the tiny model above: the same code path, half a minute less of CI."""
    from harness.models import is_cached, model_dir

    if not is_cached("smollm2"):
        pytest.skip("SmolLM2 is not cached: python -m harness.models smollm2")
    data = write_chat_jsonl(tmp_path / "data.jsonl", n=4)
    common = {"full_finetune": True, "max_steps": 2, "max_length": 256, "learning_rate": 1e-4}
    model = model_dir("smollm2")
    one = make_job(tmp_path / "one", model, data, batch_size=2, **common)
    two = make_job(tmp_path / "two", model, data, batch_size=1, processes=2, **common)
    run(one)
    run(two)
    assert_same_curve(losses(two), losses(one))


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 1], ids=["fsdp-2-processes", "lora-1-process"])
def test_a_killed_job_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(tmp_path, tiny_model, processes):
    """2 processes: a sharded full finetune; 1: today's LoRA job (dropout on: its random state is
    restored too)."""
    data = write_chat_jsonl(tmp_path / "data.jsonl", n=8 if processes == 2 else 4)
    spec = ({"full_finetune": True, "batch_size": 1, "processes": 2, "sharding": "fsdp", "lr_scheduler": "cosine"}
            if processes == 2 else {"batch_size": 1})
    whole = make_job(tmp_path / "whole", tiny_model, data, **spec)
    cut = make_job(tmp_path / "cut", tiny_model, data, checkpoint_steps=1, **spec)
    run(whole)

    proc = start(cut)
    while not local_dist.complete_checkpoints(cut, processes) and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner's stop, without the grace period
    proc.wait()
    assert json.loads((cut / "status.json").read_text())["status"] == "running", "killed before it ended"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "--worker" in subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True).stdout.replace(str(whole), ""):
        time.sleep(0.2)  # the ranks die with their group
    assert f"--job-dir {cut} --worker" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                             text=True).stdout

    status = run(cut)
    assert "resuming from checkpoint-" in (cut / "train.log").read_text()
    steps = [s for s, _ in losses(cut)]
    assert steps == list(range(1, 9)) and status["step"] == 8  # no step repeated, none missing
    assert_same_curve(losses(cut), losses(whole))
    assert not (cut / "checkpoints").exists()  # deleted after success, as before


@pytest.mark.slow
async def test_the_provider_runs_a_job_of_two_processes_and_reports_a_rank_s_error(tmp_path, tiny_model):
    """Through the provider and the subprocess runner, as the loop runs it: the settings reach
    the job, it succeeds; a job whose ranks fail is failed with the rank's own error."""
    cfg = LocalFinetuneConfig(processes_per_job=2, effective_batch_size=4, lr_scheduler="cosine", warmup_ratio=0.1,
                              threads=1, device="cpu", max_parallel_jobs=2)
    p = LocalProvider(tmp_path / "run", cfg, base_model_path=str(tiny_model), max_lora_rank=8, base_names={"base"})
    data = write_chat_jsonl(tmp_path / "data.jsonl", n=8)
    hp = Hyperparameters(n_epochs=1, batch_size=1)
    meta = {"run": "t", "iteration": "1", "role": "critic"}
    good = await p.submit(FinetuneRequest(training_file=data, base_model="base", metadata={**meta, "agent": "0"},
                                          hyperparameters=hp))
    bad = await p.submit(FinetuneRequest(training_file=tmp_path / "missing.jsonl", base_model="base",
                                         metadata={**meta, "agent": "1"}, hyperparameters=hp))
    spec = json.loads((tmp_path / "run" / "local-jobs" / good.job_id / "spec.json").read_text())
    assert (spec["processes"], spec["gradient_accumulation_steps"], spec["sharding"]) == (2, 2, "ddp")
    assert (spec["lr_scheduler"], spec["warmup_ratio"]) == ("cosine", 0.1)
    good = await p.wait(good.job_id, poll_interval_s=0.5, max_interval_s=2.0)
    assert good.status == JobStatus.SUCCEEDED, good.error
    assert [s for s, _ in losses(Path(good.artifact_path).parent)] == [1, 2]  # 8 examples / (1 x 2 x 2)
    bad = await p.wait(bad.job_id, poll_interval_s=0.5, max_interval_s=2.0)
    assert bad.status == JobStatus.FAILED and "missing.jsonl does not exist" in bad.error
