"""Proof that every adapter is served (harness/probes.py): after adapters are loaded, each one
scores a fixed text next to the base model, and the run stops when one scores like the base.

Fast tests run against the simulator on 127.0.0.1 (its /v1/completions gives prompt
log-probabilities; `simulator.unapplied_adapters` makes a server that loads an adapter and answers
as the base). Slow ones against a real vLLM CPU server: a trained adapter passes, one whose LoRA B
is all zeros (PEFT's initial state) is caught."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest

from harness.config import EndpointConfig, SamplingConfig, SimulatorConfig
from harness.errors import AdapterNotApplied
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.probe_settings import AdapterProbeConfig
from harness.probes import AdapterProbes, probe_adapters
from harness.records import DebateRecord
from harness.serve import load_adapters
from harness.sim.server import SimServer
from harness.testing.sim_process import simulator_process

CHAT_LINE = {"messages": [{"role": "user", "content": "What is 2+3*4?"},
                          {"role": "assistant", "content": "3*4 = 12, so 2 + 12 = 14. The answer is \\boxed{14}."}]}


def adapter_dir(path: Path, *, trained: bool = True) -> Path:
    """An adapter folder the simulator loads: with a training file its parameters (and scores)
    move away from the base model's; without one it is the base model under another name."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    if trained:
        (path / "train.jsonl").write_text("\n".join(json.dumps(CHAT_LINE) for _ in range(20)) + "\n")
    return path


def client_for(urls: list[str], run_dir: Path) -> LLMClient:
    return LLMClient(base_url=urls, api_key="sk-test", run_dir=run_dir, sampling=SamplingConfig(),
                     endpoint=EndpointConfig(kind="vllm", api_key_env=None, max_retries=0))


async def test_a_trained_adapter_passes_and_an_unapplied_one_stops_naming_it(tmp_path):
    # Server a (`python -m harness.sim --unapplied-adapters 'dead-*'`) loads dead-* but answers as the base.
    with simulator_process("--unapplied-adapters", "dead-*") as a_url, SimServer(SimulatorConfig()) as b:
        urls = [a_url, b.base_url]
        adapters = {"run-g0": adapter_dir(tmp_path / "g0"), "dead-g1": adapter_dir(tmp_path / "g1")}
        for url in urls:
            await load_adapters(url, adapters)
        out = tmp_path / "run" / "iter-1" / "adapter-probes.json"
        async with client_for(urls, tmp_path / "run") as client:
            with pytest.raises(AdapterNotApplied) as caught:
                await probe_adapters(client, urls, "sim-base", sorted(adapters), settings=AdapterProbeConfig(),
                                     iteration=1, out_path=out)
    message = str(caught.value)
    # Only the first server fails to apply it; the message names adapter, server, measure and way out.
    assert "adapter 'dead-g1' is not applied by the server at " + a_url in message
    assert "max |Δ logprob| 0 " in message and "serve.probe.enabled=false" in message
    assert b.base_url not in message
    record = AdapterProbes.model_validate_json(out.read_bytes())
    verdicts = {(p.adapter, p.server): p.verdict for p in record.probes}
    assert verdicts == {("run-g0", a_url): "applied", ("dead-g1", a_url): "not_applied",
                        ("run-g0", b.base_url): "applied", ("dead-g1", b.base_url): "applied"}
    trained = [p for p in record.probes if p.verdict == "applied"]
    assert all(p.tokens > 20 and 1e-3 < p.max_abs_delta <= 0.05 and p.base_noise == 0 for p in trained)
    # Every probe is a call of the run, in usage.jsonl: base, 2 adapters, base again, per server.
    usage = [json.loads(line) for line in (tmp_path / "run" / "usage.jsonl").read_text().splitlines()]
    probes = [u for u in usage if u["purpose"] == "probe"]
    assert len(probes) == 8 and not any(u["cached"] for u in probes)
    assert sorted({u["model"] for u in probes}) == ["dead-g1", "run-g0", "sim-base"]


async def test_probes_are_sent_again_after_a_reload_and_replace_the_earlier_ones(tmp_path):
    """An adapter reloaded under the same name is probed afresh (never from the cache), and the
    iteration's file keeps the latest probe of each adapter."""
    with SimServer(SimulatorConfig()) as server:
        out = tmp_path / "run" / "iter-1" / "adapter-probes.json"
        settings = AdapterProbeConfig()
        async with client_for([server.base_url], tmp_path / "run") as client:
            await load_adapters(server.base_url, {"run-g0": adapter_dir(tmp_path / "v1")})
            first = await probe_adapters(client, [server.base_url], "sim-base", ["run-g0"], settings=settings,
                                         iteration=1, out_path=out)
            # Retrained into a folder without training data: the simulator's base model, renamed.
            await load_adapters(server.base_url, {"run-g0": adapter_dir(tmp_path / "v2", trained=False)})
            with pytest.raises(AdapterNotApplied, match="'run-g0'"):
                await probe_adapters(client, [server.base_url], "sim-base", ["run-g0"], settings=settings,
                                     iteration=1, out_path=out)
    assert first.probes[0].verdict == "applied"
    record = AdapterProbes.model_validate_json(out.read_bytes())
    assert [(p.adapter, p.verdict) for p in record.probes] == [("run-g0", "not_applied")]


# ----------------------------------------------------------------------------- through the loop

FAKE_TRAINER = '''#!{python}
"""Stands in for `python -m harness.providers.local_train --job-dir DIR` (or resident_train with several): an "adapter" folder
holding the job's training file, which the simulator turns into a finetuned model."""
import json, os, shutil, sys, time
from pathlib import Path
if sys.argv[1] == "-c":
    sys.exit(0)
# Every --job-dir: the resident trainer (the default on one device) gets an iteration's jobs at once.
jobs = [Path(b) for a, b in zip(sys.argv, sys.argv[1:]) if a == "--job-dir"]
for job in jobs:
    spec = json.loads((job / "spec.json").read_text())
    out = job / "adapter"
    out.mkdir(exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({{"peft_type": "LORA", "r": 8}}))
    shutil.copyfile(spec["training_file"], out / "train.jsonl")
    status = json.loads((job / "status.json").read_text()) if (job / "status.json").exists() else {{}}
    status.update(status="succeeded", pid=os.getpid(), started_at=time.time(), finished_at=time.time(),
                  artifact_path=str(out), updated_at=time.time())
    # Atomically, as local_train does: the loop polls status.json while this writes it.
    (job / "status.json.tmp").write_text(json.dumps(status))
    os.replace(job / "status.json.tmp", job / "status.json")
'''


def loop_args(url: str, tmp_path: Path) -> list[str]:
    trainer = tmp_path / "fake-python"
    trainer.write_text(FAKE_TRAINER.format(python=sys.executable))
    trainer.chmod(0o755)
    sets = [f"endpoint.base_url={url}", "serve.manage=false", f"serve.model={tmp_path}", "models.base=sim-base",
            f"finetune.local.python={trainer}", "analysis.embedding_model=sim-embed", "analysis.likelihood=false",
            "task.n_train=12", "task.n_test=4", "sampling.max_tokens=256"]
    return ["--config", "vllm-tiny", *[a for s in sets for a in ("--set", s)]]


def test_the_loop_stops_when_the_server_does_not_apply_an_adapter_and_resumes_once_it_does(cli, tmp_path):
    run_dir = tmp_path / "run"
    sim_cfg = SimulatorConfig(unapplied_adapters=["*generator1*"])
    with SimServer(sim_cfg) as server:
        stopped = cli(*loop_args(server.base_url, tmp_path), "--run-dir", str(run_dir))
        out = stopped.stdout + stopped.stderr
        assert stopped.returncode == 1, out
        assert "Traceback" not in out, out
        assert "generator1" in out and "is not applied by the server at" in out and server.base_url in out
        record = AdapterProbes.model_validate_json((run_dir / "iter-1" / "adapter-probes.json").read_bytes())
        verdicts = {p.adapter: p.verdict for p in record.probes}
        assert [v for a, v in verdicts.items() if "generator1" in a] == ["not_applied"]
        assert {v for a, v in verdicts.items() if "generator1" not in a} == {"applied"}
        assert not (run_dir / "iter-1" / "debate-test.jsonl").exists()  # nobody debated as the base in disguise

        sim_cfg.unapplied_adapters = []  # the server's operator fixes it
        resumed = cli("--resume", str(run_dir))
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = AdapterProbes.model_validate_json((run_dir / "iter-1" / "adapter-probes.json").read_bytes())
    assert {p.verdict for p in record.probes} == {"applied"} and len(record.probes) == len(verdicts)
    # Each reply names the model that produced it: the base at iteration 0, the adapters after.
    for k in (0, 1):
        for r in read_jsonl(run_dir / f"iter-{k}" / "debate-test.jsonl", DebateRecord):
            for t in r.agents:
                assert t.served == t.models
    served1 = {m for r in read_jsonl(run_dir / "iter-1" / "debate-test.jsonl", DebateRecord)
               for t in r.agents for m in t.served}
    assert served1 == set(verdicts) | ({"sim-base"} & served1)


def test_old_debate_records_without_served_models_still_load():
    line = {"iteration": 0, "split": "test", "problem": {"id": "p", "task": "arithmetic", "question": "1+1", "gold": "2"},
            "agents": [{"agent": 0, "models": ["base"], "messages": [], "answers": ["2"], "correct": [True]}],
            "round_votes": [{"answer": "2", "count": 1, "n_voters": 1, "classes": [], "tie": False, "tie_rule": "x"}],
            "correct": True}
    assert DebateRecord.model_validate(line).agents[0].served == []


def test_probe_settings_are_checked_at_load(cli):
    bad = cli("--dry-run", "--config", "vllm", "--set", "serve.model=x", "--set", "serve.probe.tolerance=-1")
    assert bad.returncode == 2 and "serve.probe.tolerance" in bad.stdout + bad.stderr


# ----------------------------------------------------------------------------- a real vLLM server

@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_vllm_a_trained_adapter_passes_and_an_untrained_one_is_caught(vllm_python, tmp_path):
    """The tiny model on vLLM's CPU build, served by `python -m harness.serve` with two adapters:
    one the local provider trained for one epoch moves the text's log-probabilities by ~1e-2
    nats; a fresh PEFT LoRA (B all zeros, what a job that never stepped leaves) is loaded without
    complaint by the server and scores exactly like the base. The command prints both verdicts,
    names the untrained one in its error, exits 1 and leaves no server behind."""
    import socket
    import subprocess

    from local_processes import free_port

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.config import Hyperparameters, LocalFinetuneConfig
    from harness.providers.base import FinetuneRequest, JobStatus
    from harness.providers.local import LocalProvider
    from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl

    model = build_tiny_model(tmp_path / "tiny")
    provider = LocalProvider(tmp_path / "jobs", LocalFinetuneConfig(threads=1), base_model_path=str(model),
                             max_lora_rank=8, base_names={"base"})

    async def train() -> str:
        state = await provider.submit(FinetuneRequest(
            training_file=write_chat_jsonl(tmp_path / "data.jsonl", n=8), base_model="base",
            hyperparameters=Hyperparameters(n_epochs=1),
            metadata={"run": "pr", "iteration": "1", "role": "generator", "agent": "0"}))
        done = await provider.wait(state.job_id, poll_interval_s=0.5, max_interval_s=1)
        assert done.status == JobStatus.SUCCEEDED, done.error
        return done.artifact_path

    trained = asyncio.run(train())
    untrained = tmp_path / "untrained"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                   LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).save_pretrained(untrained)

    port = free_port()
    out = subprocess.run([sys.executable, "-m", "harness.serve", "--config", "vllm-tiny", "--set", f"serve.model={model}",
                          "--set", f"serve.python={vllm_python}", "--port", str(port), "--log", str(tmp_path / "vllm.log"),
                          "--adapters", f"pr-trained={trained}", f"pr-untrained={untrained}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 1, out.stdout + out.stderr
    verdicts = {m[0]: (m[1], float(m[2])) for m in
                re.findall(r"probe (pr-\w+) at \S+: (applied|not applied) \(max \|Δ logprob\| ([0-9.e+-]+) ", out.stdout)}
    assert verdicts.keys() == {"pr-trained", "pr-untrained"}, out.stdout
    assert verdicts["pr-trained"][0] == "applied" and verdicts["pr-trained"][1] > 1e-3, out.stdout
    assert verdicts["pr-untrained"] == ("not applied", 0.0), out.stdout
    print(f"trained adapter: max |Δ| {verdicts['pr-trained'][1]:.3g}")
    assert "adapter 'pr-untrained' is not applied" in out.stderr and "max |Δ logprob| 0 " in out.stderr
    assert "Traceback" not in out.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server outlived the command"
