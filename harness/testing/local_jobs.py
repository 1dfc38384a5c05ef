"""Local finetuning jobs written by hand, for the tests and benchmarks that run the job programs
(harness.providers.local_train / resident_train) directly instead of through the provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.fileio import iter_jsonl, write_model
from harness.providers.local_train import JobFile, JobSpec, write_status


def write_job(job_dir: Path, *, base_model_path: Path | str, training_file: Path | str,
              metadata: dict[str, str] | None = None, **spec: Any) -> Path:
    """A job's folder as the provider leaves it before launching it: spec.json (a JobSpec named
    after the folder, with `spec`'s fields) and a queued status.json."""
    job_dir.mkdir(parents=True)
    write_status(job_dir, JobFile())
    write_model(job_dir / "spec.json", JobSpec(job_id=job_dir.name, adapter_name=job_dir.name, metadata=metadata or {},
                                               training_file=str(training_file), base_model_path=str(base_model_path),
                                               **spec))
    return job_dir


def progress(job_dir: Path) -> list[dict]:
    """DIR/progress.jsonl: one row per logged step (step, loss, epoch, learning_rate, time)."""
    return list(iter_jsonl(job_dir / "progress.jsonl"))
