"""run_dir/batches/: one record per Batch API batch a run prepares, so that no batch is ever
submitted twice and a killed run resumes by polling the batch it had submitted.

For each batch, `<id>.jsonl` is its input file exactly as uploaded (one request per line, the
cache key of the call as `custom_id`), and `<id>.json` its `BatchRecord`, rewritten atomically
at every step:

    prepared   written before anything is sent: the requests it holds
    uploaded   the input file's id (the upload is found by its filename if the write was lost)
    submitted  the batch's id (before creating, batches are looked up by the record's id in their
               metadata, so a create whose answer was lost is adopted, not repeated)
    done       its output and error files were read; every answer is in the cache and usage.jsonl
    abandoned  never created (a later session found no batch with its id): its requests go out
               in a new batch
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from harness.fileio import write_atomic, write_model
from harness.records import SampleId

log = logging.getLogger(__name__)

BATCHES_DIR = "batches"
BatchState = Literal["prepared", "uploaded", "submitted", "done", "abandoned"]
OPEN_STATES: tuple[str, ...] = ("prepared", "uploaded", "submitted")


class BatchRequest(BaseModel):
    """One line of a batch, as the run needs it back: which sample it answers, and for whom."""

    custom_id: str  # the call's cache key
    model: str
    sample: SampleId | None = None  # None: not one sample's call (the diversity stage's embeddings)
    purpose: str
    est_cost_usd: float | None = None  # worst case at batch price (budget reservation)


class BatchRecord(BaseModel):
    id: str  # the harness's own id, also in the batch's metadata and the input file's name
    run: str  # the run id, in the batch's metadata
    model: str  # a batch holds one model's requests, as OpenAI requires
    endpoint: str = "/v1/chat/completions"  # and one endpoint's: chat (debates) or /v1/embeddings (diversity)
    state: BatchState = "prepared"
    created_at: float = Field(default_factory=time.time)
    requests: list[BatchRequest]
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the batch's last status seen (validating, in_progress, completed, ...)
    output_file_id: str | None = None
    error_file_id: str | None = None
    answered: int = 0  # lines read back with an answer
    failed: int = 0  # lines that failed (sent again in a later batch, or reported)

    @property
    def filename(self) -> str:
        return f"harness-batch-{self.id}.jsonl"


class BatchBook:
    """The run's batch records, read at start; writes each change atomically."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / BATCHES_DIR
        self.records: dict[str, BatchRecord] = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                rec = BatchRecord.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as e:
                # A record is written whole or not at all (atomic rename), so this is outside damage.
                log.warning("%s: unreadable batch record (%s); its requests are sent again if still needed",
                            path, str(e).splitlines()[0])
                continue
            self.records[rec.id] = rec

    def open_for(self) -> dict[str, BatchRecord]:
        """custom_id -> the unfinished batch (of this session or an earlier one) that holds it."""
        out: dict[str, BatchRecord] = {}
        for rec in sorted(self.records.values(), key=lambda r: r.created_at):
            if rec.state in OPEN_STATES:
                for r in rec.requests:
                    out[r.custom_id] = rec
        return out

    def input_path(self, rec: BatchRecord) -> Path:
        return self.dir / f"{rec.id}.jsonl"

    def prepare(self, rec: BatchRecord, content: bytes) -> None:
        """The input file first, then the record: a record on disk always has its input."""
        write_atomic(self.input_path(rec), content)
        self.save(rec)

    def save(self, rec: BatchRecord) -> None:
        write_model(self.dir / f"{rec.id}.json", rec)
        self.records[rec.id] = rec


__all__ = ["BATCHES_DIR", "BatchBook", "BatchRecord", "BatchRequest", "OPEN_STATES"]
