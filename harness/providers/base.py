"""The finetuning provider interface: every backend (OpenAI's API, local LoRA jobs) speaks it.

The loop only ever calls `submit`, `refresh`/`wait`, `cancel` and `events`, and reads the
normalized `JobState`; nothing provider-specific leaks past here.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from enum import Enum
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterable

from pydantic import BaseModel, Field

from harness.config import Hyperparameters


class JobStatus(str, Enum):
    VALIDATING = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    # Paused by its owner at the provider (OpenAI: POST /fine_tuning/jobs/{id}/pause); it goes on
    # only when someone resumes it there, so `wait` gives up on it after a deadline.
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # a status this harness does not know; the raw string is kept

    @classmethod
    def normalize(cls, raw: str | None) -> "JobStatus":
        aliases = {"validating": cls.VALIDATING, "pending": cls.QUEUED, "canceled": cls.CANCELLED,
                   "completed": cls.SUCCEEDED, "error": cls.FAILED}
        if raw is None:
            return cls.UNKNOWN
        key = raw.strip().lower()
        try:
            return cls(key)
        except ValueError:
            return aliases.get(key, cls.UNKNOWN)

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class FinetuneRequest(BaseModel):
    training_file: Path  # OpenAI chat JSONL ({"messages": [...]}, optional per-turn "weight")
    base_model: str  # the model (or adapter) this job starts from
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    # Tags that identify the job: run, iteration, role, agent (and data sha256). A provider looks a
    # job up by them before creating one, so a retried or resumed submit never starts a second job.
    metadata: dict[str, str]
    suffix: str | None = None
    seed: int | None = None
    max_steps: int | None = None  # local provider: stop after this many optimizer steps (None: the epochs decide)


class JobState(BaseModel):
    job_id: str
    provider: str
    status: JobStatus
    raw_status: str
    model_id: str | None = None  # the resulting model (or adapter name) once succeeded
    base_model: str | None = None  # the model the job trains from, where the provider reports it
    artifact_path: str | None = None  # local providers: where the adapter/model was written
    file_id: str | None = None
    trained_tokens: int | None = None
    error: str | None = None  # the provider's own error message when failed
    latest_event: str | None = None
    created_at: float | None = None
    finished_at: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class LossPoint(BaseModel):
    """One logged training step of a job: what a tracker plots as the job's loss curve."""

    step: int
    loss: float


OnUpdate = Callable[[JobState], Awaitable[None] | None]


class FinetuneProvider(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    async def submit(self, request: FinetuneRequest) -> JobState:
        """Start a job, or return the existing one with the same metadata (idempotent)."""

    @abc.abstractmethod
    async def find(self, metadata: dict[str, str]) -> JobState | None:
        """The most recent job whose metadata matches all of `metadata`, if any."""

    @abc.abstractmethod
    async def jobs(self, metadata: dict[str, str]) -> list[JobState]:
        """Every job whose metadata matches all of `metadata`, newest first (a run's jobs, when
        its registry must be rebuilt)."""

    @abc.abstractmethod
    async def refresh(self, job_id: str) -> JobState: ...

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> JobState: ...

    @abc.abstractmethod
    async def events(self, job_id: str, limit: int = 20) -> list[str]:
        """Latest events, newest last."""

    async def loss_curve(self, job_id: str) -> list[LossPoint]:
        """The job's training loss per logged step, oldest first ([] where the provider reports none)."""
        return []

    def artifacts(self, model_ids: Iterable[str]) -> dict[str, str]:
        """{model id: local path} of the models the serving endpoint must load before a debate
        (LoRA adapters). Hosted providers serve their own models: nothing to load."""
        return {}

    def model_prices(self) -> dict[str, dict[str, float]]:
        """Prices (a config `prices` section's entries; keys may be patterns) of the model names
        this provider registers that the built-in table cannot know, such as Azure deployment
        names. The run's own `prices` entries win."""
        return {}

    async def billing_notes(self, run: str) -> list[str]:
        """What this provider keeps (and bills) for `run` after the loop ends, for the summary:
        e.g. Azure's deployments of finetuned models, billed per hour while they exist."""
        return []

    async def close(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Around the submission of jobs meant to start together (an iteration's): a provider that
        trains them better as one (the local one's resident trainer) holds them until the block
        ends. Nothing to do for a provider whose every job is its own."""
        yield

    # How long `wait` follows a paused job before it gives up (the loop sets it from
    # finetune.paused_timeout_s).
    paused_timeout_s: float = 1800.0

    async def nap(self, seconds: float) -> None:
        """The pause between two polls of `wait`. A provider that learns of a job's end sooner
        (the local one reads its jobs' status files) wakes early, so a finished job is not
        noticed a whole poll interval late and a queued job does not wait that long to start."""
        await asyncio.sleep(seconds)

    async def wait(self, job_id: str, *, poll_interval_s: float = 5.0, max_interval_s: float = 60.0,
                   on_update: OnUpdate | None = None) -> JobState:
        """Poll until the job ends, backing off from `poll_interval_s` up to `max_interval_s`
        while nothing changes. `on_update` sees every state (for a live status display).

        A job paused for longer than `paused_timeout_s` is returned still paused, with an error
        saying so: nothing in this run can resume it, and polling it forever would hang the run.
        A resumed run picks the same job up again (it is neither failed nor cancelled)."""
        interval = poll_interval_s
        last: tuple | None = None
        paused_since: float | None = None
        while True:
            state = await self.refresh(job_id)
            if state.status is JobStatus.PAUSED:
                paused_since = paused_since or time.monotonic()
                if time.monotonic() - paused_since >= self.paused_timeout_s:
                    state.error = (f"job {job_id} has been paused at the {self.name} provider for "
                                   f"{self.paused_timeout_s:.0f}s (finetune.paused_timeout_s); resume it there, then "
                                   f"continue this run with --resume (it picks the same job up)")
            else:
                paused_since = None
            if on_update is not None:
                result = on_update(state)
                if asyncio.iscoroutine(result):
                    await result
            if state.status.terminal:
                if state.finished_at is None:
                    state.finished_at = time.time()
                return state
            if paused_since is not None and state.error:
                return state
            seen = (state.raw_status, state.latest_event)
            interval = poll_interval_s if seen != last else min(interval * 1.5, max_interval_s)
            last = seen
            if paused_since is not None:  # wake up in time for the deadline
                interval = min(interval, max(0.0, paused_since + self.paused_timeout_s - time.monotonic()) + 0.01)
            await self.nap(interval)
