"""Settings of the OpenAI Batch API path for debates (`endpoint.batch: true`, harness/llm/batch.py).

Imports only pydantic, so harness.config can hold it without an import cycle."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's published limit: an input file holds at most 50,000 requests (and 200 MB).
MAX_REQUESTS_PER_BATCH = 50_000


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The only window OpenAI offers: a batch not finished within it expires, and its unfinished
    # requests are sent again in the next batch.
    completion_window: Literal["24h"] = "24h"
    # How often a submitted batch's status is asked for. Batches take minutes to hours; asking
    # more often than every few seconds only spends requests.
    poll_interval_s: float = Field(30.0, gt=0)
    # Stop waiting for one batch after this long (the run stops, resumable: `--resume` polls the
    # same batch and never submits it again). None: the completion window plus an hour.
    max_wait_s: float | None = Field(None, gt=0)
    # A round's requests are gathered until none has arrived for this long, then sent as one
    # batch per model. Every problem of a split debates at once in batch mode, so a round's
    # requests come within milliseconds of each other; the margin is for a loaded machine.
    gather_s: float = Field(0.5, gt=0)
    max_requests: int = Field(MAX_REQUESTS_PER_BATCH, ge=1, le=MAX_REQUESTS_PER_BATCH)  # lines per batch file
    # A request that fails inside a batch (a 5xx or 429 line in the error file, or left unanswered
    # when the batch expired) is sent again in the next batch, at most this many times; then, or
    # at once for a refused request (4xx), the debate stops with the server's message.
    retries: int = Field(2, ge=0)

    def wait_limit_s(self) -> float:
        return self.max_wait_s if self.max_wait_s is not None else 25 * 3600.0


__all__ = ["BatchSettings", "MAX_REQUESTS_PER_BATCH"]
