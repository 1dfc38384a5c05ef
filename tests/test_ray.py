"""The `ray` job runner and Ray-managed vLLM servers against a real Ray cluster: a one-node head
(CPU only) that these tests start in namespaces of its own (harness/testing/ray_cluster.py),
reached over its Job Submission API on the namespace's 127.0.0.1, and ended with every process
in it. What runs inside the cluster's namespace (the loop, `python -m harness.jobs`, small driver
scripts) runs there as a user on the head node would run it; the assertions read what the
cluster says (its job list) and what the run directory holds.

Skipped when Ray is not installed, unless HARNESS_REQUIRE_RAY=1 (CI), which turns that into a
failure; the full iteration also needs the vLLM CPU environment (.venv-vllm).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from harness.config import LocalFinetuneConfig, ServeConfig
from harness.errors import FinetuneError, ServeError
from harness.providers.base import FinetuneRequest
from harness.testing.ray_cluster import ADDRESS, NamespacedRay, missing
from local_processes import free_port

REPO = Path(__file__).resolve().parent.parent


def require_ray() -> None:
    """Skip when Ray or the namespace tools are missing -- a failure under HARNESS_REQUIRE_RAY=1 (CI)."""
    why = missing()
    if why is not None:
        if os.environ.get("HARNESS_REQUIRE_RAY") == "1":
            pytest.fail(why + " (HARNESS_REQUIRE_RAY=1)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def cluster():
    require_ray()
    ray = NamespacedRay(num_cpus=3).start()
    try:
        yield ray
    finally:
        ray.stop()
    assert not Path(f"/proc/{ray.pid}").exists(), "the cluster's namespace outlived the test"


def script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def sleeper(path: Path) -> Path:
    """An "interpreter" whose training job runs until it is stopped."""
    path.write_text("#!/bin/sh\nexec sleep 600\n")
    path.chmod(0o755)
    return path


def fake_vllm(path: Path) -> Path:
    """An "interpreter" whose `-m vllm...` is tests/fake_vllm.py (answers /health with what it sees)."""
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / "fake_vllm.py"} "$@"\n')
    path.chmod(0o755)
    return path


# ----------------------------------------------------------------------------- without a cluster

async def test_an_unreachable_cluster_is_a_clear_error(tmp_path):
    require_ray()
    from harness.providers.local import LocalProvider
    from harness.serve_ray import RayServers

    url = f"http://127.0.0.1:{free_port()}"
    cfg = LocalFinetuneConfig(runner="ray", ray={"address": url})
    provider = LocalProvider(tmp_path / "run", cfg, base_model_path="/m", base_names={"base"})
    request = FinetuneRequest(training_file=tmp_path / "x.jsonl", base_model="base",
                              metadata={"run": "t", "iteration": "1", "role": "critic", "agent": "0"})
    with pytest.raises(FinetuneError, match=rf"cannot reach the Ray cluster at {url} \(finetune.local.ray.address\)") as e:
        await provider.submit(request)
    assert "ray start --head" in str(e.value)
    assert not (tmp_path / "run" / "local-jobs").exists(), "nothing is written for a job that cannot be submitted"
    servers = RayServers(ServeConfig(model="x", runner="ray", ray={"address": url}), agents=2,
                         log_path=tmp_path / "serve" / "vllm.log")
    with pytest.raises(ServeError, match=rf"cannot reach the Ray cluster at {url} \(serve.ray.address\)"):
        servers.start()


# ----------------------------------------------------------------------------- a real cluster

RAY_KEY = "ray-test-key-5f0c9a"  # a key of a "run"; real runs make a random one (harness.serve.serving)


@pytest.mark.slow
def test_resources_abandoned_runs_and_ray_managed_servers(cluster, tmp_path):
    """On the cluster: a job asking for a GPU the cluster lacks is refused, naming what it has;
    jobs and two Ray-managed servers left behind by a loop killed outright are listed and
    stopped by `python -m harness.jobs RUN --stop`."""
    run = tmp_path / "run"
    driver = script(tmp_path / "driver.py", f"""
        import asyncio, json, sys
        from pathlib import Path
        import httpx2
        from harness.config import RunConfig, config_to_yaml
        from harness.errors import FinetuneError, ServeError
        from harness.providers.base import FinetuneRequest
        from harness.providers.local import LocalProvider
        from harness.providers.runners import Launch, write_launch
        from harness.serve_ray import RayServers

        run = Path({str(run)!r})
        data = {{
            "name": "abandoned", "endpoint": {{"kind": "vllm"}}, "models": {{"base": "base"}},
            "finetune": {{"provider": "local", "iterations": 1, "local": {{
                "runner": "ray", "python": {str(sleeper(tmp_path / "train-python"))!r}, "max_parallel_jobs": 2,
                "ray": {{"address": "{ADDRESS}", "num_gpus_per_job": 1}}}}}},
            "serve": {{"model": "/m", "manage": True, "runner": "ray", "replicas": 2, "port": 8431,
                      "python": {str(fake_vllm(tmp_path / "vllm-python"))!r}, "startup_timeout_s": 120,
                      "env": {{"MY_SETTING": "1"}},
                      "ray": {{"address": "{ADDRESS}", "bind_host": "127.0.0.1", "num_cpus_per_server": 0,
                              "num_gpus_per_server": 1}}}}}}

        def request(agent):
            return FinetuneRequest(training_file=run / "x.jsonl", base_model="base",
                                   metadata={{"run": "t", "iteration": "1", "role": "critic", "agent": str(agent)}})

        async def main():
            cfg = RunConfig.model_validate(data)
            try:
                await LocalProvider.from_config(cfg, run).submit(request(0))
            except FinetuneError as e:
                print("JOB-REFUSED", json.dumps(str(e)))
            try:
                RayServers(cfg.serve, agents=2, log_path=run / "serve" / "vllm.log").start()
            except ServeError as e:
                print("SERVER-REFUSED", json.dumps(str(e)))
            data["finetune"]["local"]["ray"]["num_gpus_per_job"] = 0
            data["serve"]["ray"]["num_gpus_per_server"] = 0
            cfg = RunConfig.model_validate(data)
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.yaml").write_text(config_to_yaml(cfg))
            provider = LocalProvider.from_config(cfg, run)
            states = [await provider.submit(request(a)) for a in range(3)]
            print("JOBS", json.dumps([s.status.value for s in states]))
            # A loop killed after recording the third job's launch, before Ray had it: the next
            # provider submits it under the recorded id (and only once).
            third = provider.jobs_dir / states[2].job_id
            write_launch(third, Launch(runner="ray", submission_id="harness-cut-short", address="{ADDRESS}"))
            data["finetune"]["local"]["max_parallel_jobs"] = 3
            again = LocalProvider.from_config(RunConfig.model_validate(data), run)
            print("RELAUNCHED", json.dumps((await again.refresh(states[2].job_id)).status.value))
            assert (await again.submit(request(2))).job_id == states[2].job_id
            servers = RayServers(cfg.serve, agents=2, log_path=run / "serve" / "vllm.log", api_key="{RAY_KEY}")
            servers.start()
            await servers.wait_healthy()
            async with httpx2.AsyncClient() as client:
                seen = [(await client.get(u.replace("/v1", "/health"))).json() for u in servers.urls]
                keyless = [(await client.get(u + "/models")).status_code for u in servers.urls]
                keyed = [(await client.get(u + "/models", headers={{"Authorization": "Bearer {RAY_KEY}"}})).status_code
                         for u in servers.urls]
            print("SERVERS", json.dumps({{"urls": servers.urls, "seen": seen, "keyless": keyless, "keyed": keyed}}))
            # and exits without stopping anything: a loop killed outright

        asyncio.run(main())
    """)
    out = cluster.run([sys.executable, str(driver)], timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines()
             if line.split(" ", 1)[0] in ("JOB-REFUSED", "SERVER-REFUSED", "JOBS", "RELAUNCHED", "SERVERS")}
    assert "has no node with 1 GPU and 1 CPU for one finetuning job (short of GPU)" in lines["JOB-REFUSED"]
    assert "its nodes have: 127.0.0.1: 0 GPU, 3 CPU" in lines["JOB-REFUSED"]
    assert "finetune.local.ray.num_gpus_per_job" in lines["JOB-REFUSED"]
    assert "has no node with 1 GPU for one vLLM server" in lines["SERVER-REFUSED"]
    assert set(lines["JOBS"]) <= {"queued", "running"} and lines["JOBS"][2] == "queued"  # 2 at once
    servers = lines["SERVERS"]
    assert servers["urls"] == ["http://127.0.0.1:8431/v1", "http://127.0.0.1:8432/v1"]
    assert [s["port"] for s in servers["seen"]] == [8431, 8432]
    assert all(s["lora_updating"] == "True" for s in servers["seen"])
    # Listening on a cluster node, each server answers only the holder of the run's key.
    assert servers["keyless"] == [401, 401] and servers["keyed"] == [200, 200]
    assert not [f for f in run.rglob("*") if f.is_file() and RAY_KEY.encode() in f.read_bytes()]

    jobs = {j["submission_id"]: j for j in cluster.jobs() if str(tmp_path) in j["entrypoint"]}  # this test's
    training = [j for j in jobs.values() if "local_train" in j["entrypoint"]]
    serving = [j for j in jobs.values() if "vllm.entrypoints" in j["entrypoint"]]
    assert len(training) == 3 and len(serving) == 2
    assert lines["RELAUNCHED"] in ("queued", "running") and "harness-cut-short" in jobs  # submitted once, under its id
    assert all(j["status"] in ("PENDING", "RUNNING") for j in training + serving)

    listed = cluster.run([sys.executable, "-m", "harness.jobs", str(run)], cwd=REPO, env={**os.environ, "COLUMNS": "300"})
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "Ray job harness-t-it1-critic0" in listed.stdout and f"at {ADDRESS}" in listed.stdout
    assert "3 job(s) not ended" in listed.stdout and "Ray job harness-cut-short" in listed.stdout

    stopped = cluster.run([sys.executable, "-m", "harness.jobs", str(run), "--stop"], cwd=REPO, timeout=180)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.count("stopped the vLLM server job") == 2
    assert "stopped 3 job(s)" in stopped.stdout
    after = {j["submission_id"]: j["status"] for j in cluster.jobs()}
    assert all(after[sid] == "STOPPED" for sid in jobs), after
    statuses = [json.loads(p.read_text())["status"] for p in (run / "local-jobs").glob("*/status.json")]
    assert statuses == ["cancelled"] * 3
    assert not list(run.glob("local-jobs/*/adapter"))


def loop_cmd(cluster: NamespacedRay, *args: str) -> list[str]:
    return cluster.cmd([sys.executable, "-m", "harness.loop", *args], cwd=REPO)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_full_iteration_on_ray_survives_ctrl_c_and_a_killed_job(cluster, vllm_python, tmp_path):
    """The vllm-tiny preset with both runners on Ray: the vLLM CPU server is a Ray job, the
    LoRA jobs are Ray jobs. Ctrl-C while they train stops the server (no orphan) and leaves the
    training jobs running by design; one of them is then killed through Ray; the resumed loop
    adopts the others (no second submission), retries the killed one once, serves every
    adapter and debates iteration 1 with them."""
    from harness.testing.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-model")

    def mine() -> list[dict]:  # this test's jobs (the cluster is shared by the module's tests)
        return [j for j in cluster.jobs() if str(tmp_path) in j["entrypoint"]]

    run = tmp_path / "run"
    settings = [f"serve.model={model}", f"serve.python={vllm_python}", "serve.runner=ray",
                f"serve.ray.address={ADDRESS}", "serve.ray.bind_host=127.0.0.1", "serve.ray.num_gpus_per_server=0",
                "finetune.local.runner=ray", f"finetune.local.ray.address={ADDRESS}",
                "finetune.local.ray.num_gpus_per_job=0", "finetune.local.max_parallel_jobs=2",
                f"finetune.local.jobs_dir={tmp_path / 'shared'}", "task.n_train=16", "task.n_test=6"]
    args = ["--config", "vllm-tiny", "--run-dir", str(run)] + [a for s in settings for a in ("--set", s)]
    log = open(tmp_path / "loop-1.log", "w")
    loop = subprocess.Popen(loop_cmd(cluster, *args), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "200"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        running: list[dict] = []
        while not running:
            assert loop.poll() is None, (tmp_path / "loop-1.log").read_text()
            assert time.monotonic() < deadline, "no finetuning job started on Ray"
            time.sleep(2)
            running = [j for j in mine() if "local_train" in j["entrypoint"] and j["status"] == "RUNNING"]
        os.kill(cluster.inner_pid(loop), signal.SIGINT)  # Ctrl-C
        victim = running[0]["submission_id"]
        stop = cluster.run([str(Path(sys.executable).parent / "ray"), "job", "stop", "--address", ADDRESS, victim])
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert loop.wait(180) == 130
    finally:
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
            loop.wait(30)
        log.close()
    first = (tmp_path / "loop-1.log").read_text()
    assert "interrupted" in first and f"--resume {run}" in first
    jobs = mine()
    assert [j["status"] for j in jobs if "vllm.entrypoints" in j["entrypoint"]] == ["STOPPED"], \
        "Ctrl-C stops the Ray-managed server"
    assert next(j for j in jobs if j["submission_id"] == victim)["status"] == "STOPPED"

    listed = cluster.run([sys.executable, "-m", "harness.jobs", str(run)], cwd=REPO, env={**os.environ, "COLUMNS": "300"})
    assert listed.returncode == 0 and "Ray job harness-" in listed.stdout, listed.stdout + listed.stderr

    resumed = cluster.run([sys.executable, "-m", "harness.loop", "--resume", str(run)], cwd=REPO, timeout=1200,
                          env={**os.environ, "COLUMNS": "200"})
    (tmp_path / "loop-2.log").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    from harness.fileio import read_jsonl
    from harness.records import DebateRecord
    from harness.registry import Registry

    jobs = mine()
    training = [j for j in jobs if "local_train" in j["entrypoint"]]
    per_model = Counter(j["submission_id"].rsplit("-", 2)[0] for j in training)
    victim_model = victim.rsplit("-", 2)[0]
    assert per_model[victim_model] == 2, per_model  # killed, then retried once on resume
    assert all(n == 1 for name, n in per_model.items() if name != victim_model), per_model  # adopted, never resubmitted
    retry = next(j for j in training if j["submission_id"].startswith(victim_model) and j["submission_id"] != victim)
    assert retry["submission_id"].endswith("-2") and retry["status"] == "SUCCEEDED"
    assert all(j["status"] == "SUCCEEDED" for j in training if j["submission_id"] != victim)
    servers = [j for j in jobs if "vllm.entrypoints" in j["entrypoint"]]
    assert [j["status"] for j in servers] == ["STOPPED", "STOPPED"], "one server per loop session, each stopped"

    registry = Registry.load(run / "registry.json")
    entries = [e for e in registry.entries if e.iteration == 1]
    assert entries and all(e.status in ("succeeded", "kept") for e in entries), [(e.role, e.agent, e.status, e.error) for e in entries]
    trained = {e.model_id for e in entries if e.status == "succeeded"}
    assert len(trained) == len(per_model)
    used = {m for r in read_jsonl(run / "iter-1" / "debate-test.jsonl", DebateRecord) for t in r.agents for m in t.models}
    assert trained <= used, "iteration 1 debated with every trained adapter, served by the Ray-managed server"
    # Job logs are reachable from the run directory (local-jobs links to the shared jobs folder).
    assert (run / "local-jobs").is_symlink()
    killed_log = (run / "local-jobs" / victim.removeprefix("harness-") / "train.log").read_text()
    assert "Running entrypoint" in killed_log
    retry_log = (run / "local-jobs" / retry["submission_id"].removeprefix("harness-") / "train.log").read_text()
    assert "succeeded" in retry_log.splitlines()[-1]
    assert (run / "serve" / "vllm-0.log").read_text().count("Running entrypoint") == 1
    left = cluster.run(["ps", "-eo", "args"]).stdout
    assert "vllm.entrypoints" not in left and "local_train" not in left, left
