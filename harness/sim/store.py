"""The simulator's state: uploaded files, fine-tuning jobs (and so finetuned models), loaded
adapters. Files and jobs persist under `state_dir` when one is given, so a restarted server
still has them; adapters, as in vLLM, do not survive a restart.

A job's status is a pure function of the wall-clock time since its creation (see
`JobRecord.timeline`), so nothing runs in the background and a job that was running when the
server died has simply moved on when it comes back.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from harness.fileio import write_atomic, write_model
from harness.sim.models import ModelParams

log = logging.getLogger(__name__)

ORG = "sim-org"
# Phase boundaries as shares of a job's duration: validating, queued, running, done.
_VALIDATED, _STARTED = 0.1, 0.2
STARTED_SHARE = _STARTED
_MAX_SIM_STEPS = 40  # metrics events per simulated job (a real job logs every step)


class FileRecord(BaseModel):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    shape: Literal["openai", "together"] = "openai"  # the API it was uploaded through answers in its own shape

    def api(self) -> dict[str, Any]:
        if self.shape == "together":  # FileResponse in Together's spec (its capitalised keys included)
            return {"id": self.id, "object": "file", "created_at": self.created_at, "filename": self.filename,
                    "bytes": self.bytes, "purpose": self.purpose, "FileType": "jsonl", "Processed": True}
        # OpenAIFile in the spec (v2.3.0): `expires_at` and `status_details` are optional and not
        # nullable, so a file that never expires and has no details leaves them out.
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class JobRecord(BaseModel):
    id: str
    created_at: float  # wall clock, fractional: jobs in tests last well under a second
    duration_s: float
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int
    metadata: dict[str, str] | None = None
    hyperparameters: dict[str, Any]
    fine_tuned_model: str  # the name it gets if it succeeds
    validation_error: dict[str, Any] | None = None  # the file was rejected: fails while validating
    fails: bool = False  # an injected failure (job_failure_rate) at the end of training
    trained_tokens: int | None = None
    n_examples: int = 0
    params: ModelParams | None = None
    cancelled_at: float | None = None
    # [paused at, resumed at (None while paused)], oldest first: a pause stops the job's clock,
    # so every later step of its timeline moves back by the time it spent paused.
    pauses: list[list[float | None]] = []

    def _shifted(self, t: float) -> float:
        """When a step planned for `t` (without pauses) happens; inf while a pause holds it."""
        for start, end in self.pauses:
            if start is not None and start < t:
                t = float("inf") if end is None else t + (end - start)
        return t

    def timeline(self) -> list[tuple[float, str]]:
        """(time, status) steps from creation to the job's end, pauses included."""
        t0, d = self.created_at, self.duration_s
        if self.validation_error:
            return [(t0, "validating_files"), (t0 + _VALIDATED * d, "failed")]
        end = "failed" if self.fails else "succeeded"
        steps = [(t0, "validating_files"), (t0 + _VALIDATED * d, "queued"), (t0 + _STARTED * d, "running"), (t0 + d, end)]
        return [(self._shifted(at), step) for at, step in steps]

    def paused_at(self, now: float) -> bool:
        return any(start is not None and start <= now and (end is None or now < end) for start, end in self.pauses)

    def status_at(self, now: float) -> tuple[str, float | None]:
        """(status, finished_at) at wall-clock time `now`."""
        status, finished = "validating_files", None
        for at, step in self.timeline():
            if self.cancelled_at is not None and self.cancelled_at <= at:
                return "cancelled", self.cancelled_at
            if at <= now:
                status = step
                finished = at if step in ("succeeded", "failed") else None
        if self.cancelled_at is not None and finished is None:
            return "cancelled", self.cancelled_at
        if finished is None and self.paused_at(now):
            return "paused", None
        return status, finished

    def api(self, now: float) -> dict[str, Any]:
        status, finished = self.status_at(now)
        error = None
        if status == "failed":
            error = self.validation_error or {
                "code": "internal_error",
                "message": "Fine-tuning job failed due to an internal error (simulated failure). Create the job again.",
                "param": None,
            }
        hyper = dict(self.hyperparameters)
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": int(self.created_at),
            "error": error,
            "fine_tuned_model": self.fine_tuned_model if status == "succeeded" else None,
            "finished_at": int(finished) if finished is not None else None,
            "hyperparameters": hyper,
            "model": self.model,
            "organization_id": ORG,
            "result_files": [],
            "seed": self.seed,
            "status": status,
            "trained_tokens": self.trained_tokens if status == "succeeded" else None,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "integrations": [],
            "metadata": self.metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            # The spec: "null if the fine-tuning job is not running".
            "estimated_finish": int(self.timeline()[-1][0]) if status == "running" else None,
            "user_provided_suffix": self.suffix,
        }

    def events(self, now: float) -> list[dict[str, Any]]:
        """The job's events up to `now`, newest first (OpenAI's order)."""
        messages = {
            "validating_files": f"Validating training file: {self.training_file}",
            "queued": "Files validated, moving job to queued state",
            "running": f"Fine-tuning job started (simulated: {self.params.note if self.params else ''})",
            "succeeded": f"New fine-tuned model created: {self.fine_tuned_model}. The job has successfully completed",
            "failed": (self.validation_error or {}).get("message", "The job failed (simulated failure)"),
        }
        status, _ = self.status_at(now)
        timed: list[tuple[float, dict[str, Any]]] = []
        for i, (at, step) in enumerate(self.timeline()):
            if at > now or (self.cancelled_at is not None and self.cancelled_at <= at):
                break
            level = "error" if step == "failed" else "info"
            timed.append((at, _event(self.id, i, at, level, messages[step])))
        for j, (start, end) in enumerate(self.pauses):
            for k, (at, what) in enumerate(((start, "paused"), (end, "resumed"))):
                if at is not None and at <= now:
                    timed.append((at, _event(self.id, 10 + 2 * j + k, at, "info", f"Fine-tuning job {what}")))
        for at, event in self.metrics_events():
            if at <= now and (self.cancelled_at is None or at < self.cancelled_at):
                timed.append((at, event))
        timed.sort(key=lambda t: t[0])  # by the exact time: created_at is whole seconds
        out = [e for _, e in timed]
        if status == "cancelled":
            out.append(_event(self.id, 9, self.cancelled_at or now, "info", "Fine-tuning job cancelled"))
        return out[::-1]

    def training_steps(self) -> int:
        epochs, batch = self.hyperparameters.get("n_epochs"), self.hyperparameters.get("batch_size")
        epochs = epochs if isinstance(epochs, int) else 3
        batch = batch if isinstance(batch, int) else 1
        return max(1, min(_MAX_SIM_STEPS, epochs * math.ceil(max(self.n_examples, 1) / batch)))

    def metrics_events(self) -> list[tuple[float, dict[str, Any]]]:
        """OpenAI-style "metrics" events while the job runs: a simulated loss curve that falls
        from ~1.2-1.6 toward ~0.2-0.4, a deterministic function of the job id (no real training)."""
        if self.validation_error:
            return []
        digest = hashlib.sha256(self.id.encode()).digest()
        start, floor, wiggle = 1.2 + digest[0] / 640, 0.2 + digest[1] / 1280, 1 + digest[2] % 7
        total = self.training_steps()
        t0, d = self.created_at, self.duration_s
        out = []
        for step in range(1, total + 1):
            at = self._shifted(t0 + d * (_STARTED + (1 - _STARTED) * step / (total + 1)))
            loss = round((floor + (start - floor) * math.exp(-3 * step / total)) * (1 + 0.04 * math.sin(step * wiggle)), 4)
            acc = round(min(0.99, 1 - loss / 2), 4)
            event = _event(self.id, 100 + step, at, "info", f"Step {step}/{total}: training loss={loss}")
            event["type"] = "metrics"
            event["data"] = {"step": step, "train_loss": loss, "total_steps": total, "train_mean_token_accuracy": acc}
            out.append((at, event))
        return out


def _event(job_id: str, i: int, at: float, level: Literal["info", "warn", "error"], message: str) -> dict[str, Any]:
    return {
        "id": f"ftevent-{job_id.removeprefix('ftjob-')}{i}",
        "object": "fine_tuning.job.event",
        "created_at": int(at),
        "level": level,
        "message": message,
        "data": {},
        "type": "message",
    }


class Adapter(BaseModel):
    name: str
    path: str
    params: ModelParams
    created_at: int


class Store:
    def __init__(self, state_dir: Path | None = None):
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.files: dict[str, FileRecord] = {}
        self._content: dict[str, bytes] = {}
        self.jobs: dict[str, JobRecord] = {}
        self._by_model: dict[str, str] = {}  # finetuned model name -> job id
        self.adapters: dict[str, Adapter] = {}
        if self.state_dir is not None:
            self._load()

    # -- persistence
    def _load(self) -> None:
        assert self.state_dir is not None
        for path in sorted((self.state_dir / "files").glob("*.json")):
            try:
                rec = FileRecord.model_validate_json(path.read_text(encoding="utf-8"))
                self._content[rec.id] = path.with_suffix(".data").read_bytes()
            except (OSError, ValidationError) as e:
                log.warning("simulator state: skipping unreadable file record %s (%s)", path, e)
                continue
            self.files[rec.id] = rec
        for path in sorted((self.state_dir / "jobs").glob("*.json")):
            try:
                job = JobRecord.model_validate_json(path.read_text(encoding="utf-8"))
            except (OSError, ValidationError) as e:
                log.warning("simulator state: skipping unreadable job record %s (%s)", path, e)
                continue
            self.jobs[job.id] = job
            self._by_model[job.fine_tuned_model] = job.id

    def add_file(self, rec: FileRecord, content: bytes) -> None:
        if self.state_dir is not None:
            # Content first: a record on disk always has its content.
            write_atomic(self.state_dir / "files" / f"{rec.id}.data", content)
            write_model(self.state_dir / "files" / f"{rec.id}.json", rec)
        self.files[rec.id] = rec
        self._content[rec.id] = content

    def content(self, file_id: str) -> bytes:
        return self._content[file_id]

    def delete_file(self, file_id: str) -> None:
        self.files.pop(file_id, None)
        self._content.pop(file_id, None)
        if self.state_dir is not None:
            (self.state_dir / "files" / f"{file_id}.json").unlink(missing_ok=True)
            (self.state_dir / "files" / f"{file_id}.data").unlink(missing_ok=True)

    def save_job(self, job: JobRecord) -> None:
        if self.state_dir is not None:
            write_model(self.state_dir / "jobs" / f"{job.id}.json", job)
        self.jobs[job.id] = job
        self._by_model[job.fine_tuned_model] = job.id

    # -- finetuned models: they exist once their job has succeeded
    def finetuned(self, name: str, now: float | None = None) -> ModelParams | None:
        job = self.jobs.get(self._by_model.get(name, ""))
        if job is None or job.status_at(time.time() if now is None else now)[0] != "succeeded":
            return None
        return job.params

    def finetuned_models(self, now: float | None = None) -> list[tuple[str, int, str]]:
        """(name, created_at, parent) of every finetuned model that exists now."""
        now = time.time() if now is None else now
        out = []
        for job in self.jobs.values():
            status, finished = job.status_at(now)
            if status == "succeeded":
                out.append((job.fine_tuned_model, int(finished or job.created_at), job.model))
        return out
