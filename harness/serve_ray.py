"""The society's vLLM servers as Ray jobs (`serve.manage: true`, `serve.runner: ray`).

Each of `serve.replicas` servers is a Ray job (Job Submission API) whose entrypoint is the same
vLLM command a local server runs, listening on `serve.ray.bind_host`, port `serve.port + i`, with
`serve.ray.num_gpus_per_server` GPUs (default tensor x data parallel size) reserved by Ray, which
places it on a node that has them and sets CUDA_VISIBLE_DEVICES. Once Ray runs it, the server is
reached at http://<its node's IP>:<port>/v1; the loop waits for /health, loads every adapter on
every server and spreads the agents over them, and stops the jobs at the end (Ctrl-C included).
The servers listen on every interface of their node, so each requires the run's own key (see
harness.serve.serving).
vLLM must be installed on the nodes (`serve.python`, e.g. an environment on shared storage).

The submission ids are kept in <run>/serve/ray-servers.json before submitting: servers left
behind by a loop that was killed outright are stopped by the next start (or by
`python -m harness.jobs RUN_DIR --stop`), so no server job is orphaned for long. Each server's
log is copied to <run>/serve/vllm-<i>.log when it stops.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
import time
from pathlib import Path

import httpx2
from pydantic import BaseModel, Field

from harness.config import ServeConfig
from harness.errors import ServeError
from harness.fileio import write_atomic, write_model
from harness.raycluster import RUNNING, RayCluster
from harness.serve_process import VLLMServer, replica_configs

RECORD = "ray-servers.json"


class RayServerRecord(BaseModel):
    """<run>/serve/ray-servers.json: the Ray jobs serving this run, written before they are submitted."""

    address: str | None = None
    submission_ids: list[str] = Field(default_factory=list)
    started_at: float = Field(default_factory=time.time)


def stop_recorded(state_dir: Path, address: str | None) -> list[str]:
    """Stop the server jobs recorded in state_dir (left by a loop killed outright); returns their ids."""
    path = state_dir / RECORD
    if not path.exists():
        return []
    record = RayServerRecord.model_validate_json(path.read_text(encoding="utf-8"))
    cluster = RayCluster(record.address or address, field="serve.ray.address", error=ServeError)
    stopped = []
    for sid in record.submission_ids:
        job = cluster.job(sid)
        if job is not None and not job.terminal:
            cluster.stop(sid)
            stopped.append(sid)
    write_model(path, RayServerRecord(address=record.address))
    return stopped


class RayServers:
    def __init__(self, serve: ServeConfig, *, agents: int, log_path: Path | None, api_key: str | None = None,
                 lora: bool = True):
        self.serve = serve
        self.ray = serve.ray
        self.cluster = RayCluster(self.ray.address, field="serve.ray.address", error=ServeError)
        self.state_dir = log_path.parent if log_path is not None else None
        self.log_path = log_path
        configs = [c.model_copy(update={"host": self.ray.bind_host}) for c in replica_configs(serve)]
        self.servers = [VLLMServer(c, agents=agents, lora=lora) for c in configs]  # their commands; Ray runs them
        self.api_key = api_key
        self.ids: list[str] = []
        self.urls: list[str] = []

    @property
    def gpus(self) -> float:
        if self.ray.num_gpus_per_server is not None:
            return self.ray.num_gpus_per_server
        return float(self.serve.tensor_parallel_size * self.serve.data_parallel_size)

    def commands(self) -> list[list[str]]:
        return [s.command() for s in self.servers]

    def start(self) -> None:
        self.cluster.client()
        if self.state_dir is not None:
            stop_recorded(self.state_dir, self.ray.address)
        if self.ray.check_resources:
            self.cluster.check_fits({"GPU": self.gpus, "CPU": self.ray.num_cpus_per_server}, what="one vLLM server",
                                    fields="serve.ray.num_gpus_per_server / num_cpus_per_server")
        token = secrets.token_hex(4)
        name = self.state_dir.parent.name if self.state_dir is not None else "serve"
        self.ids = [f"harness-serve-{name}-{token}-{i}" for i in range(len(self.servers))]
        if self.state_dir is not None:  # first: a loop killed from here on leaves a record to stop them by
            write_model(self.state_dir / RECORD, RayServerRecord(address=self.ray.address, submission_ids=self.ids))
        # The run's key last: no runtime_env of the user's replaces it. Ray keeps the job's
        # environment on the cluster, never in the run directory.
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **self.serve.env}
        key = {"VLLM_API_KEY": self.api_key} if self.api_key else {}
        runtime_env = dict(self.ray.runtime_env)
        runtime_env["env_vars"] = {**env, **dict(runtime_env.get("env_vars") or {}), **key}
        for sid, server in zip(self.ids, self.servers):
            self.cluster.submit(sid, shlex.join(server.command()), num_gpus=self.gpus,
                                num_cpus=self.ray.num_cpus_per_server, runtime_env=runtime_env,
                                metadata={"harness_serve": sid})

    def _failed(self, sid: str, why: str) -> ServeError:
        tail = "\n".join(self.cluster.logs(sid).splitlines()[-15:])
        return ServeError(f"the vLLM server job {sid} on the Ray cluster at {self.cluster.where} {why}; "
                          f"last log lines:\n{tail}")

    async def wait_healthy(self) -> None:
        self.urls = list(await asyncio.gather(*(self._wait_one(sid, s.cfg.port) for sid, s in zip(self.ids, self.servers))))

    async def _wait_one(self, sid: str, port: int) -> str:
        deadline = time.monotonic() + self.serve.startup_timeout_s
        url = None
        async with httpx2.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                job = await asyncio.to_thread(self.cluster.job, sid)
                if job is None or job.terminal:
                    raise self._failed(sid, f"ended ({job.status}: {job.message})" if job else "vanished")
                if job.status == RUNNING and job.node_ip:
                    url = f"http://{job.node_ip}:{port}/v1"
                    try:
                        if (await client.get(f"http://{job.node_ip}:{port}/health")).status_code == 200:
                            return url
                    except httpx2.TransportError:
                        pass
                await asyncio.sleep(1.0)
        raise self._failed(sid, f"was not healthy at {url or '(not yet placed on a node)'} within "
                                f"{self.serve.startup_timeout_s:.0f} s (serve.startup_timeout_s)")

    def check_alive(self) -> None:
        for sid in self.ids:
            job = self.cluster.job(sid)
            if job is None or job.terminal:
                raise self._failed(sid, f"ended ({job.status}: {job.message})" if job else "vanished")

    def stop(self) -> None:
        ids, self.ids = self.ids, []
        for i, sid in enumerate(ids):
            try:
                self.cluster.stop(sid)
            except ServeError:
                continue  # the cluster is gone: its jobs went with it
            if self.log_path is not None:
                write_atomic(self.log_path.with_name(f"{self.log_path.stem}-{i}{self.log_path.suffix}"),
                             self.cluster.logs(sid))
        if ids and self.state_dir is not None:
            write_model(self.state_dir / RECORD, RayServerRecord(address=self.ray.address))
