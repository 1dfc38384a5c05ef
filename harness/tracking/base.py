"""The interface every tracker backend speaks, and the record that lets a resumed run find its
tracked run again.

A backend is used from one worker thread (harness.tracking.tracker), one call at a time, so it
needs no locking; any exception it raises becomes a warning there.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from harness.tracking.settings import TrackingConfig

STATE_FILE = "tracking.json"


class TrackedRun(BaseModel):
    """Where one backend keeps this run: what `start` needs to reattach on resume."""

    model_config = ConfigDict(extra="forbid")

    run_id: str  # the tracker's own id of the run
    run_name: str
    project: str
    where: str | None = None  # a local folder, a tracking URI without credentials, or a web page
    # What has been sent already, so a resumed session does not log it twice.
    iterations: list[int] = Field(default_factory=list)
    jobs: list[str] = Field(default_factory=list)  # finetuning jobs whose loss curve was logged


class TrackingState(BaseModel):
    """<run dir>/tracking.json: per backend, the tracked run of this run directory. No secrets:
    ids, names and a location only."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    runs: dict[str, TrackedRun] = Field(default_factory=dict)


class Backend(abc.ABC):
    name: str = "base"

    def __init__(self, settings: TrackingConfig):
        self.settings = settings

    @abc.abstractmethod
    def start(self, *, previous: TrackedRun | None, run_name: str, config: dict[str, Any],
              tags: dict[str, str]) -> TrackedRun:
        """Open the tracked run: reattach to `previous` when given, else create one."""

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], *, step: int, step_key: str, at: float | None = None) -> None:
        """Scalars at `step` of the axis `step_key` ("iteration", or a loss curve's own steps).
        `at`: when they were measured (unix time), the same in every session, so a tracker that
        drops exact repeats (MLflow) keeps one copy of what a killed session had sent already."""

    def log_series(self, key: str, points: list[tuple[int, float]], *, step_key: str, at: float | None = None) -> None:
        """One curve: `key` at each (step, value) of its own axis `step_key`."""
        for step, value in points:
            self.log_metrics({key: value}, step=step, step_key=step_key, at=at)

    @abc.abstractmethod
    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        """A whole table under `name` (as of iteration `step`); logging the same name again replaces it
        where the tracker can."""

    @abc.abstractmethod
    def log_artifact(self, path: Path, name: str) -> None:
        """A file or a folder, stored under `name`."""

    @abc.abstractmethod
    def finish(self, *, ok: bool) -> None:
        """Close the run (`ok`: the loop finished; otherwise it stopped and may resume)."""
