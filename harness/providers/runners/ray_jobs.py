"""The `ray` runner: each job is a Ray job, submitted through Ray's Job Submission API with
`python -m harness.providers.local_train --job-dir DIR` as its entrypoint and the GPUs/CPUs of
`finetune.local.ray` (Ray places it on a node that has them and sets CUDA_VISIBLE_DEVICES); a
job of processes_per_job > 1 asks for at least that many GPUs and starts its ranks there.

The job directory must be on storage every node mounts at the same path
(`finetune.local.jobs_dir`): the job reads its spec and writes its status and adapter there. The
submission id, `harness-<job id>`, is written to launch.json *before* the job is submitted, so a
loop killed at any point finds the job again: a submission that never reached Ray is made under
the same id, and one that did is adopted (Ray refuses a second job under an id). The job's log,
which Ray keeps, is copied into DIR/train.log as the job runs.

Ray jobs, like hosted jobs and subprocess jobs, keep running when the loop stops; a resumed loop
adopts them, and `python -m harness.jobs RUN_DIR --stop` stops those of an abandoned run.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

from harness.errors import FinetuneError
from harness.fileio import write_atomic
from harness.providers.runners import (JobRunner, Launch, Liveness, Probe, harness_env, train_command,
                                       write_launch)
from harness.raycluster import PENDING, RUNNING, RayCluster, RayJob

CACHE_S = 1.0  # one status request per job per second, however many jobs the provider polls


def merged_runtime_env(user: dict, env: dict[str, str]) -> dict:
    """The user's runtime_env with `env` under its env_vars (the user's own env_vars win)."""
    out = dict(user)
    out["env_vars"] = {**env, **dict(user.get("env_vars") or {})}
    return out


class RayRunner(JobRunner):
    name = "ray"

    def __init__(self, cfg, python: str):
        super().__init__(cfg, python)
        self.ray = cfg.ray
        self.cluster = RayCluster(self.ray.address, field="finetune.local.ray.address", error=FinetuneError)
        self._cache: dict[str, tuple[float, RayJob | None]] = {}
        self._checked = False

    async def check(self) -> None:
        if self._checked:
            return
        await asyncio.to_thread(self.cluster.client)
        if self.ray.check_resources:
            await asyncio.to_thread(
                self.cluster.check_fits, {"GPU": self.cfg.ray_gpus(), "CPU": self.ray.num_cpus_per_job},
                what="one finetuning job", fields="finetune.local.ray.num_gpus_per_job / num_cpus_per_job")
        self._checked = True

    @staticmethod
    def submission_id(job_dir: Path) -> str:
        # Job ids carry the run's unique id, so two runs on one cluster never share one.
        return f"harness-{job_dir.name}"

    async def launch(self, job_dir: Path, active: list[Launch], previous: Launch | None = None) -> Launch:
        await self.check()
        sid = previous.submission_id if previous and previous.submission_id else self.submission_id(job_dir)
        launch = Launch(runner="ray", submission_id=sid, address=self.ray.address)
        write_launch(job_dir, launch)  # first: a launch cut short is completed under this id, never doubled
        env = harness_env(inherit_path=False)
        await asyncio.to_thread(
            self.cluster.submit, sid, shlex.join(train_command(self.python, job_dir)),
            num_gpus=self.cfg.ray_gpus(), num_cpus=self.ray.num_cpus_per_job,
            runtime_env=merged_runtime_env(self.ray.runtime_env, env), metadata={"harness_job": job_dir.name})
        self._cache.pop(sid, None)
        return launch

    async def _job(self, sid: str) -> RayJob | None:
        now = time.monotonic()
        cached = self._cache.get(sid)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1]
        job = await asyncio.to_thread(self.cluster.job, sid)
        self._cache[sid] = (time.monotonic(), job)
        return job

    async def probe(self, job_dir: Path, launch: Launch) -> Probe:
        job = await self._job(launch.submission_id or self.submission_id(job_dir))
        if job is None:
            return Probe(Liveness.MISSING, f"the Ray cluster at {self.cluster.where} has no job "
                                           f"{launch.submission_id} (was it restarted?)")
        if job.status == PENDING:
            need = [f"{n:g} {what}" for n, what in ((self.cfg.ray_gpus(), "GPU"), (self.ray.num_cpus_per_job, "CPU")) if n]
            return Probe(Liveness.PENDING, "pending on Ray" + (f": waiting for {' and '.join(need)}" if need else ""))
        if job.status == RUNNING:
            return Probe(Liveness.RUNNING, f"on Ray node {job.node_ip}" if job.node_ip else None)
        return Probe(Liveness.ENDED, f"Ray job {job.submission_id} {job.status}" + (f": {job.message}" if job.message else ""))

    async def stop(self, job_dir: Path, launch: Launch) -> None:
        sid = launch.submission_id or self.submission_id(job_dir)
        await asyncio.to_thread(self.cluster.stop, sid)
        self._cache.pop(sid, None)

    async def collect_logs(self, job_dir: Path, launch: Launch, *, final: bool = False) -> None:
        if launch.logs_final or not launch.submission_id:
            return
        job = await self._job(launch.submission_id)
        if final and job is not None and not job.terminal:
            # The job wrote its last status and is exiting: wait (briefly) for Ray to see it end,
            # so the copy holds the log's last lines.
            for _ in range(20):
                await asyncio.sleep(0.5)
                self._cache.pop(launch.submission_id, None)
                job = await self._job(launch.submission_id)
                if job is None or job.terminal:
                    break
        text = await asyncio.to_thread(self.cluster.logs, launch.submission_id)
        if text:
            write_atomic(job_dir / "train.log", text)
        if job is None or job.terminal:
            launch.logs_final = True
            write_launch(job_dir, launch)

    def where(self, launch: Launch) -> str:
        return f"Ray job {launch.submission_id} at {launch.address or self.cluster.where}"
