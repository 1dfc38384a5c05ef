"""The `subprocess` runner: each job is a process on this machine, in a session of its own, so
killing the loop does not kill it (like a hosted job it keeps going, and a resumed loop adopts it
by the pid in launch.json).

GPUs: with `finetune.local.devices: [0, 1, 2, 3]` each job gets one device of its own through
CUDA_VISIBLE_DEVICES (processes_per_job of them for a job of several processes, e.g. "0,1"),
and no more jobs run at once than there are devices (sets of devices) -- unless
`share_devices: true`, which lets up to max_parallel_jobs run, spread evenly over the devices.
Which device a running job holds is read back from the launch records, so the assignment
survives a restart of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

from harness.providers.runners import (RESIDENT_MODULE, TRAIN_MODULE, JobRunner, Launch, LaunchFailed, Liveness, Probe,
                                       harness_env, train_command, write_launch)


def names_job(args: list[str], job_dir: Path) -> bool:
    """Whether a command line carries exactly `--job-dir <job_dir>`. A substring test is not
    enough: job "...-1" is a prefix of job "...-10", whose process would pass for it."""
    want = str(job_dir)
    return f"--job-dir={want}" in args or any(a == "--job-dir" and b == want for a, b in zip(args, args[1:]))


def alive(pid: int | None, job_dir: Path) -> bool:
    """True while the job's own process runs. Checks /proc where there is one, so a zombie
    (exited, not yet reaped) or a recycled pid of another program does not count as alive."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            return False
        return state != "Z" and names_job(args, job_dir)
    if Path("/proc/self").exists():
        return False
    try:  # no /proc (macOS): signal 0 only tells whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SubprocessRunner(JobRunner):
    name = "subprocess"

    def __init__(self, cfg, python: str, module: str = TRAIN_MODULE):
        super().__init__(cfg, python, module)
        self.devices = [str(d) for d in cfg.devices] if cfg.devices is not None else None
        self._procs: dict[Path, asyncio.subprocess.Process] = {}  # launched by this instance

    def slots(self, active: list[Launch]) -> int:
        limit = self.cfg.max_parallel_jobs
        if self.devices is not None and not self.cfg.share_devices:
            limit = min(limit, len(self.devices) // self.cfg.processes_per_job)  # one job per GPU (set)
        return max(0, limit - len(active))

    def pick_device(self, active: list[Launch]) -> str | None:
        """The GPU(s) of a new job, processes_per_job of them ("0,1" for two): devices no running job
        holds; when sharing, the least busy ones (first listed wins ties)."""
        if self.devices is None:
            return None
        used = Counter(d for launch in active if launch.devices is not None for d in launch.devices.split(","))
        ranked = sorted(self.devices, key=lambda d: (used[d], self.devices.index(d)))
        picked = set(ranked[:self.cfg.processes_per_job])
        return ",".join(d for d in self.devices if d in picked)  # listed order: rank i gets the i-th

    async def launch(self, job_dir: Path, active: list[Launch], previous: Launch | None = None) -> Launch:
        device = self.pick_device(active)
        env = {**os.environ, **harness_env()}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        with open(job_dir / "train.log", "ab") as log:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *train_command(self.python, job_dir, self.module), stdout=log, stderr=asyncio.subprocess.STDOUT,
                    env=env, start_new_session=True)
            except OSError as e:
                raise LaunchFailed(f"could not start {self.python}: {e}") from None
        self._procs[job_dir] = proc
        # Not status.json: the job writes that from its first instant, and a read-then-write
        # here could overwrite its "running" or even its final status with a stale "running".
        launch = Launch(runner="subprocess", pid=proc.pid, devices=device)
        write_launch(job_dir, launch)
        return launch

    async def launch_group(self, job_dirs: list[Path], active: list[Launch]) -> Launch:
        """Start ONE resident trainer process for several LoRA jobs (harness.providers.resident_train)
        and write the same launch record, with the group's job ids, in every job's folder. Its
        command line carries each `--job-dir DIR` pair, so `alive` recognises it for every job.
        Its output goes to the first job's train.log; the others' logs say where to look."""
        device = self.pick_device(active)
        env = {**os.environ, **harness_env()}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        first = job_dirs[0]
        command = [self.python, "-m", RESIDENT_MODULE, *[a for d in job_dirs for a in ("--job-dir", str(d))]]
        if self.cfg.threads is not None:
            # The cores the jobs would have had as separate processes (max_parallel_jobs of them
            # at `threads` each) go to the one process that now trains them all: a thread each
            # would leave all but one of those cores idle.
            command += ["--threads", str(self.cfg.threads * min(self.cfg.max_parallel_jobs, len(job_dirs)))]
        for other in job_dirs[1:]:
            with open(other / "train.log", "a", encoding="utf-8") as log:
                log.write(f"trained in one resident process with {len(job_dirs) - 1} other job(s); its log: "
                          f"{first / 'train.log'}\n")
        with open(first / "train.log", "ab") as log:
            try:
                proc = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                            env=env, start_new_session=True)
            except OSError as e:
                raise LaunchFailed(f"could not start {self.python}: {e}") from None
        launch = Launch(runner="subprocess", pid=proc.pid, devices=device, group=[d.name for d in job_dirs])
        for job_dir in job_dirs:
            self._procs[job_dir] = proc
            write_launch(job_dir, launch)
        return launch

    async def probe(self, job_dir: Path, launch: Launch) -> Probe:
        if alive(launch.pid, job_dir):
            return Probe(Liveness.RUNNING)
        proc = self._procs.pop(job_dir, None)
        if proc is not None:  # reap our own finished child while this event loop still runs
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            return Probe(Liveness.ENDED, f"exit code {proc.returncode}" if proc.returncode is not None else None)
        return Probe(Liveness.ENDED)

    async def stop(self, job_dir: Path, launch: Launch) -> None:
        pid = launch.pid
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            if not alive(pid, job_dir):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait_s
            while alive(pid, job_dir) and time.monotonic() < deadline:
                proc = self._procs.get(job_dir)
                if proc is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(proc.wait(), 0.2)
                else:
                    await asyncio.sleep(0.2)
        await self.probe(job_dir, launch)  # reaps it if it was ours

    def where(self, launch: Launch) -> str:
        return f"pid {launch.pid}" + (f", CUDA_VISIBLE_DEVICES={launch.devices}" if launch.devices is not None else "")
