"""The `tinker` finetuning provider.

Fast tests (no server): chat examples become Tinker datums with the right per-token weights, the
step plan is deterministic, a sampler archive becomes an adapter vLLM loads, settings are checked
at load, and `--dry-run` prices a run.

The slow test runs the loop as a user does with finetune.provider=tinker against a REAL Tinker
server on 127.0.0.1 (SkyRL's skyrl-tx, JAX on CPU, in .venv-tinker: .ci/setup-tinker.sh) on
SmolLM2-135M-Instruct, with the debates on a real vLLM CPU server. It kills the loop and one
training process mid-training and resumes. Skipped when .venv-tinker or .venv-vllm is missing,
unless HARNESS_REQUIRE_TINKER=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from harness.providers.weighted_examples import IGNORE, tokenize_weighted
from harness.providers.tinker_train import batches, datum_arrays, pad, unpack_adapter
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("HARNESS_REQUIRE_TINKER") == "1"

CRITIC = [{"role": "user", "content": "What is 2+3?"},
          {"role": "assistant", "content": "It is 6.", "weight": 0},
          {"role": "user", "content": "Here are the other answers: 5. Check again."},
          {"role": "assistant", "content": "The answer is 5.", "weight": 1}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from harness.testing.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path)
    return AutoTokenizer.from_pretrained(path)


def test_datum_weights_cover_only_the_trained_turn(tokenizer):
    inp, tgt, w = datum_arrays(tokenize_weighted(tokenizer, CRITIC))
    assert len(inp) == len(tgt) == len(w) and inp[1:] == tgt[:-1]  # next-token targets
    learned = tokenizer.decode([t for t, x in zip(tgt, w) if x == 1.0])
    assert "The answer is 5." in learned
    assert "It is 6." not in learned and "What is 2+3?" not in learned and "Check again" not in learned
    assert set(w) == {0.0, 1.0}


def test_an_example_with_every_turn_weighted_trains_each_answer(tokenizer):
    both = [dict(m, weight=1) if m["role"] == "assistant" else m for m in CRITIC]
    _, tgt, w = datum_arrays(tokenize_weighted(tokenizer, both))
    learned = tokenizer.decode([t for t, x in zip(tgt, w) if x == 1.0])
    assert "It is 6." in learned and "The answer is 5." in learned


def test_padding_adds_only_weight_zero_tokens_after_the_text(tokenizer):
    arrays = datum_arrays(tokenize_weighted(tokenizer, CRITIC))
    inp, tgt, w = pad(arrays, 64, pad_id=0)
    n = len(arrays[0])
    assert len(inp) % 64 == 0 and inp[:n] == arrays[0] and tgt[:n] == arrays[1] and w[:n] == arrays[2]
    assert set(w[n:]) == {0.0}
    assert pad(arrays, None, 0) == arrays


def test_step_plan_is_deterministic_and_covers_every_example_each_epoch():
    plan = batches(5, 2, 2, seed=3)
    assert plan == batches(5, 2, 2, seed=3)
    assert len(plan) == 6 and [len(b) for b in plan] == [2, 2, 1, 2, 2, 1]
    assert sorted(i for b in plan[:3] for i in b) == sorted(i for b in plan[3:] for i in b) == list(range(5))


def test_sampler_archive_becomes_a_loadable_adapter(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from harness.serve import validate_adapter

    src = tmp_path / "src"
    src.mkdir()
    prefix = "base_model.model.model.layers.0."
    save_file({f"{prefix}self_attn.q_proj.lora_A.weight": np.zeros((8, 16), np.float32),
               f"{prefix}self_attn.q_proj.lora_B.weight": np.zeros((16, 8), np.float32),
               f"{prefix}mlp.down_proj.lora_A.weight": np.zeros((8, 32), np.float32),
               f"{prefix}mlp.down_proj.lora_B.weight": np.zeros((16, 8), np.float32)},
              str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 32,
                                                         "target_modules": None}))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname=".")
    out = unpack_adapter(buf.getvalue(), tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj"] and config["task_type"] == "CAUSAL_LM"
    validate_adapter(out, max_lora_rank=8)


def test_settings_are_checked_at_load(cli):
    from harness.config import load_config
    from harness.errors import ConfigError

    cfg = load_config("smollm2", ["finetune.provider=tinker", "finetune.tinker.base_model=Qwen/Qwen3-8B"])
    assert cfg.finetune.tinker.api_key_env == "TINKER_API_KEY" and cfg.finetune.tinker.base_url is None
    for bad in ("finetune.tinker.rank=0", "finetune.tinker.learning_rate=0.5", "finetune.tinker.base_url=localhost:1"):
        with pytest.raises(ConfigError, match="finetune.tinker"):
            load_config("smollm2", ["finetune.provider=tinker", bad])
    done = cli("--config", "smollm2", "--set", "finetune.provider=tinker", "--set", "finetune.tinker.rank=16",
               "--set", "finetune.tinker.base_model=x", "--set", "finetune.tinker.base_url=http://127.0.0.1:9",
               "--run-dir", "r", "--set", "task.n_train=2", "--set", "task.n_test=1", "--set", "serve.manage=false",
               "--set", "endpoint.base_url=http://127.0.0.1:9/v1")
    assert done.returncode == 2 and "finetune.tinker.rank" in done.stdout and "max_lora_rank" in done.stdout


def test_dry_run_prices_a_math_run(cli, tmp_path):
    """3 agents x 2 rounds, 500/500 MATH (offline: the bundled sample problems, cycled)."""
    rows = [json.loads(line) for line in (REPO / "harness" / "resources" / "data" / "math-sample.jsonl").read_text().splitlines()]
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(500):
                f.write(json.dumps(dict(rows[i % len(rows)], problem=f"{rows[i % len(rows)]['problem']} ({split} {i})",
                                        level="Level 1")) + "\n")
    sets = ["task.name=math", f"task.source={tmp_path / 'train.jsonl'}", f"task.test_source={tmp_path / 'test.jsonl'}",
            "task.n_train=500", "task.n_test=500", "debate.agents=3", "debate.rounds=2", "finetune.iterations=1",
            "finetune.provider=tinker", "finetune.tinker.base_model=Qwen/Qwen3-8B", "serve.model=Qwen/Qwen3-8B"]
    done = cli("--config", "vllm", "--dry-run", *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(x for x in done.stdout.splitlines() if "finetune 6 models" in x)
    cost = float([c.strip() for c in row.split("│") if c.strip()][-1])
    assert cost > 0 and "$0.44/1M" in done.stdout
    # A self-hosted server charges nothing per token.
    local = cli("--config", "vllm", "--dry-run", *[a for s in sets for a in ("--set", s)],
                "--set", "finetune.tinker.base_url=http://127.0.0.1:8000")
    row = next(x for x in local.stdout.splitlines() if "finetune 6 models" in x)
    assert float([c.strip() for c in row.split("│") if c.strip()][-1]) == 0


def _request(tmp_path: Path, base_model: str = "base"):
    from harness.providers.base import FinetuneRequest

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": CRITIC}) + "\n")
    return FinetuneRequest(training_file=data, base_model=base_model,
                           metadata={"harness_run": "t", "iteration": "1", "role": "generator", "agent": "0"})


def test_unreachable_server_fails_before_any_job_is_written(tmp_path):
    import asyncio

    from harness.errors import FinetuneError
    from harness.providers.tinker_ft import TinkerProvider
    from harness.providers.tinker_settings import TinkerSettings
    from harness.testing.tinker_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    provider = TinkerProvider(tmp_path / "run", TinkerSettings(base_url=url, base_model="m"), base_names={"base"},
                              max_lora_rank=8)
    with pytest.raises(FinetuneError, match="cannot reach the Tinker service.*finetune.tinker.base_url"):
        asyncio.run(provider.submit(_request(tmp_path)))
    assert not (tmp_path / "run" / "tinker-jobs").exists()


# ----------------------------------------------------------------------------- the real server

def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(reason + " (HARNESS_REQUIRE_TINKER=1)")
    pytest.skip(reason)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from harness.testing.tinker_server import tinker_python, tinker_server

    if tinker_python() is None:
        _unavailable("no .venv-tinker; create it with .ci/setup-tinker.sh")
    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        _unavailable("no .venv-vllm; create it with .ci/setup-vllm.sh")
    from harness.models import ModelError, fetch

    try:
        model = fetch("smollm2")
    except ModelError as e:
        _unavailable(f"SmolLM2 could not be fetched: {e}")
    with tinker_server(model, tmp_path_factory.mktemp("tinker-server")) as srv:
        yield srv


def _free_port() -> int:
    from harness.testing.tinker_server import free_port

    return free_port()


@pytest.fixture(scope="module")
def run_dir(server, tmp_path_factory) -> Path:
    """One iteration of the smollm2 preset with finetune.provider=tinker, killed (the loop and
    one training process) once a job has checkpointed, then resumed to the end."""
    work = tmp_path_factory.mktemp("tinker-run")
    port = _free_port()
    # Sizes for a CI machine: 2 agents (4 models), 6 problems (every model gets data at this seed),
    # short replies; every datum padded to one length so the server compiles once (~2 minutes on
    # a CPU); a checkpoint after every step, so the kill lands between two.
    sets = ["finetune.provider=tinker", f"finetune.tinker.base_url={server.base_url}",
            f"finetune.tinker.base_model={server.base_model}", "finetune.tinker.checkpoint_every=1",
            "finetune.tinker.max_length=256", "finetune.tinker.pad_to=256", "finetune.tinker.learning_rate=5e-4",
            "finetune.tinker.max_parallel_jobs=4", "finetune.tinker.request_timeout_s=900",
            "debate.agents=2", "task.n_train=6", "task.n_test=4", "sampling.max_tokens=48",
            "finetune.min_examples=1", "finetune.hyperparameters.batch_size=2", "finetune.hyperparameters.n_epochs=2",
            f"serve.port={port}", f"endpoint.base_url=http://127.0.0.1:{port}/v1"]
    run = work / "run"
    args = [sys.executable, "-m", "harness.loop", "--config", "smollm2", "--run-dir", str(run),
            *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "COLUMNS": "200"}
    with open(work / "first.log", "wb") as log:
        loop = subprocess.Popen(args, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
        victim = _wait_for_checkpoint(run, loop, deadline=time.monotonic() + 1200)
        loop.send_signal(signal.SIGTERM)  # the user stops the loop; its jobs keep running
        loop.wait(timeout=300)
    launch = json.loads((victim / "launch.json").read_text())
    os.killpg(launch["pid"], signal.SIGKILL)  # and one training process dies mid-job
    done = run_cli("harness.loop", "--resume", str(run), cwd=work, timeout=1500)
    assert done.returncode == 0, (work / "first.log").read_text()[-3000:] + done.stdout[-4000:] + done.stderr[-3000:]
    (run / "victim").write_text(victim.name)
    return run


def _wait_for_checkpoint(run: Path, loop: subprocess.Popen, deadline: float) -> Path:
    while time.monotonic() < deadline:
        for state in sorted((run / "tinker-jobs").glob("*/tinker.json")) if (run / "tinker-jobs").exists() else []:
            data = json.loads(state.read_text())
            total = json.loads((state.parent / "status.json").read_text()).get("total_steps") or 0
            if data.get("checkpoint") and not data.get("final_state") and data["step"] < total:
                return state.parent
        assert loop.poll() is None, "the loop ended before any Tinker job checkpointed"
        time.sleep(1)
    raise AssertionError("no Tinker job checkpointed in time")


def _entries(run: Path) -> list[dict]:
    return [e for e in json.loads((run / "registry.json").read_text())["entries"] if e["iteration"] == 1]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_loop_trains_2n_adapters_on_the_real_server_and_debates_with_them(run_dir, server):
    from safetensors.torch import load_file

    entries = _entries(run_dir)
    assert sorted((e["role"], e["agent"]) for e in entries) == [("critic", 0), ("critic", 1),
                                                                ("generator", 0), ("generator", 1)]
    assert all(e["status"] == "succeeded" and e["provider"] == "tinker" for e in entries), entries
    jobs = sorted((run_dir / "tinker-jobs").iterdir())
    assert len(jobs) == 4  # one job per model: the killed one continued in its own directory
    runs = set()
    for job in jobs:
        spec, state = json.loads((job / "spec.json").read_text()), json.loads((job / "tinker.json").read_text())
        assert spec["service_model"] == server.base_model  # every adapter is a LoRA of the one base
        runs.update(state["training_runs"])
    assert len(runs) == 5  # four training runs at the service, plus the killed job's continuation
    # 2N distinct adapters, each the agent's own.
    weights = {e["model_id"]: load_file(str(run_dir / "tinker-jobs" / e["job_id"] / "adapter" /
                                            "adapter_model.safetensors")) for e in entries}
    names = sorted(weights)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert any(not weights[a][k].equal(weights[b][k]) for k in weights[a]), (a, b)
    # The next iteration's debate used exactly these adapters, served by vLLM.
    served = {e["model_id"] for e in entries}
    used = {m for r in _records(run_dir / "iter-1" / "debate-test.jsonl") for a in r["agents"] for m in a["models"]}
    assert used == served
    calls = {json.loads(line)["model"] for line in (run_dir / "usage.jsonl").read_text().splitlines()}
    assert served <= calls


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_loss_falls_and_weight_zero_tokens_carry_none(run_dir):
    for e in _entries(run_dir):
        steps = _records(run_dir / "tinker-jobs" / e["job_id"] / "progress.jsonl")
        first = [s["loss"] for s in steps if s["epoch"] == 0]
        second = [s["loss"] for s in steps if s["epoch"] == 1]
        assert first and second and sum(second) / len(second) < sum(first) / len(first), (e["model_id"], steps)
        # The service computed no loss on any weight-0 token (prompts, padding, the critic's first turn)...
        assert all(s["weight0_loss"] == 0.0 and 0 < s["weighted_tokens"] < s["tokens"] for s in steps)
    # ... and a critic's weight-0 first answer is among those tokens: the weighted count of its
    # file's examples is only the final turns'.
    critic = next(e for e in _entries(run_dir) if e["role"] == "critic")
    lines = _records(run_dir / critic["data_path"])
    assert all(m.get("weight") == 0 for ex in lines for m in ex["messages"] if m["role"] == "assistant"
               and m is not ex["messages"][-1])


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_killed_job_continues_from_its_checkpoint_and_trains_no_step_twice(run_dir):
    victim = run_dir / "tinker-jobs" / (run_dir / "victim").read_text()
    steps = [s["step"] for s in _records(victim / "progress.jsonl")]
    total = json.loads((victim / "status.json").read_text())["total_steps"]
    assert steps == list(range(1, total + 1))
    state = json.loads((victim / "tinker.json").read_text())
    assert len(state["training_runs"]) == 2 and state["final_state"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_next_iteration_starts_from_the_previous_adapter(run_dir, server):
    """start_from: previous at iteration 2: a job for the same agent begins from its iteration-1
    state, so the same data costs less at its first step than it did for the parent."""
    import asyncio

    from harness.config import Hyperparameters
    from harness.providers.base import FinetuneRequest, JobStatus
    from harness.providers.tinker_ft import TinkerProvider
    from harness.providers.tinker_settings import TinkerSettings

    parent = next(e for e in _entries(run_dir) if e["role"] == "generator")
    settings = TinkerSettings(base_url=server.base_url, base_model=server.base_model, max_length=256, pad_to=256,
                              learning_rate=5e-4)
    provider = TinkerProvider(run_dir, settings, base_names={"base"}, max_lora_rank=8)
    meta = {"harness_run": "next", "iteration": "2", "role": "generator", "agent": str(parent["agent"])}
    request = FinetuneRequest(training_file=run_dir / parent["data_path"], base_model=parent["model_id"],
                              hyperparameters=Hyperparameters(n_epochs=1, batch_size=2), metadata=meta)

    async def go():
        state = await provider.submit(request)
        return await provider.wait(state.job_id, poll_interval_s=2)

    state = asyncio.run(go())
    assert state.status is JobStatus.SUCCEEDED, state.error
    job = run_dir / "tinker-jobs" / state.job_id
    spec = json.loads((job / "spec.json").read_text())
    parent_state = json.loads((run_dir / "tinker-jobs" / parent["job_id"] / "tinker.json").read_text())
    assert spec["init_state"] == parent_state["final_state"]
    before = _records(run_dir / "tinker-jobs" / parent["job_id"] / "progress.jsonl")
    after = _records(job / "progress.jsonl")
    mean = lambda xs: sum(s["loss"] for s in xs) / len(xs)  # noqa: E731
    assert mean(after) < mean([s for s in before if s["epoch"] == 0])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_base_model_the_server_does_not_train_is_refused_with_its_list(server, tmp_path):
    import asyncio

    from harness.errors import FinetuneError
    from harness.providers.tinker_ft import TinkerProvider
    from harness.providers.tinker_settings import TinkerSettings

    provider = TinkerProvider(tmp_path / "run", TinkerSettings(base_url=server.base_url, base_model="Qwen/Qwen3-8B"),
                              base_names={"base"}, max_lora_rank=8)
    with pytest.raises(FinetuneError, match=f"does not train 'Qwen/Qwen3-8B'.*serves: {server.base_model}"):
        asyncio.run(provider.submit(_request(tmp_path)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_registry_is_rebuilt_from_the_providers_job_list(run_dir, tmp_path):
    import asyncio
    import shutil

    from harness.config import load_config
    from harness.identity import establish
    from harness.providers.tinker_ft import TinkerProvider

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.safetensors", "cache.sqlite*"))
    before = {(e["role"], e["agent"]): e["model_id"] for e in _entries(run_dir)}
    (copy / "registry.json").unlink()
    cfg = load_config(str(copy / "config.yaml"))
    _, registry, notes = asyncio.run(establish(cfg, copy, TinkerProvider.from_config(cfg, copy)))
    rebuilt = {(e.role, e.agent): e.model_id for e in registry.entries if e.iteration == 1 and e.status == "succeeded"}
    assert rebuilt == before and any("tinker" in note or "registered" in note for note in notes), notes
