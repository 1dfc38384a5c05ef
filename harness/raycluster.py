"""A Ray cluster reached through its Job Submission API (HTTP to the head's dashboard): what the
`ray` job runner of the local provider and Ray-managed vLLM servers share.

Ray's own client does the work (submit with a submission id, status, logs, stop, the nodes'
resources); this module only turns its answers and failures into the harness's terms and
messages. Ray is an optional extra (`pip install -e '.[ray]'`), imported when first needed.
Every call is blocking HTTP: callers in the event loop run them in a thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from harness.errors import HarnessError

log = logging.getLogger(__name__)

# Ray's job states, and the ones a job never leaves.
PENDING, RUNNING = "PENDING", "RUNNING"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class RayJob:
    """What the harness needs of Ray's JobDetails."""

    submission_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str | None
    node_ip: str | None  # the node its entrypoint runs on, once placed
    start_time: float | None
    end_time: float | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class RayCluster:
    """One cluster, one lazily made JobSubmissionClient. `field` names the config field of the
    address for messages; `error` is the exception class raised (FinetuneError, ServeError)."""

    def __init__(self, address: str | None, *, field: str, error: type[HarnessError]):
        self.address = address
        self.field = field
        self.error = error
        self._client: Any = None

    @property
    def where(self) -> str:
        return self.address or "the address Ray finds itself (RAY_API_SERVER_ADDRESS, RAY_ADDRESS, or a local cluster)"

    def client(self) -> Any:
        if self._client is not None:
            return self._client
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:
            raise self.error(f"Ray is not installed here ({e}); install it with `pip install -e '.[ray]'`, "
                             f"or use the subprocess runner") from None
        try:
            self._client = JobSubmissionClient(self.address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise self.error(
                f"cannot reach the Ray cluster at {self.where} ({self.field}): {str(e).splitlines()[0]}. Start one "
                f"(`ray start --head`) or set {self.field} to its dashboard address, e.g. http://HEAD:8265 "
                f"(the Job API needs the dashboard: `ray[default]`, --include-dashboard)") from None
        return self._client

    # ------------------------------------------------------------------ resources

    def nodes(self) -> list[tuple[str, dict[str, float]]]:
        """[(node IP, total resources)] of the cluster's alive nodes."""
        self.client()
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self._client.get_address(), filters=[("state", "=", "ALIVE")], timeout=30)
        except Exception as e:  # noqa: BLE001 - Ray raises several kinds; all mean "cannot tell"
            raise self.error(f"the Ray cluster at {self.where} did not list its nodes: {e}") from None
        return [(n.node_ip, dict(n.resources_total or {})) for n in nodes]

    def check_fits(self, need: dict[str, float], *, what: str, fields: str) -> None:
        """Raise unless some alive node has every resource in `need` (e.g. {"GPU": 1, "CPU": 1}):
        a job asking for more would wait on the cluster forever."""
        need = {k: v for k, v in need.items() if v}
        if not need:
            return
        nodes = self.nodes()
        if any(all(res.get(k, 0) >= v for k, v in need.items()) for _, res in nodes):
            return
        lacking = [k for k, v in need.items() if not any(res.get(k, 0) >= v for _, res in nodes)]
        have = "; ".join(f"{ip}: " + ", ".join(f"{res.get(k, 0):g} {k}" for k in need) for ip, res in nodes) or "none: no node is alive (yet)"
        raise self.error(
            f"the Ray cluster at {self.where} has no node with {_amounts(need)} for {what} (short of "
            f"{', '.join(lacking)}); its nodes have: {have}. Lower {fields}, or add nodes that have them")

    # ------------------------------------------------------------------ jobs

    def submit(self, submission_id: str, entrypoint: str, *, num_gpus: float, num_cpus: float,
               runtime_env: dict[str, Any], metadata: dict[str, str]) -> bool:
        """Submit a job under `submission_id`; False if one with that id exists already (a
        resumed caller adopts it: Ray refuses a second job under the same id)."""
        client = self.client()
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env or None,
                              metadata=metadata, entrypoint_num_gpus=num_gpus or None,
                              entrypoint_num_cpus=num_cpus or None)
        except RuntimeError as e:
            if "already exists" in str(e):
                return False
            raise self.error(f"the Ray cluster at {self.where} refused job {submission_id}: {_last_line(e)}") from None
        except ConnectionError as e:
            raise self.error(f"lost the Ray cluster at {self.where} while submitting {submission_id}: {e}") from None
        return True

    def job(self, submission_id: str) -> RayJob | None:
        """The job's state, or None if the cluster has no job under that id."""
        client = self.client()
        try:
            info = client.get_job_info(submission_id)
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                return None
            raise self.error(f"the Ray cluster at {self.where} did not answer for job {submission_id}: "
                             f"{_last_line(e)}") from None
        except ConnectionError as e:
            raise self.error(f"lost the Ray cluster at {self.where}: {e}; once it is back, resume the run") from None
        agent = info.driver_agent_http_address
        return RayJob(submission_id=submission_id, status=str(getattr(info.status, "value", info.status)),
                      message=info.message, node_ip=urlparse(agent).hostname if agent else None,
                      start_time=info.start_time / 1000 if info.start_time else None,
                      end_time=info.end_time / 1000 if info.end_time else None)

    def logs(self, submission_id: str) -> str:
        try:
            return self.client().get_job_logs(submission_id)
        except (RuntimeError, ConnectionError) as e:
            log.debug("no logs of Ray job %s: %s", submission_id, e)
            return ""

    def stop(self, submission_id: str, *, wait_s: float = 30.0) -> RayJob | None:
        """Stop the job (Ray sends SIGTERM, then SIGKILL) and wait until Ray says it ended."""
        try:
            self.client().stop_job(submission_id)
        except RuntimeError as e:
            if "404" not in str(e) and "does not exist" not in str(e):
                raise self.error(f"the Ray cluster at {self.where} did not stop job {submission_id}: "
                                 f"{_last_line(e)}") from None
        deadline = time.monotonic() + wait_s
        while True:
            job = self.job(submission_id)
            if job is None or job.terminal or time.monotonic() > deadline:
                return job
            time.sleep(0.5)


def _amounts(need: dict[str, float]) -> str:
    return " and ".join(f"{v:g} {k}" for k, v in need.items())


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip().strip(".")]
    return lines[-1] if lines else type(e).__name__
