"""MLflow: one MLflow run per run directory, in the experiment `tracking.project`.

Offline by default: without MLFLOW_TRACKING_URI MLflow keeps runs in sqlite:///mlflow.db and
artifacts in ./mlruns of the folder the loop runs from; `mlflow ui` there shows them. The
client API (MlflowClient) is used rather than the fluent `mlflow.start_run`, whose active run
is process-global state.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from harness.tracking.base import Backend, TrackedRun

# The tracking API's limits per log_batch call, and the parameter value length older servers accept.
_MAX_METRICS, _MAX_PARAMS, _MAX_PARAM_LEN = 1000, 100, 500


def without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) if parts.query else uri


class MlflowBackend(Backend):
    name = "mlflow"

    def start(self, *, previous: TrackedRun | None, run_name: str, config: dict[str, Any],
              tags: dict[str, str]) -> TrackedRun:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = self.settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.client = client = MlflowClient(tracking_uri=uri)
        project = self.settings.resolved_project()
        run = None
        if previous is not None:
            try:
                run = client.get_run(previous.run_id)
            except MlflowException:
                run = None  # the store was moved or wiped: a new run, and the next line says so
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            known = set(run.data.params)
        else:
            exp = client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(project)
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            known = set()
        self.run_id = run.info.run_id
        # Parameters cannot change once logged: a resumed run adds only new ones (the settings a
        # resume may change are in the config artifact of each session).
        params = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in config.items() if k not in known]
        for i in range(0, len(params), _MAX_PARAMS):
            client.log_batch(self.run_id, params=params[i:i + _MAX_PARAMS])
        if previous is not None and run.info.run_id == previous.run_id:
            client.log_batch(self.run_id, tags=[RunTag("harness.resumed_at", str(int(time.time())))])
        where = without_credentials(client.tracking_uri)
        return TrackedRun(run_id=self.run_id, run_name=run.info.run_name or run_name, project=project, where=where)

    def log_metrics(self, metrics: dict[str, float], *, step: int, step_key: str, at: float | None = None) -> None:
        from mlflow.entities import Metric

        now = int((at or time.time()) * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i:i + _MAX_METRICS])

    def log_series(self, key: str, points: list[tuple[int, float]], *, step_key: str, at: float | None = None) -> None:
        from mlflow.entities import Metric

        now = int((at or time.time()) * 1000)
        batch = [Metric(key, float(v), now, step) for step, v in points]
        for i in range(0, len(batch), _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i:i + _MAX_METRICS])

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        # log_dict replaces the file; MlflowClient.log_table would append to it.
        self.client.log_dict(self.run_id, {"columns": columns, "data": rows}, f"tables/{name}.json")

    def log_artifact(self, path: Path, name: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=name)

    def finish(self, *, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")
