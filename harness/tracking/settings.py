"""`tracking:` in a run config: which experiment tracker receives the run, and under what names.

Every setting may stay unset: the tracker's own environment variables then apply (WANDB_PROJECT,
WANDB_MODE, WANDB_DIR, WANDB_ENTITY; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; TRACKIO_DIR,
TRACKIO_SPACE_ID), and after them the offline defaults below. A value in the config wins over
the environment, as `--set` wins over the config.

Imports only pydantic: harness.config imports this module.
"""

from __future__ import annotations

import os
from typing import Literal

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

Backend = Literal["none", "trackio", "wandb", "mlflow"]

DEFAULT_PROJECT = "harness"
# What brings each backend: the harness's extra of that name (pyproject.toml), i.e. these
# packages; named in the message when the backend cannot be imported.
PACKAGES = {"trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow-skinny sqlalchemy alembic"}


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # none: nothing leaves the run directory. trackio and mlflow write to local files by default;
    # wandb runs offline unless mode (or WANDB_MODE) says online.
    backend: Backend = "none"
    # W&B project, MLflow experiment, trackio project. None: WANDB_PROJECT /
    # MLFLOW_EXPERIMENT_NAME, else "harness".
    project: str | None = None
    # The tracked run's display name. None: the run directory's name.
    run_name: str | None = None
    # MLflow only. None: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db and
    # ./mlruns for artifacts, in the folder the loop runs from).
    tracking_uri: str | None = None
    # W&B only. None: WANDB_MODE, else offline (`wandb sync` uploads an offline run later).
    mode: Literal["offline", "online"] | None = None
    # W&B only: where its files go. None: WANDB_DIR, else W&B's default (./wandb).
    dir: str | None = None
    # W&B only: the team or user. None: WANDB_ENTITY, else the account's default.
    entity: str | None = None
    # Also log each finetuning job's training-loss curve (local jobs from their progress file,
    # hosted jobs from their metrics events).
    loss_curves: bool = True
    # At the end of the run: the report (harness.report, markdown and plots) and summary.json as
    # artifacts.
    artifacts: bool = True
    # How long the end of the run waits for the tracker to take what is still queued; what is
    # not sent by then is dropped with a warning (the run directory keeps everything).
    finish_timeout_s: float = Field(60.0, ge=0)

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        # The config is saved in the run directory: a password in it would be written to disk.
        if uri and (urlsplit(uri).username or urlsplit(uri).password):
            raise ValueError("holds a user name or password; give the URI without them and set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        return uri

    def resolved_project(self) -> str:
        if self.project:
            return self.project
        env = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}.get(self.backend)
        return (os.environ.get(env) if env else None) or DEFAULT_PROJECT

    def resolved_mode(self) -> str:
        return self.mode or os.environ.get("WANDB_MODE") or "offline"
