"""Fully finetuned agents (finetune.local.full_finetune) served by vLLM: one managed server per
model, placed on its own port and GPUs, started before an iteration's debates and stopped before
its finetuning and at the end (harness.serve_pool).

The mechanics (ports, GPUs, which server is kept, stopped, recorded) against tests/fake_vllm.py;
the whole loop against real vLLM CPU servers with the tiny random model (and SmolLM2, slow),
checking from each server's own log that each agent's replies came from its own model, and that
a loop killed outright with servers up leaves none behind and resumes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import RunConfig, load_config
from harness.serve_full import serving_plan_note
from harness.serve_pool import RECORD, ModelPool, ServerEvent
from local_processes import gone, wait_gone

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def free_ports(n: int) -> int:
    """The first of n consecutive free ports on 127.0.0.1."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        ok = True
        for p in range(base + 1, base + n):
            with socket.socket() as s:
                ok = ok and s.connect_ex(("127.0.0.1", p)) != 0
        if ok:
            return base


def events(run_dir: Path) -> list[ServerEvent]:
    path = run_dir / "serve" / RECORD
    if not path.exists():
        return []
    return [ServerEvent.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def servers_of(run_dir: Path) -> list[int]:
    """PIDs of vLLM processes whose command line names this run's folders (weights or logs)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm.entrypoints" in cmd and str(run_dir) in cmd:
            out.append(p.info["pid"])
    return out


def fake_python(path: Path) -> Path:
    """An interpreter that passes the vLLM import probe and runs tests/fake_vllm.py as the server."""
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\n'
                    f'exec {sys.executable} {Path(__file__).parent / "fake_vllm.py"} "$@"\n')
    path.chmod(0o755)
    return path


# ----------------------------------------------------------------------------- mechanics (fake vLLM)

async def test_each_model_gets_a_server_and_gpus_of_its_own_kept_while_needed(tmp_path):
    """Two models, tensor_parallel_size 2, GPUs 4..7: a server each on port and port+1 with GPUs
    4,5 and 6,7, no LoRA, served under the model's name. Asked next for one of them and a third
    model, the pool keeps the first's server, stops the other and starts the third in the freed
    slot; stop_all ends them all, and servers.jsonl holds each start (with its seconds) and stop."""
    import httpx2

    port = free_ports(2)
    cfg = RunConfig.model_validate({
        "endpoint": {"kind": "vllm"}, "models": {"base": "base"},
        "debate": {"agents": 2, "rounds": 1}, "analysis": {"likelihood": False},
        "finetune": {"provider": "local", "iterations": 1, "local": {"full_finetune": True}},
        "serve": {"model": str(tmp_path / "base"), "manage": True, "port": port, "tensor_parallel_size": 2,
                  "devices": [4, 5, 6, 7], "python": str(fake_python(tmp_path / "py")), "startup_timeout_s": 60}})
    pool = ModelPool(cfg, tmp_path / "run")
    assert pool.urls == [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"]

    async def seen(url: str) -> dict:
        async with httpx2.AsyncClient() as client:
            return (await client.get(url.replace("/v1", "/health"))).json()

    first = await pool.serve({"a": "/w/a", "b": "/w/b"})
    assert first == {"a": pool.urls[0], "b": pool.urls[1]}
    a, b = await seen(first["a"]), await seen(first["b"])
    assert (a["port"], a["cuda_visible_devices"]) == (port, "4,5")
    assert (b["port"], b["cuda_visible_devices"]) == (port + 1, "6,7")
    cmd = Path(f"/proc/{a['pid']}/cmdline").read_text().split("\0")
    assert cmd[cmd.index("--model") + 1] == "/w/a" and cmd[cmd.index("--served-model-name") + 1] == "a"
    assert "--enable-lora" not in cmd  # a whole model: no adapter slots reserved

    second = await pool.serve({"b": "/w/b", "c": "/w/c"})
    assert second == {"b": pool.urls[1], "c": pool.urls[0]}
    assert wait_gone(a["pid"]), "the server of a model no longer needed was stopped"
    assert (await seen(second["b"]))["pid"] == b["pid"], "the server of a model still needed was kept"
    c = await seen(second["c"])
    pool.stop_all()
    assert wait_gone(b["pid"]) and wait_gone(c["pid"])
    log = [(e.event, e.model, e.slot) for e in events(tmp_path / "run")]
    assert sorted(log[:2]) == [("started", "a", 0), ("started", "b", 1)]
    assert log[2:] == [("stopped", "a", 0), ("started", "c", 0), ("stopped", "c", 0), ("stopped", "b", 1)]
    assert all(e.seconds is not None and e.seconds >= 0 for e in events(tmp_path / "run") if e.event == "started")
    assert (tmp_path / "run" / "serve" / "models" / "c" / "vllm.log").exists()


def test_the_dry_run_says_how_many_servers_and_gpus(tmp_path):
    """--dry-run of a full finetune on vLLM: servers and GPUs of the busiest iteration, and the
    start time measured here."""
    out = subprocess.run([sys.executable, "-m", "harness.loop", "--config", "vllm", "--dry-run",
                          "--set", "finetune.local.full_finetune=true", "--set", "debate.agents=3",
                          "--set", "serve.tensor_parallel_size=2", "--set", "task.name=arithmetic"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    # 3 generators + 3 critics + the base model (summarizer and likelihood reference) = 7 servers
    assert "iteration 1 needs up to 7 vLLM servers at once (14 GPUs, 2 per server" in text
    assert "serves the base model (1 server" in text and "servers.jsonl" in text
    assert "local full-finetuning jobs" in text  # not "LoRA jobs"
    assert serving_plan_note(load_config("vllm")) is None  # LoRA adapters: one server, as before


# ----------------------------------------------------------------------------- the loop on real vLLM

@pytest.fixture(scope="module")
def tiny_model(vllm_python, tmp_path_factory) -> Path:
    from harness.testing.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("full") / "tiny-model")


def loop_args(preset: str, model: str, run_dir: Path, port: int, *extra: str, agents: int = 2) -> list[str]:
    # N agents x 1 round: iteration 1 serves the N finetuned generators (no critics, no summary),
    # with the likelihood measures off (they would serve the base model beside them).
    sets = [f"serve.model={model}", f"serve.port={port}", f"endpoint.base_url=http://127.0.0.1:{port}/v1",
            f"serve.python={VLLM_PYTHON}", "finetune.local.full_finetune=true", f"debate.agents={agents}",
            "debate.rounds=1", "analysis.likelihood=false", "finetune.local.threads=1", *extra]
    return [sys.executable, "-m", "harness.loop", "--config", preset, "--run-dir", str(run_dir),
            *[a for s in sets for a in ("--set", s)]]


def check_own_models(run_dir: Path, agents: int) -> None:
    """Iteration 1's replies: agent n asked its own finetuned model, whose server (weights: that
    agent's job folder) logged exactly as many answered chat requests as the agent has replies (a
    server restarted after a kill: its last life answered no more than that, all lives no fewer)."""
    from harness.fileio import read_jsonl
    from harness.records import DebateRecord
    from harness.registry import Registry

    registry = Registry.load(run_dir / "registry.json")
    gens = {e.agent: e for e in registry.entries if e.iteration == 1 and e.role == "generator"}
    assert sorted(gens) == list(range(agents)) and all(e.status == "succeeded" for e in gens.values()), gens
    records = read_jsonl(run_dir / "iter-1" / "debate-test.jsonl", DebateRecord)
    started = {e.model: e for e in events(run_dir) if e.event == "started"}
    assert set(started) == {"base", *(e.model_id for e in gens.values())}
    urls = set()
    for agent, entry in gens.items():
        replies = [m for r in records for m in r.agents[agent].models]
        assert replies and set(replies) == {entry.model_id}
        server = started[entry.model_id]
        # its weights: the whole model this agent's own job wrote (not an adapter, not the base)
        assert Path(server.weights) == (run_dir / "local-jobs" / entry.job_id / "model").resolve()
        assert (Path(server.weights) / "config.json").exists()
        log = (run_dir / "serve" / "models" / entry.model_id / "vllm.log").read_text(errors="replace")
        # one segment per server lifetime (the log is appended to when a resumed run restarts it)
        lives = [len(re.findall(r'"POST /v1/chat/completions HTTP/1.1" 200', seg))
                 for seg in log.split("Application startup complete.")[1:]]
        if len(lives) == 1:
            assert lives[0] == len(replies), (entry.model_id, lives, len(replies))
        else:  # a killed run: replies answered before the kill but not yet saved are asked again
            assert sum(lives) >= len(replies) >= lives[-1], (entry.model_id, lives, len(replies))
        urls.add(server.url)
    assert len(urls) == agents, "each finetuned model had a server of its own"
    weights = {started[e.model_id].weights for e in gens.values()}
    assert len(weights) == agents and started["base"].weights not in weights


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_finetune_loop_serves_each_agent_its_own_model_and_survives_a_kill(tiny_model, tmp_path):
    """The loop with full finetuning on the tiny model: iteration 0 on the base model's server,
    2 agents finetuned in full, iteration 1 on 2 servers, one per finetuned model. SIGKILLed while
    those servers are up, the loop leaves none behind (the launcher's PDEATHSIG); resumed, it
    finishes, and every server it started is stopped."""
    run_dir = tmp_path / "run"
    port = free_ports(2)
    args = loop_args("vllm-tiny", str(tiny_model), run_dir, port, "task.n_train=8", "task.n_test=4")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 1200  # only keeps a broken run from hanging the test
    up: list[ServerEvent] = []
    while proc.poll() is None and time.monotonic() < deadline:
        up = [e for e in events(run_dir) if e.event == "started" and e.model != "base"]
        if len(up) == 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None and len(up) == 2, proc.stdout.read() if proc.poll() is not None else up
    pids = [pid for e in up for pid in e.pids]
    assert pids and not any(gone(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert all(wait_gone(p) for p in pids), "a finetuned model's server outlived the loop that was killed"

    resumed = subprocess.run([sys.executable, "-m", "harness.loop", "--resume", str(run_dir)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and [it["iteration"] for it in summary["iterations"]] == [0, 1]
    check_own_models(run_dir, agents=2)
    assert all(wait_gone(p) for e in events(run_dir) for p in e.pids)
    assert servers_of(run_dir) == [] and servers_of(tiny_model.parent) == []
    log = [(e.event, e.model) for e in events(run_dir)]
    tuned = sorted(e.model for e in up)
    # The resumed session started only iteration 1's servers: iteration 0 was finished, so its
    # base-model server was not started again. The killed session's 2 servers were never
    # recorded as stopped (they died with it); the resumed session's were.
    assert log[:2] == [("started", "base"), ("stopped", "base")]
    assert sorted(m for _, m in log[2:4]) == tuned and {e for e, _ in log[2:4]} == {"started"}
    assert sorted(log[4:6]) == [("started", m) for m in tuned]
    assert sorted(log[6:]) == [("stopped", m) for m in tuned]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_full_finetune_loop_on_smollm2(vllm_python, tmp_path):
    """The real small model SmolLM2-135M (cached by harness.models), finetuned in full and served
    from the weights its job wrote. One agent: the tiny model's test above checks that each of
    several agents gets a server of its own; this one that a real architecture makes the trip."""
    from harness.models import MODELS

    assert "smollm2" in MODELS
    run_dir = tmp_path / "run"
    port = free_ports(2)
    args = loop_args("smollm2", "harness:smollm2", run_dir, port, "task.n_train=6", "task.n_test=4",
                     "finetune.min_examples=1", "finetune.hyperparameters.n_epochs=1",
                     "finetune.local.max_length=256", "finetune.local.device=cpu", "sampling.max_tokens=32",
                     agents=1)
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=2300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_own_models(run_dir, agents=1)
    assert all(wait_gone(p) for e in events(run_dir) for p in e.pids)
    assert servers_of(run_dir) == []



def test_in_process_scoring_of_full_finetunes_is_turned_off_with_a_reason():
    """The transformers likelihood backend loads LoRA adapters onto the base; fully finetuned
    agents would fail there mid-run, so the measures are off with a note naming the fix."""
    from harness.diversity.local_scoring import likelihood_backend

    backend, why = likelihood_backend(load_config("smollm2", ["finetune.local.full_finetune=true"]))
    assert backend is None and "analysis.likelihood_backend=vllm" in why
    assert likelihood_backend(load_config("smollm2"))[0] == "transformers"  # adapters: as before
