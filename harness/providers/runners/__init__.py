"""Where a local finetuning job's process runs: the seam between the local provider (job
directories, specs, statuses: harness/providers/local.py) and the machinery that starts, watches
and stops `python -m harness.providers.local_train --job-dir DIR`.

- `subprocess` (runners/subprocesses.py): a process on this machine, in its own session, with
  one GPU per job from `finetune.local.devices` if given;
- `ray` (runners/ray_jobs.py): a job on a Ray cluster, submitted through Ray's Job Submission
  API with the GPUs/CPUs of `finetune.local.ray`.

A runner owns DIR/launch.json (the `Launch` record: how to find the job's process again); the job
owns DIR/status.json. Both live on disk, so a resumed loop finds every job it started.
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

import harness
from harness.config import LocalFinetuneConfig
from harness.errors import FinetuneError
from harness.fileio import write_model

LAUNCH = "launch.json"


class Launch(BaseModel):
    """DIR/launch.json: written by the runner when it starts a job, never by the job."""

    runner: Literal["subprocess", "ray"] = "subprocess"
    pid: int | None = None  # subprocess: the job's process (and its process group)
    devices: str | None = None  # subprocess: the CUDA_VISIBLE_DEVICES it was given (None: untouched)
    submission_id: str | None = None  # ray: the Ray job's submission id
    address: str | None = None  # ray: the cluster's dashboard address at submission
    launched_at: float = Field(default_factory=time.time)
    logs_final: bool = False  # ray: train.log holds the ended job's whole log
    # subprocess, resident trainer: the job ids (folder names) sharing this one process, this one
    # included; empty for a process of its own.
    group: list[str] = Field(default_factory=list)


def read_launch(job_dir: Path) -> Launch | None:
    """The job's launch record, or None if it was never started."""
    with contextlib.suppress(OSError, ValueError, ValidationError):
        return Launch.model_validate_json((job_dir / LAUNCH).read_text(encoding="utf-8"))
    return None


def write_launch(job_dir: Path, launch: Launch) -> None:
    write_model(job_dir / LAUNCH, launch)


class LaunchFailed(FinetuneError):
    """This one job cannot start (e.g. its interpreter is missing): the job fails, the loop goes
    on. Any other error of a runner (an unreachable cluster) stops the loop, to be resumed."""


class Liveness(str, Enum):
    PENDING = "pending"  # accepted by the runner, waiting for resources
    RUNNING = "running"
    ENDED = "ended"  # its process is gone: finished, failed, stopped
    MISSING = "missing"  # the runner has no such job: a launch cut short before it reached the runner


@dataclass
class Probe:
    state: Liveness
    detail: str | None = None  # the runner's own words: why it waits, how it ended


def harness_env(*, inherit_path: bool = True) -> dict[str, str]:
    """Environment every job needs: this harness importable (even from another interpreter),
    unbuffered logs, no tokenizer thread pools fighting the trainer. `inherit_path`: keep this
    process's PYTHONPATH after the harness's root (a job on another machine gets the root only)."""
    root = str(Path(harness.__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH") if inherit_path else None
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, extra) if p),
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


TRAIN_MODULE = "harness.providers.local_train"
RESIDENT_MODULE = "harness.providers.resident_train"  # several LoRA jobs in one process


def train_command(python: str, job_dir: Path, module: str = TRAIN_MODULE) -> list[str]:
    return [python, "-m", module, "--job-dir", str(job_dir)]


class JobRunner(abc.ABC):
    name: str = "base"

    def __init__(self, cfg: LocalFinetuneConfig, python: str, module: str = TRAIN_MODULE):
        self.cfg = cfg
        self.python = python
        self.module = module  # the job's program: `python -m <module> --job-dir DIR`

    async def check(self) -> None:
        """Before the first launch: fail early and clearly if jobs cannot run at all."""

    def slots(self, active: list[Launch]) -> int:
        """How many more jobs may start now, `active` being the launches still pending or running."""
        return max(0, self.cfg.max_parallel_jobs - len(active))

    @abc.abstractmethod
    async def launch(self, job_dir: Path, active: list[Launch], previous: Launch | None = None) -> Launch:
        """Start the job and write its launch record; `previous`: a record whose launch never
        reached the runner (Liveness.MISSING), to be completed under the same identity."""

    @abc.abstractmethod
    async def probe(self, job_dir: Path, launch: Launch) -> Probe: ...

    @abc.abstractmethod
    async def stop(self, job_dir: Path, launch: Launch) -> None:
        """Stop the job's process and return once it is gone (or a bounded wait passed)."""

    async def collect_logs(self, job_dir: Path, launch: Launch, *, final: bool = False) -> None:
        """Bring the job's log into DIR/train.log where the runner keeps it elsewhere; `final`:
        the job has written its last status, so its log is (about to be) complete."""

    def where(self, launch: Launch) -> str:
        """How a user finds the job outside the harness (for messages)."""
        return f"pid {launch.pid}"


def make_runner(cfg: LocalFinetuneConfig, python: str) -> JobRunner:
    if cfg.runner == "ray":
        from harness.providers.runners.ray_jobs import RayRunner

        return RayRunner(cfg, python)
    from harness.providers.runners.subprocesses import SubprocessRunner

    return SubprocessRunner(cfg, python)
