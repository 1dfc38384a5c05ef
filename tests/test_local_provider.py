"""The local finetuning provider: real TRL + PEFT jobs on a tiny random model built offline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the `local` extra (torch, transformers, peft, trl) is not installed")

from harness.config import Hyperparameters, LocalFinetuneConfig, RunConfig  # noqa: E402
from harness.errors import FinetuneError, ServeError  # noqa: E402
from harness.providers.base import FinetuneRequest, JobStatus  # noqa: E402
from harness.providers.local import LocalProvider, adapter_name  # noqa: E402
from harness.providers.runners.subprocesses import alive as _alive  # noqa: E402
from harness.providers.local_train import JobFile, JobSpec  # noqa: E402
from harness.providers.weighted_examples import IGNORE, tokenize_weighted  # noqa: E402
from harness.serve import validate_adapter  # noqa: E402
from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl  # noqa: E402

FAST = Hyperparameters(n_epochs=1, batch_size=2)


def meta(agent: int, iteration: int = 1, role: str = "critic") -> dict[str, str]:
    return {"run": "t", "iteration": str(iteration), "role": role, "agent": str(agent)}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def provider(run_dir: Path, tiny_model: Path, **cfg) -> LocalProvider:
    return LocalProvider(run_dir, LocalFinetuneConfig(**cfg), base_model_path=str(tiny_model),
                         max_lora_rank=8, base_names={"base"})


async def wait(p: LocalProvider, job_id: str):
    return await p.wait(job_id, poll_interval_s=0.2, max_interval_s=1.0)


# ----------------------------------------------------------------------------- masking

def test_weight_zero_and_user_tokens_carry_no_loss(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "It is 6.", "weight": 0},
        {"role": "user", "content": "Others say 5."},
        {"role": "assistant", "content": "It is \\boxed{5}.", "weight": 1},
    ]
    ex = tokenize_weighted(tokenizer, messages)
    learned = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE]
    # Exactly the weight-1 answer and its end-of-turn marker: no prompt, no user turn, no weight-0 turn.
    assert tokenizer.decode(learned) == "It is \\boxed{5}.<|end|>\n"
    assert all(label in (IGNORE, t) for t, label in zip(ex["input_ids"], ex["labels"]))
    # Flip the weights: now only the first answer is learned.
    messages[2]["weight"], messages[4]["weight"] = 1, 0
    ex = tokenize_weighted(tokenizer, messages)
    learned = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == "It is 6.<|end|>\n"


def test_unweighted_turns_default_to_loss_and_all_zero_is_skipped(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ex = tokenize_weighted(tokenizer, messages)
    assert any(label != IGNORE for label in ex["labels"])
    messages[1]["weight"] = 0
    assert tokenize_weighted(tokenizer, messages) is None


def learned_runs(tokenizer, ex) -> list[str]:
    """The decoded runs of consecutive labelled tokens: one per learned assistant turn."""
    runs, current = [], []
    for tid, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE:
            current.append(tid)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def test_every_turn_weighted_with_a_template_that_closes_with_eos(tiny_model):
    """critic_first_turn_loss: every assistant turn learned, with a Phi-3-style template that
    appends eos when no generation prompt follows (so a partial render is no prefix of the whole)."""
    from transformers import AutoTokenizer

    from harness.testing.tiny_model import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = CHAT_TEMPLATE.replace("{% endif %}", "{% else %}{{ eos_token }}{% endif %}")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "It is 6.", "weight": 1},
        {"role": "user", "content": "Others say 5."},
        {"role": "assistant", "content": "It is \\boxed{5}.", "weight": 1},
    ]
    ex = tokenize_weighted(tok, messages)
    # Each answer with its end-of-turn marker (the last also with the closing eos); the next
    # turn's <|user|> marker, which shares its first characters with the eos, is not learned.
    assert learned_runs(tok, ex) == ["It is 6.<|end|>\n", "It is \\boxed{5}.<|end|>\n<|end|>"]
    messages[2]["weight"] = 0
    assert learned_runs(tok, tokenize_weighted(tok, messages)) == ["It is \\boxed{5}.<|end|>\n<|end|>"]


def test_an_example_whose_weighted_turn_would_be_cut_is_dropped(tokenizer):
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "It is 5. " * 20}]
    whole = tokenize_weighted(tokenizer, messages)
    assert whole["labels"][-2:] == whole["input_ids"][-2:]  # ends with the learned "<|end|>\n"
    # Cut inside the answer: no partial turn without its end marker is kept.
    assert tokenize_weighted(tokenizer, messages, max_length=len(whole["input_ids"]) - 1) is None
    assert tokenize_weighted(tokenizer, messages, max_length=len(whole["input_ids"])) == whole
    # A cut that only removes unweighted tokens keeps the example.
    messages.append({"role": "user", "content": "Thanks, that is all for today."})
    trailing = tokenize_weighted(tokenizer, messages, max_length=len(whole["input_ids"]))
    assert trailing == whole


def test_adapter_names_keep_the_run_prefix_the_loop_unloads_by():
    # The loop's run id is f"{cfg.name}-{8 hex}" and it unloads stale adapters by f"{run}-".
    for run in ("a-long-experiment-name-about-critics-and-more-0123abcd", "n" * 45 + "-0123abcd"):
        names = {adapter_name({"harness_run": run, "iteration": str(it), "role": role, "agent": str(agent)})
                 for it in (1, 12) for role in ("generator", "critic") for agent in (0, 1, 2)}
        assert len(names) == 12, "names stay distinct"
        assert all(n.startswith(run + "-") and len(n) <= 64 for n in names), names
        assert any("-it12-generator" not in n for n in names), "long enough to be cut"


def test_adapter_names_are_safe_and_short():
    assert adapter_name(meta(2, 3, "generator")) == "t-it3-generator2"
    long = adapter_name({"run": "my run/" + "x" * 100, "iteration": "1", "role": "critic", "agent": "0"})
    assert len(long) <= 64 and long.endswith("-it1-critic0") and " " not in long and "/" not in long
    other = adapter_name({"run": "my run/" + "x" * 99 + "y", "iteration": "1", "role": "critic", "agent": "0"})
    assert other != long


def test_validate_adapter_rejects_what_vllm_cannot_load(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    with pytest.raises(ServeError, match="rank 16 exceeds the server's max_lora_rank 8"):
        validate_adapter(tmp_path, max_lora_rank=8)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ServeError, match="lm_head"):
        validate_adapter(tmp_path, max_lora_rank=8)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<new>": 999}))
    with pytest.raises(ServeError, match="adds tokens"):
        validate_adapter(tmp_path, max_lora_rank=8)


def test_config_refuses_a_rank_the_server_cannot_load():
    with pytest.raises(ValueError, match="exceeds serve.max_lora_rank"):
        RunConfig.model_validate({"finetune": {"provider": "local", "local": {"r": 16}}, "serve": {"max_lora_rank": 8}})
    with pytest.raises(ValueError, match="vLLM accepts"):
        RunConfig.model_validate({"serve": {"max_lora_rank": 12}})


# ----------------------------------------------------------------------------- jobs

@pytest.mark.slow
async def test_job_trains_an_adapter_and_a_restarted_provider_finds_it(tmp_path, tiny_model, tokenizer):
    data = write_chat_jsonl(tmp_path / "critic-0.jsonl", n=20, first_turn_weight=0)
    p = provider(tmp_path / "run", tiny_model)
    state = await p.submit(FinetuneRequest(training_file=data, base_model="base", metadata=meta(0),
                                           hyperparameters=FAST))
    assert state.status in (JobStatus.QUEUED, JobStatus.RUNNING)
    done = await wait(p, state.job_id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.model_id == "t-it1-critic0"
    adapter = Path(done.artifact_path)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert (adapter / "adapter_model.safetensors").exists()
    job_dir = adapter.parent
    progress = [json.loads(line) for line in (job_dir / "progress.jsonl").read_text().splitlines()]
    assert progress and {"step", "loss", "epoch"} <= set(progress[0])
    # The curve a tracker plots (tracking.loss_curves) is the one the job recorded.
    assert [(c.step, c.loss) for c in await p.loss_curve(done.job_id)] == [(r["step"], r["loss"]) for r in progress]
    assert json.loads((job_dir / "status.json").read_text())["status"] == "succeeded"
    assert (job_dir / "train.log").stat().st_size > 0
    # Only the weight-1 turns were counted as trained tokens (weight-0 first answers excluded).
    expected = 0
    for line in data.read_text().splitlines():
        ex = tokenize_weighted(tokenizer, json.loads(line)["messages"])
        expected += sum(1 for label in ex["labels"] if label != IGNORE)
    assert done.trained_tokens == expected * FAST.n_epochs
    assert (await p.events(done.job_id))[-1] == "job succeeded"

    # A new provider on the same run directory (a resumed loop) finds the job, starts nothing.
    again = provider(tmp_path / "run", tiny_model)
    found = await again.find({"run": "t", "agent": "0"})
    assert found is not None and found.job_id == done.job_id
    resubmitted = await again.submit(FinetuneRequest(training_file=data, base_model="base", metadata=meta(0)))
    assert resubmitted.job_id == done.job_id and resubmitted.status == JobStatus.SUCCEEDED
    assert len(list((tmp_path / "run" / "local-jobs").iterdir())) == 1

    # The next iteration continues from this adapter (named by its model id).
    nxt = await again.submit(FinetuneRequest(training_file=data, base_model=done.model_id, metadata=meta(0, 2),
                                             hyperparameters=FAST))
    spec = json.loads((tmp_path / "run" / "local-jobs" / nxt.job_id / "spec.json").read_text())
    assert spec["init_adapter"] == done.artifact_path
    nxt = await wait(again, nxt.job_id)
    assert nxt.status == JobStatus.SUCCEEDED, nxt.error
    assert nxt.model_id == "t-it2-critic0"
    from safetensors.torch import load_file

    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(Path(nxt.artifact_path) / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    # LoRA B starts at zero in a fresh adapter; a continued one starts from the trained B.
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.slow
async def test_a_crashing_job_fails_with_its_log_and_jobs_queue(tmp_path, tiny_model):
    p = provider(tmp_path / "run", tiny_model, max_parallel_jobs=1)
    bad = await p.submit(FinetuneRequest(training_file=tmp_path / "missing.jsonl", base_model="base",
                                         metadata=meta(0)))
    queued = await p.submit(FinetuneRequest(training_file=tmp_path / "missing.jsonl", base_model="base",
                                            metadata=meta(1)))
    assert bad.status == JobStatus.RUNNING and queued.status == JobStatus.QUEUED  # one at a time
    bad = await wait(p, bad.job_id)
    assert bad.status == JobStatus.FAILED
    assert "missing.jsonl does not exist" in bad.error and "train.log" in bad.error
    assert "Traceback" in bad.error  # the log's last lines come with the error
    assert (await wait(p, queued.job_id)).status == JobStatus.FAILED

    # A failed job is not "the existing job": submitting again starts a new attempt.
    data = write_chat_jsonl(tmp_path / "ok.jsonl", n=4)
    retry = await p.submit(FinetuneRequest(training_file=data, base_model="base", metadata=meta(0)))
    assert retry.job_id != bad.job_id and retry.job_id.endswith("-2")
    # A process that dies without a word (killed) reads as failed, with its log tail.
    # (launch.json: the pid the provider started; the job's own status.json may not have it yet.)
    launch = json.loads((tmp_path / "run" / "local-jobs" / retry.job_id / "launch.json").read_text())
    os.killpg(launch["pid"], signal.SIGKILL)
    died = await wait(p, retry.job_id)
    assert died.status == JobStatus.FAILED and "ended without finishing" in died.error


@pytest.mark.slow
async def test_a_finished_job_is_seen_at_once_and_the_queued_one_starts_at_once(tmp_path, tiny_model):
    # The loop waits for all its jobs together with a poll interval of seconds that backs off to
    # a minute; a job's end must not wait for the next poll, nor the queued job behind it.
    p = provider(tmp_path / "run", tiny_model, max_parallel_jobs=1, device="cpu", threads=1)
    data = write_chat_jsonl(tmp_path / "ok.jsonl", n=4)
    first = await p.submit(FinetuneRequest(training_file=data, base_model="base", metadata=meta(0),
                                           hyperparameters=FAST))
    second = await p.submit(FinetuneRequest(training_file=data, base_model="base", metadata=meta(1),
                                            hyperparameters=FAST))
    assert second.status == JobStatus.QUEUED
    hour = 3600.0
    done = await asyncio.wait_for(asyncio.gather(
        p.wait(first.job_id, poll_interval_s=hour, max_interval_s=hour),
        p.wait(second.job_id, poll_interval_s=hour, max_interval_s=hour)), timeout=600)
    returned = time.time()
    assert [s.status for s in done] == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED], [s.error for s in done]
    jobs = tmp_path / "run" / "local-jobs"
    launched = json.loads((jobs / second.job_id / "launch.json").read_text())["launched_at"]
    # Woken by the jobs' ends, not by the hour-long poll (a bound far from both, so that a loaded
    # machine cannot fail it: ten minutes vs an hour).
    assert launched - done[0].finished_at < hour / 6
    assert returned - done[1].finished_at < hour / 6
    # On a CPU, no activation recomputation: it only costs time there.
    log = (jobs / first.job_id / "train.log").read_text()
    assert "gradient checkpointing off" in log
    assert "1 CPU threads" in log  # finetune.local.threads reached the job
    await p.close()


@pytest.mark.slow
async def test_examples_too_long_for_max_length_are_dropped_and_counted(tmp_path, tiny_model):
    def long_example() -> str:
        return json.dumps({"messages": [{"role": "user", "content": "Explain at length."},
                                        {"role": "assistant", "content": "It is 5. " * 60}]}) + "\n"

    mixed = write_chat_jsonl(tmp_path / "mixed.jsonl", n=6)
    with open(mixed, "a", encoding="utf-8") as f:
        f.write(long_example() * 2)
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(long_example() * 3)
    p = provider(tmp_path / "run", tiny_model, max_length=128, max_parallel_jobs=2)
    ok = await p.submit(FinetuneRequest(training_file=mixed, base_model="base", metadata=meta(0), hyperparameters=FAST))
    bad = await p.submit(FinetuneRequest(training_file=only_long, base_model="base", metadata=meta(1)))
    ok, bad = await wait(p, ok.job_id), await wait(p, bad.job_id)

    assert ok.status == JobStatus.SUCCEEDED, ok.error
    job_dir = tmp_path / "run" / "local-jobs" / ok.job_id
    assert json.loads((job_dir / "status.json").read_text())["dropped_examples"] == 2
    assert "2 examples dropped: longer than finetune.local.max_length" in await p.events(ok.job_id)
    log = (job_dir / "train.log").read_text()
    assert "mixed.jsonl:7: dropped" in log and "mixed.jsonl:8: dropped" in log

    assert bad.status == JobStatus.FAILED
    assert "nothing left to train on" in bad.error and "raise finetune.local.max_length" in bad.error


async def test_cancel_and_unknown_base_model(tmp_path, tiny_model):
    p = provider(tmp_path / "run", tiny_model)
    with pytest.raises(FinetuneError, match="neither the base model"):
        await p.submit(FinetuneRequest(training_file=tmp_path / "x.jsonl", base_model="t-it9-critic0",
                                       metadata=meta(0)))
    data = write_chat_jsonl(tmp_path / "d.jsonl", n=4)
    state = await p.submit(FinetuneRequest(training_file=data, base_model="base", metadata=meta(0)))
    cancelled = await p.cancel(state.job_id)
    assert cancelled.status == JobStatus.CANCELLED
    with pytest.raises(FinetuneError, match="no local finetuning job"):
        await p.refresh("nope")


def test_from_config_needs_weights(tmp_path):
    cfg = RunConfig.model_validate({"finetune": {"provider": "local"}})
    with pytest.raises(FinetuneError, match="base_model_path"):
        LocalProvider.from_config(cfg, tmp_path)
    cfg = RunConfig.model_validate({"finetune": {"provider": "local"}, "serve": {"model": "/m"}})
    p = LocalProvider.from_config(cfg, tmp_path)
    assert p.base_model_path == "/m" and "base" in p.base_names


# ----------------------------------------------------------------------------- provider internals

def fake_job(jobs_dir: Path, job_id: str, name: str, created_at: float) -> Path:
    """A succeeded job on disk, as a previous loop would have left it."""
    job_dir = jobs_dir / job_id
    (job_dir / "adapter").mkdir(parents=True)
    (job_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    spec = JobSpec(job_id=job_id, adapter_name=name, metadata=meta(0), training_file="x.jsonl",
                   base_model_path="/base", created_at=created_at)
    (job_dir / "spec.json").write_text(spec.model_dump_json())
    (job_dir / "status.json").write_text(
        JobFile(status="succeeded", artifact_path=str(job_dir / "adapter")).model_dump_json())
    return job_dir


async def test_continuing_an_adapter_starts_from_the_one_that_is_served(tmp_path, tiny_model):
    jobs = tmp_path / "run" / "local-jobs"
    # Two succeeded attempts under one name; the older one comes first in path order.
    fake_job(jobs, "t-it1-critic0-aaaa-1", "t-it1-critic0", created_at=1000.0)
    newest = fake_job(jobs, "t-it1-critic0-bbbb-1", "t-it1-critic0", created_at=2000.0)
    p = provider(tmp_path / "run", tiny_model, python="/bin/true")  # the new job itself never trains
    assert p.artifacts(["t-it1-critic0"]) == {"t-it1-critic0": str(newest / "adapter")}
    state = await p.submit(FinetuneRequest(training_file=tmp_path / "x.jsonl", base_model="t-it1-critic0",
                                           metadata=meta(0, 2)))
    spec = json.loads((jobs / state.job_id / "spec.json").read_text())
    assert spec["init_adapter"] == str(newest / "adapter")


def test_a_job_is_alive_only_by_its_exact_job_dir(tmp_path):
    import subprocess
    import sys

    job10 = tmp_path / "t-it1-critic0-abcd1234-10"
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)",
                             "--job-dir", str(job10)], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # past exec: /proc shows its own command line from here on
        assert _alive(proc.pid, job10)
        assert not _alive(proc.pid, tmp_path / "t-it1-critic0-abcd1234-1")  # a prefix of ...-10
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert not _alive(proc.pid, job10)


async def test_launch_never_overwrites_the_status_the_job_wrote(tmp_path, tiny_model, monkeypatch):
    """A job that finishes at once: its "succeeded" must survive the provider's launch, even when
    the job writes it between the provider's read of status.json and any write of its own."""
    import harness.providers.local as local

    child = tmp_path / "python"  # stands in for `python -m harness.providers.local_train --job-dir DIR`
    child.write_text('#!/bin/sh\ndir="$4"\nmkdir -p "$dir/adapter"\n'
                     'echo \'{"peft_type": "LORA", "r": 8}\' > "$dir/adapter/adapter_config.json"\n'
                     'echo "{\\"status\\": \\"succeeded\\", \\"artifact_path\\": \\"$dir/adapter\\", '
                     '\\"finished_at\\": 1.0}" > "$dir/status.json.tmp"\nmv "$dir/status.json.tmp" "$dir/status.json"\n')
    child.chmod(0o755)
    real_read = local.read_status

    def read_status(job_dir: Path):
        seen = real_read(job_dir)
        if sys._getframe(1).f_code.co_name == "_launch":
            # The worst interleaving: the job writes its final status right after this read.
            for _ in range(200):
                if real_read(job_dir).status == "succeeded":
                    break
                time.sleep(0.05)
        return seen

    monkeypatch.setattr(local, "read_status", read_status)
    p = provider(tmp_path / "run", tiny_model, python=str(child))
    state = await p.submit(FinetuneRequest(training_file=tmp_path / "x.jsonl", base_model="base", metadata=meta(0)))
    done = await wait(p, state.job_id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.model_id == "t-it1-critic0"


# ----------------------------------------------------------------------------- one GPU per job

def running_at_once(records: list[dict]) -> int:
    """The most jobs whose [started_at, finished_at] overlap at one instant."""
    events = sorted([(r["started_at"], 1) for r in records] + [(r["finished_at"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
async def test_each_job_gets_a_gpu_of_its_own(tmp_path, tiny_model):
    """finetune.local.devices: two devices, three jobs: two train at once, each with a device no
    other running job holds -- as the job's own process saw CUDA_VISIBLE_DEVICES -- and the third
    starts when one of them ends, on a device that freed up."""
    data = write_chat_jsonl(tmp_path / "d.jsonl", n=4)
    p = provider(tmp_path / "run", tiny_model, devices=[7, "9"], max_parallel_jobs=3)
    states = [await p.submit(FinetuneRequest(training_file=data, base_model="base", metadata=meta(a),
                                             hyperparameters=FAST)) for a in range(3)]
    assert [s.status for s in states] == [JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.QUEUED]
    done = [await wait(p, s.job_id) for s in states]
    assert all(d.status == JobStatus.SUCCEEDED for d in done), [d.error for d in done]
    records = [json.loads((tmp_path / "run" / "local-jobs" / s.job_id / "status.json").read_text()) for s in states]
    seen = [r["cuda_visible_devices"] for r in records]
    assert sorted(seen[:2]) == ["7", "9"] and seen[2] in ("7", "9")
    assert running_at_once(records) == 2
    # The third started once a device was free, on a device no job still running held.
    assert records[2]["started_at"] >= min(r["finished_at"] for r in records[:2])
    assert all(r["cuda_visible_devices"] != seen[2] for r in records[:2] if r["finished_at"] > records[2]["started_at"])
    log = (tmp_path / "run" / "local-jobs" / states[2].job_id / "train.log").read_text()
    assert f"CUDA_VISIBLE_DEVICES={seen[2]}" in log


async def test_shared_devices_let_more_jobs_than_gpus_run(tmp_path, tiny_model):
    """share_devices: three jobs on two devices all run at once, spread over both."""
    child = tmp_path / "python"  # a job that records the device it sees and trains for a moment
    child.write_text('#!/bin/sh\ndir="$4"\nnow=$(date +%s.%N)\nsleep 1.5\nmkdir -p "$dir/adapter"\n'
                     'echo \'{"peft_type": "LORA", "r": 8}\' > "$dir/adapter/adapter_config.json"\n'
                     'echo "{\\"status\\": \\"succeeded\\", \\"artifact_path\\": \\"$dir/adapter\\", '
                     '\\"started_at\\": $now, \\"finished_at\\": $(date +%s.%N), '
                     '\\"cuda_visible_devices\\": \\"$CUDA_VISIBLE_DEVICES\\"}" > "$dir/status.json.tmp"\n'
                     'mv "$dir/status.json.tmp" "$dir/status.json"\n')
    child.chmod(0o755)
    p = provider(tmp_path / "run", tiny_model, python=str(child), devices=[0, 1], share_devices=True,
                 max_parallel_jobs=3)
    states = [await p.submit(FinetuneRequest(training_file=tmp_path / "x.jsonl", base_model="base",
                                             metadata=meta(a))) for a in range(3)]
    assert all(s.status == JobStatus.RUNNING for s in states)
    done = [await wait(p, s.job_id) for s in states]
    assert all(d.status == JobStatus.SUCCEEDED for d in done), [d.error for d in done]
    records = [json.loads((tmp_path / "run" / "local-jobs" / s.job_id / "status.json").read_text()) for s in states]
    assert sorted(r["cuda_visible_devices"] for r in records) == ["0", "0", "1"]
    assert running_at_once(records) == 3


def test_device_lists_are_checked():
    with pytest.raises(ValueError, match="lists a GPU twice"):
        LocalFinetuneConfig(devices=[0, 0])
    with pytest.raises(ValueError, match="empty list"):
        LocalFinetuneConfig(devices=[])


async def test_a_run_keeps_the_runner_it_started_with(tmp_path, tiny_model):
    jobs = tmp_path / "run" / "local-jobs"
    job_dir = fake_job(jobs, "t-it1-critic0-aaaa-1", "t-it1-critic0", created_at=1000.0)
    (job_dir / "launch.json").write_text(json.dumps({"runner": "ray", "submission_id": "harness-t-it1-critic0-aaaa-1"}))
    p = provider(tmp_path / "run", tiny_model)  # the subprocess runner
    with pytest.raises(FinetuneError, match="started by the ray runner, but finetune.local.runner is subprocess"):
        await p.refresh("t-it1-critic0-aaaa-1")
