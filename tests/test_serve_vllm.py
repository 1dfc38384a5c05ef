"""The vLLM path against a real vLLM CPU server (its own environment, .venv-vllm) serving a tiny
random model, with LoRA adapters trained by the local provider. The tiny model's answers are
noise: these tests check plumbing (adapters load, requests reach the adapter they name, errors
are clear), never accuracy.

Skipped when .venv-vllm is missing, unless HARNESS_REQUIRE_VLLM=1 (CI), which turns that into a
failure. Create the environment with .ci/setup-vllm.sh.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.config import LocalFinetuneConfig, ServeConfig
from harness.errors import ServeError
from harness.serve import VLLMServer, agent_base_url, check_health, list_models, load_adapters, unload_adapters
from local_processes import free_port, gone, wait_gone

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
KEY = "test-" + secrets.token_hex(8)  # the shared server's key: it answers no request without it


def tiny_serve_config(model: Path, port: int) -> ServeConfig:
    # The CPU settings from the vllm-tiny preset: 1 GiB KV cache, 30% of RAM, float32.
    return ServeConfig(model=str(model), port=port, max_lora_rank=8, max_loras=4, max_model_len=512,
                       dtype="float32", gpu_memory_utilization=0.3, python=str(VLLM_PYTHON),
                       env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout_s=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def tiny_model(vllm_python, workdir) -> Path:
    from harness.testing.tiny_model import build_tiny_model

    return build_tiny_model(workdir / "tiny-model")


@pytest.fixture(scope="module")
def adapters(tiny_model, workdir) -> dict[str, str]:
    """Two agents' adapters trained by the local provider, then made "loud" (random LoRA B) so
    that each one visibly changes the model's output: that is how a test can tell which adapter
    answered a request."""
    from harness.config import Hyperparameters
    from harness.providers.base import FinetuneRequest, JobStatus
    from harness.providers.local import LocalProvider
    from harness.testing.tiny_model import write_chat_jsonl

    provider = LocalProvider(workdir / "run", LocalFinetuneConfig(max_parallel_jobs=2),
                             base_model_path=str(tiny_model), max_lora_rank=8, base_names={"base"})

    async def train() -> dict[str, str]:
        out = {}
        states = []
        for agent in range(2):
            data = write_chat_jsonl(workdir / f"data-{agent}.jsonl", n=8)
            states.append(await provider.submit(FinetuneRequest(
                training_file=data, base_model="base", hyperparameters=Hyperparameters(n_epochs=1),
                metadata={"run": "vt", "iteration": "1", "role": "generator", "agent": str(agent)})))
        for state in states:
            done = await provider.wait(state.job_id, poll_interval_s=0.5, max_interval_s=1)
            assert done.status == JobStatus.SUCCEEDED, done.error
            out[done.model_id] = done.artifact_path
        return out

    trained = asyncio.run(train())
    import torch
    from safetensors.torch import load_file, save_file

    for seed, path in enumerate(trained.values(), start=1):
        weights = load_file(f"{path}/adapter_model.safetensors")
        gen = torch.Generator().manual_seed(seed)
        loud = {k: (torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v) for k, v in weights.items()}
        save_file(loud, f"{path}/adapter_model.safetensors")
    return trained


@pytest.fixture(scope="module")
def server(tiny_model, workdir):
    srv = VLLMServer(tiny_serve_config(tiny_model, free_port()), agents=2, log_path=workdir / "vllm.log", api_key=KEY)
    srv.start()
    try:
        asyncio.run(srv.wait_healthy())
        yield srv
    finally:
        srv.stop()
    assert srv.proc is None


async def chat(base_url: str, model: str, content: str = "What is 3+4*5?", api_key: str = KEY) -> str:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    try:
        resp = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=12)
    finally:
        await client.close()
    return resp.choices[0].message.content or ""


@pytest.mark.vllm
@pytest.mark.slow
async def test_adapters_load_route_and_unload(server, adapters, workdir):
    url = server.base_url
    names = list(adapters)
    assert await load_adapters(url, adapters, stale_prefix="vt-", api_key=KEY) == names
    listed = {m["id"]: m for m in await list_models(url, api_key=KEY)}
    assert set(names) <= set(listed) and all(listed[n]["parent"] == "base" for n in names)
    # Loading the same set again is a no-op (resume), not an error.
    assert await load_adapters(url, adapters, stale_prefix="vt-", api_key=KEY) == names

    # Greedy answers: each name gets its own adapter (outputs differ), reproducibly.
    base, a0, a1 = await asyncio.gather(chat(url, "base"), chat(url, names[0]), chat(url, names[1]))
    assert len({base, a0, a1}) == 3, (base, a0, a1)
    assert await chat(url, names[0]) == a0
    # Many concurrent requests across agents all land on the right adapter.
    many = await asyncio.gather(*(chat(url, names[i % 2]) for i in range(8)))
    assert many == [a0, a1] * 4

    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        await chat(url, "vt-it1-generator7")

    # Next iteration: only agent 0's adapter wanted; the stale one of this run is unloaded.
    await load_adapters(url, {names[0]: adapters[names[0]]}, stale_prefix="vt-", api_key=KEY)
    assert names[1] not in {m["id"] for m in await list_models(url, api_key=KEY)}
    with pytest.raises(NotFoundError):
        await chat(url, names[1])
    # A long run name: its adapter names are cut to 64 characters yet keep f"{run}-", so the
    # loop's next iteration unloads them as stale (and leaves other runs' adapters alone).
    from harness.providers.local import adapter_name

    run = "a-long-experiment-name-about-critics-and-more-0123abcd"
    long_name = adapter_name({"harness_run": run, "iteration": "12", "role": "generator", "agent": "0"})
    await load_adapters(url, {long_name: adapters[names[0]]}, unload_stale=False, api_key=KEY)
    assert long_name in {m["id"] for m in await list_models(url, api_key=KEY)}
    await load_adapters(url, {}, stale_prefix=run + "-", api_key=KEY)
    assert {m["id"] for m in await list_models(url, api_key=KEY)} == {"base", names[0]}
    await unload_adapters(url, [names[0]], api_key=KEY)
    assert {m["id"] for m in await list_models(url, api_key=KEY)} == {"base"}

    # An adapter the server refuses (rank 16 > --max-lora-rank 8) gives a clear error.
    big = workdir / "rank16"
    shutil.copytree(adapters[names[0]], big, dirs_exist_ok=True)
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["r"] = 16
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError, match=r"refused adapter 'too-big'.*") as err:
        await load_adapters(url, {"too-big": big}, api_key=KEY)
    assert "16" in str(err.value)
    server.check_alive()  # refusing an adapter does not hurt the server

    # Without its key the server answers nothing but /health: no model list, no adapter, no chat.
    from openai import AuthenticationError

    with pytest.raises(ServeError, match="HTTP 401"):
        await list_models(url)
    with pytest.raises(ServeError, match="refused to unload"):
        await unload_adapters(url, [names[0]], api_key="not-the-key")
    with pytest.raises(AuthenticationError):
        await chat(url, "base", api_key="EMPTY")
    await check_health(url)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_server_that_dies_at_startup_reports_its_log(vllm_python, workdir):
    srv = VLLMServer(tiny_serve_config(workdir / "no-such-model", free_port()), agents=1,
                     log_path=workdir / "dead.log")
    srv.start()
    # Its exit is what ends the wait; the 600 s startup limit only keeps a broken test from
    # hanging (importing vLLM once took over 300 s on a machine that was swapping).
    with pytest.raises(ServeError, match="exited with code") as err:
        await srv.wait_healthy()
    assert "last log lines" in str(err.value)
    srv.stop()


async def test_nothing_listening_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServeError, match=f"no model server answers at {url}"):
        await load_adapters(url, {"a": "/x"})
    with pytest.raises(ServeError, match="no model server answers"):
        await check_health(url)


def test_missing_vllm_install_is_a_clear_error(tmp_path):
    cfg = ServeConfig(model="/m", port=free_port(), python=sys.executable)
    with pytest.raises(ServeError, match="vLLM is not installed"):
        VLLMServer(cfg).start()
    cfg = ServeConfig(model="/m", port=free_port(), python=str(tmp_path / "nope"))
    with pytest.raises(ServeError, match="vLLM is not installed"):
        VLLMServer(cfg).start()


def fake_python(path: Path, serve: str) -> Path:
    """An "interpreter" that passes the vLLM import probe (`-c ...`) and runs `serve` (shell)
    as the server: no vLLM needed to test how the server process is started."""
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\n{serve}\n')
    path.chmod(0o755)
    return path


async def test_a_fresh_run_dir_gets_its_serve_folder_and_log(tmp_path):
    # serve.manage on a fresh run: run_dir/serve/ does not exist yet.
    log = tmp_path / "run" / "serve" / "vllm.log"
    python = fake_python(tmp_path / "python", 'echo "fake vLLM listening"; exec sleep 60')
    srv = VLLMServer(ServeConfig(model="x", port=free_port(), python=str(python)), log_path=log)
    srv.start()
    try:
        for _ in range(100):
            if log.exists() and "fake vLLM listening" in log.read_text():
                break
            await asyncio.sleep(0.05)
        assert "fake vLLM listening" in log.read_text()
        srv.check_alive()
    finally:
        srv.stop()
    assert srv.proc is None


async def test_a_server_that_exits_at_once_is_a_serve_error_with_its_log(tmp_path):
    log = tmp_path / "serve" / "vllm.log"
    python = fake_python(tmp_path / "python", 'echo "no such model: x"; exit 1')
    srv = VLLMServer(ServeConfig(model="x", port=free_port(), python=str(python)), log_path=log)
    srv.start()
    with pytest.raises(ServeError, match="exited with code 1") as err:
        await srv.wait_healthy(30)
    assert "no such model: x" in str(err.value) and str(log) in str(err.value)
    srv.stop()


def test_failures_to_start_are_serve_errors_naming_the_path(tmp_path):
    blocked = tmp_path / "serve"
    blocked.write_text("a file where the log folder should be")
    python = fake_python(tmp_path / "python", "exec sleep 60")
    srv = VLLMServer(ServeConfig(model="x", port=free_port(), python=str(python)), log_path=blocked / "vllm.log")
    with pytest.raises(ServeError, match="could not start vLLM") as err:
        srv.start()
    assert str(blocked) in str(err.value) and srv.proc is None
    # An interpreter that is not executable: a clear error, not a bare PermissionError.
    python.chmod(0o644)
    with pytest.raises(ServeError, match=str(python)):
        VLLMServer(ServeConfig(model="x", port=free_port(), python=str(python))).start()
    # An interpreter that exits 1 for everything: vLLM reads as missing.
    with pytest.raises(ServeError, match="vLLM is not installed"):
        VLLMServer(ServeConfig(model="x", port=free_port(), python="/bin/false"),
                   log_path=tmp_path / "new" / "serve" / "vllm.log").start()


def test_command_line_carries_scaling_settings():
    cfg = ServeConfig(model="org/model", tensor_parallel_size=2, data_parallel_size=4, extra_args=["--seed", "1"])
    cmd = VLLMServer(cfg, agents=3).command()
    joined = " ".join(cmd)
    assert "--tensor-parallel-size 2" in joined and "--data-parallel-size 4" in joined
    assert "--enable-lora" in cmd and "--max-loras 6" in joined and cmd[-2:] == ["--seed", "1"]
    urls = ["http://a/v1", "http://b/v1"]
    assert [agent_base_url(urls, n) for n in range(3)] == ["http://a/v1", "http://b/v1", "http://a/v1"]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)  # LoRA training on CPU, then the local embedder and one-at-a-time scoring
async def test_one_full_iteration_on_the_tiny_preset(server, tiny_model, tmp_path, monkeypatch):
    """debate -> data -> LoRA jobs -> adapters loaded -> debate with the adapters, through the
    loop, against the real server. The loop attaches to the running server (serve.manage false)
    and loads the society's adapters itself before each debate."""
    import io

    from rich.console import Console

    import harness.loop as loop
    from harness.config import load_config
    from harness.fileio import read_jsonl
    from harness.records import DebateRecord, RunSummary
    from harness.registry import Registry

    # The server requires its key: the loop sends it (chats, adapters, scoring) from the environment.
    monkeypatch.setenv("TINY_VLLM_KEY", KEY)
    cfg = load_config("vllm-tiny", [f"serve.model={tiny_model}", "serve.manage=false", "endpoint.api_key_env=TINY_VLLM_KEY",
                                    f"endpoint.base_url={server.base_url}", "task.n_train=16", "task.n_test=6"])
    run_dir = tmp_path / "run"
    summary = await loop.run_loop(cfg, run_dir, Console(file=io.StringIO()))
    assert isinstance(summary, RunSummary) and summary.finished
    assert [it.iteration for it in summary.iterations] == [0, 1]
    assert files_holding(run_dir, KEY) == []  # sent with every request, written nowhere

    registry = Registry.load(run_dir / "registry.json")
    trained = {e.model_id for e in registry.entries if e.iteration == 1 and e.status == "succeeded"}
    assert trained, [(e.role, e.agent, e.status, e.note, e.error) for e in registry.entries]
    served = {m["id"]: m for m in await list_models(server.base_url, api_key=KEY)}
    assert trained <= set(served), "the loop loaded every trained adapter into the server"

    # Iteration 0 debated with the base model; iteration 1 with the adapters, by name, per agent.
    used0 = {m for r in read_jsonl(run_dir / "iter-0" / "debate-test.jsonl", DebateRecord) for t in r.agents for m in t.models}
    assert used0 == {"base"}
    records = read_jsonl(run_dir / "iter-1" / "debate-test.jsonl", DebateRecord)
    assert len(records) == 6
    used = {m for r in records for t in r.agents for m in t.models}
    assert trained <= used
    # Each reply names the model vLLM says produced it, and each adapter was probed as applied.
    assert all(t.served == t.models for r in records for t in r.agents)
    from harness.probes import AdapterProbes

    probes = AdapterProbes.model_validate_json((run_dir / "iter-1" / "adapter-probes.json").read_bytes())
    assert {p.adapter for p in probes.probes} == trained and {p.verdict for p in probes.probes} == {"applied"}
    # Noise answers: some do not parse; they are counted (as wrong), never dropped.
    metrics = summary.iterations[1].splits["test"]
    assert metrics.n == 6 and 0.0 <= metrics.unparsed_rate <= 1.0
    # Diversity on the vLLM path, by default: embeddings from the local model, and the
    # log-probability measures (zero KL at iteration 0, where every agent is the base model).
    from harness.diversity import DiversityMetrics

    div = [DiversityMetrics.model_validate_json((run_dir / f"iter-{k}" / "diversity.json").read_text())
           for k in (0, 1)]
    assert all(d.embedding_model == "local:all-MiniLM-L6-v2" and d.embedding_dissimilarity is not None for d in div)
    assert div[0].kl_between_generators == 0.0 and div[0].kl_generators_vs_base == 0.0, div[0].notes
    assert div[1].heldout_critic_nll is not None and div[1].kl_generators_vs_base is not None, div[1].notes
    await unload_adapters(server.base_url, sorted(trained), api_key=KEY)


@pytest.mark.vllm
async def test_logprob_diversity_measures_score_real_adapters(server, adapters, tmp_path):
    """The held-out-critic NLL and the KL estimates against the real server, through the
    LLMClient: exactly zero KL when every agent is the base model, finite and non-zero once the
    agents are different adapters; every scoring request is in usage.jsonl."""
    from harness.config import EndpointConfig, SamplingConfig
    from harness.diversity import compute_diversity
    from harness.llm import LLMClient
    from records_factory import make_record

    names = sorted(adapters)
    await load_adapters(server.base_url, adapters, stale_prefix="vt-", api_key=KEY)
    records = [make_record(f"p{i}", "3", [["3", "3"], ["2", "2"]]) for i in range(2)]

    async def measure(models: list[str], run_dir: Path):
        for r in records:
            for t, model in zip(r.agents, models):
                t.models = [model, model]
        async with LLMClient(base_url=server.base_url, api_key=KEY, run_dir=run_dir, sampling=SamplingConfig(),
                             endpoint=EndpointConfig(kind="vllm", api_key_env=None, max_retries=0)) as client:
            # One scoring request at a time: vLLM 0.32's CPU LoRA kernel fails on batched prompt_logprobs.
            return await compute_diversity(records, iteration=1, split="test", client=client, logprobs=True,
                                           base_model="base", logprob_concurrency=1)

    same = await measure(["base", "base"], tmp_path / "same")
    assert same.logprob_problems == 2, same.notes
    assert same.kl_between_generators == 0.0 and same.kl_between_critics == 0.0
    assert same.kl_generators_vs_base == 0.0 and same.kl_critics_vs_base == 0.0
    assert 0 < same.heldout_critic_nll < 50  # nats per token of random text under a random model

    apart = await measure(names, tmp_path / "apart")
    values = [apart.kl_between_generators, apart.kl_between_critics, apart.kl_generators_vs_base,
              apart.heldout_critic_nll]
    assert all(v is not None and v == v and abs(v) > 1e-6 for v in values), (values, apart.notes)
    assert len(apart.kl_generators_vs_base_per_agent) == 2
    usage = [json.loads(line) for line in (tmp_path / "apart" / "usage.jsonl").read_text().splitlines()]
    scored = [u for u in usage if u["purpose"] == "score"]
    assert scored and all(u["prompt_tokens"] for u in scored if not u["cached"])
    server.check_alive()


def fake_vllm_python(path: Path) -> Path:
    """An interpreter whose `-m vllm...` runs tests/fake_vllm.py: a server answering /health with
    the port and CUDA_VISIBLE_DEVICES its process sees."""
    return fake_python(path, f'exec {sys.executable} {Path(__file__).parent / "fake_vllm.py"} "$@"')


async def test_replicas_get_consecutive_ports_and_gpus_of_their_own(tmp_path):
    """serve.replicas: 2 with tensor_parallel_size 2 and four devices: two managed servers on
    port and port+1, GPUs 4,5 and 6,7, both registered as the run's URLs, both stopped after."""
    import httpx2

    from harness.config import RunConfig
    from harness.serve import serving

    base = free_port()
    while True:  # two free ports in a row
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", base + 1)) != 0:
                break
        base = free_port()
    python = fake_vllm_python(tmp_path / "python")
    cfg = RunConfig.model_validate({
        "endpoint": {"kind": "vllm"}, "models": {"base": "base"},
        "serve": {"model": "x", "manage": True, "port": base, "replicas": 2, "tensor_parallel_size": 2,
                  "devices": [4, 5, 6, 7], "python": str(python), "startup_timeout_s": 60}})
    async with serving(cfg, tmp_path / "run") as (urls, _key):
        assert urls == [f"http://127.0.0.1:{base}/v1", f"http://127.0.0.1:{base + 1}/v1"]
        async with httpx2.AsyncClient() as client:
            seen = [(await client.get(url.replace("/v1", "/health"))).json() for url in urls]
    assert [(s["port"], s["cuda_visible_devices"]) for s in seen] == [(base, "4,5"), (base + 1, "6,7")]
    assert all(s["lora_updating"] == "True" for s in seen)
    for s in seen:  # stopped with the run
        assert not Path(f"/proc/{s['pid']}").exists() or "Z" in Path(f"/proc/{s['pid']}/stat").read_text().split()[2]
    logs = sorted(p.name for p in (tmp_path / "run" / "serve").iterdir())
    assert logs == ["vllm-0.log", "vllm-1.log"]
    assert f"listening on 127.0.0.1:{base + 1}" in (tmp_path / "run" / "serve" / "vllm-1.log").read_text()


def files_holding(root: Path, secret: str) -> list[Path]:
    return [f for f in root.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]


async def test_a_managed_server_answers_only_its_run(tmp_path):
    """serving() starts its server with a key of the run's own: /v1 requests without it are
    refused (401), the run's client gets it, and it is in no file of the run directory nor on
    the server's command line (which every local user can read)."""
    import httpx2

    from harness.config import RunConfig
    from harness.serve import serving

    cfg = RunConfig.model_validate({
        "endpoint": {"kind": "vllm"}, "models": {"base": "base"},
        "serve": {"model": "x", "manage": True, "port": free_port(), "python": str(fake_vllm_python(tmp_path / "py")),
                  "startup_timeout_s": 60}})
    async with serving(cfg, tmp_path / "run") as (urls, key):
        async with httpx2.AsyncClient() as client:
            assert (await client.get(f"{urls[0]}/models")).status_code == 401
            assert (await client.get(f"{urls[0]}/models", headers={"Authorization": "Bearer x"})).status_code == 401
            seen = (await client.get(f"{urls[0]}/models", headers={"Authorization": f"Bearer {key}"})).json()
            assert (await client.get(urls[0].replace("/v1", "/health"))).status_code == 200
        assert seen["api_key_required"] and len(key) >= 32
        assert key not in Path(f"/proc/{seen['pid']}/cmdline").read_text()
        await load_adapters(urls[0], {}, api_key=key)  # the adapter calls send it
        with pytest.raises(ServeError, match="HTTP 401"):
            await load_adapters(urls[0], {})
    async with serving(cfg, tmp_path / "run") as (_, second):
        assert second != key  # a new key for each run (and each resumed session)
    assert (tmp_path / "run" / "serve" / "vllm.log").exists()
    assert files_holding(tmp_path / "run", key) == [] and files_holding(tmp_path / "run", second) == []


def test_the_serve_command_requires_the_key_it_is_given(tmp_path):
    """`VLLM_API_KEY=... python -m harness.serve`: the server refuses requests without that key,
    and the key is not printed."""
    import urllib.error
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "harness.serve", "--model", "x", "--port", str(port),
           "--python", str(fake_vllm_python(tmp_path / "py"))]
    proc = subprocess.Popen(cmd, env={**os.environ, "VLLM_API_KEY": "the-owners-key"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("serving"):
                break
        assert "for clients sending $VLLM_API_KEY" in line
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert refused.value.code == 401
        keyed = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                       headers={"Authorization": "Bearer the-owners-key"})
        assert urllib.request.urlopen(keyed, timeout=10).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate()
    assert proc.returncode == 0 and "the-owners-key" not in out


def test_a_managed_server_dies_with_its_owner_even_when_the_owner_is_killed(tmp_path):
    """SIGKILL leaves a process no chance to stop its server: the server must end by itself
    (it once lived on, orphaned with parent PID 1, holding its port and memory)."""
    import urllib.request

    port = free_port()
    owner = f"""
import asyncio, sys, time
from harness.config import ServeConfig
from harness.serve import VLLMServer
srv = VLLMServer(ServeConfig(model="x", port={port}, python={str(fake_vllm_python(tmp_path / "py"))!r}))
srv.start()
asyncio.run(srv.wait_healthy(60))
print("healthy", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "healthy"
        pid = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10))["pid"]
        assert not gone(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_gone(pid), f"the server {pid} outlived its owner"
    finally:
        proc.kill()
        proc.wait()


def test_a_second_interrupt_while_stopping_still_stops_the_server(tmp_path):
    """A Ctrl-C (or another `kill`) while stop() waits for the server to exit used to abort the
    stop and forget the server; now it kills the server at once, then interrupts."""
    python = fake_python(tmp_path / "py", "trap '' TERM; echo $$ > " + str(tmp_path / "pid") + "; exec sleep 600")
    srv = VLLMServer(ServeConfig(model="x", port=free_port(), python=str(python)))
    srv.start()
    while not ((tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip()):
        srv.check_alive()
        time.sleep(0.05)
    pid = int((tmp_path / "pid").read_text())

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, interrupt)
    try:
        # The "second Ctrl-C" arrives while stop() waits for the server, which ignores SIGTERM.
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(KeyboardInterrupt):
            srv.stop(timeout=120)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert srv.proc is None and wait_gone(pid)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_stops_the_managed_server_with_the_run(tiny_model, tmp_path):
    """`kill PID` of a run that started its own vLLM server stops that server too (as Ctrl-C
    does), instead of leaving it running on its own, holding memory and the port. While it runs,
    the server refuses requests without the run's key, and that key is in no file of the run."""
    import urllib.error
    import urllib.request

    import psutil

    port = free_port()
    args = [sys.executable, "-m", "harness.loop", "--config", "vllm-tiny", "--run-dir", str(tmp_path / "r"),
            "--set", f"serve.model={tiny_model}", "--set", f"serve.port={port}",
            "--set", f"endpoint.base_url=http://127.0.0.1:{port}/v1", "--set", f"serve.python={VLLM_PYTHON}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # only so that a broken server cannot hang the test
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()
    (server,) = [c for c in psutil.Process(proc.pid).children() if "vllm.entrypoints" in " ".join(c.cmdline())]
    key = server.environ()["VLLM_API_KEY"]
    assert key not in " ".join(server.cmdline())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    assert refused.value.code == 401
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate()
    assert proc.returncode == 130, out
    assert "interrupted" in out and f"--resume {tmp_path / 'r'}" in out
    assert wait_gone(server.pid), "the server outlived the run that was killed"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server's port is still open"
    assert files_holding(tmp_path / "r", key) == []
