"""trackio: a local-first tracker (a SQLite file per project under TRACKIO_DIR, by default
~/.cache/huggingface/trackio); `trackio show --project NAME` opens its dashboard.

trackio finds a run again by its name (`resume="allow"`), so the name is what a resumed run
reattaches by. It logs to a Hugging Face Space or a server only when TRACKIO_SPACE_ID or
TRACKIO_SERVER_URL says so: trackio's own choice, honoured as it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness.tracking.base import Backend, TrackedRun


class TrackioBackend(Backend):
    name = "trackio"

    def start(self, *, previous: TrackedRun | None, run_name: str, config: dict[str, Any],
              tags: dict[str, str]) -> TrackedRun:
        import trackio
        from trackio import utils

        project = self.settings.resolved_project()
        # System metrics (CPU, GPU) are sampled by a thread of trackio's own: off, so logging
        # costs the run nothing between the loop's own calls.
        self.run = trackio.init(project=previous.project if previous else project,
                                name=previous.run_name if previous else run_name,
                                config={**config, **{f"tag.{k}": v for k, v in tags.items()}},
                                resume="allow" if previous else "never", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)
        where = str(utils.TRACKIO_DIR) if getattr(self.run, "_is_local", True) else self.run.url
        return TrackedRun(run_id=str(getattr(self.run, "id", None) or self.run.name), run_name=self.run.name,
                          project=self.run.project, where=where)

    def log_metrics(self, metrics: dict[str, float], *, step: int, step_key: str, at: float | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        import trackio

        self.run.log({name: trackio.Table(columns=columns, data=rows)}, step=step)

    def log_artifact(self, path: Path, name: str) -> None:
        # Artifact names are per project: the run's name keeps two runs' reports apart.
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.run.name}-{name}")
        self.run.log_artifact(path, name=safe, type=name)

    def finish(self, *, ok: bool) -> None:
        self.run.finish()
