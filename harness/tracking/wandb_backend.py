"""Weights & Biases, offline unless `tracking.mode` (or WANDB_MODE) says online: an offline run
is written under WANDB_DIR (default ./wandb) and uploaded later with `wandb sync`.

The run's W&B id is chosen here and kept in tracking.json, so a resumed loop reopens the same
run (`resume="allow"`); offline, each session is a folder of its own with that id, and
`wandb sync` merges them into the one run. Each metric is plotted against its own step metric
(`define_metric`): iterations for the run's numbers, training steps for each job's loss curve.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

from harness.tracking.base import Backend, TrackedRun


class WandbBackend(Backend):
    name = "wandb"

    def start(self, *, previous: TrackedRun | None, run_name: str, config: dict[str, Any],
              tags: dict[str, str]) -> TrackedRun:
        import wandb

        s = self.settings
        project = previous.project if previous else s.resolved_project()
        run_id = previous.run_id if previous else re.sub(r"[^a-z0-9]+", "", run_name.lower())[-24:] + secrets.token_hex(4)
        directory = s.dir or os.environ.get("WANDB_DIR")
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        # console="off": W&B would otherwise capture the terminal, live progress tables included.
        self.run = wandb.init(project=project, entity=s.entity or None, name=previous.run_name if previous else run_name,
                              id=run_id, resume="allow", mode=s.resolved_mode(), dir=directory, config=config,
                              tags=[f"{k}:{v}"[:64] for k, v in tags.items()],
                              settings=wandb.Settings(console="off", silent=True))
        self.defined: set[str] = set()
        offline = s.resolved_mode() != "online"
        where = str(Path(self.run.dir).parent) if offline else (self.run.url or None)
        return TrackedRun(run_id=self.run.id, run_name=self.run.name or run_name, project=project, where=where)

    def log_metrics(self, metrics: dict[str, float], *, step: int, step_key: str, at: float | None = None) -> None:
        if step_key not in self.defined:
            self.run.define_metric(step_key)
            self.defined.add(step_key)
        for key in metrics.keys() - self.defined:
            self.run.define_metric(key, step_metric=step_key)
            self.defined.add(key)
        self.run.log({**metrics, step_key: step})

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_artifact(self, path: Path, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.run.name}-{name}"), type=name)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, *, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
