"""/v1/batches with OpenAI's semantics (simulated processing): create, retrieve, list, cancel.

Shapes follow OpenAI's official OpenAPI spec v2.3.0 (openai/openai-openapi): Batch (optional
fields left out rather than null, as the spec does not make them nullable), BatchRequestCounts,
BatchError, ListBatchesResponse, CreateBatchRequest; input lines are BatchRequestInput and
result lines BatchRequestOutput. Input files come from /v1/files (purpose "batch"); the output
and error files are files there too (purpose "batch_output").

A batch's status is a function of the time since its creation, as a fine-tuning job's is
(store.py): validating for the first 10% of `simulator.batch_seconds`, in_progress until 90%,
finalizing, then completed (or failed at 10% when the input file is invalid; or, for the share
`simulator.batch_expire_rate` of batches, expired with half its lines answered). Its lines are
answered when it completes, by the same code as /v1/chat/completions or /v1/embeddings (the
batch's endpoint; without the chat endpoint's faults: a batch has its own quota), so a seeded
request gets the same answer either way; `simulator.batch_error_rate` answers that share of
lines with a 500 in the error file.
Batches persist under the state directory, so a restarted simulator still has them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from harness.fileio import write_model
from harness.sim.files_jobs import _check_metadata, _limit, _page
from harness.sim.knowledge import rng_for
from harness.sim.protocol import ApiError, not_found, parse_body
from harness.sim.store import FileRecord

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")  # what the simulator answers (the spec lists more)
MAX_LINES = 50_000
WINDOW_S = 24 * 3600
_IN_PROGRESS, _FINALIZING = 0.1, 0.9  # phase boundaries as shares of batch_seconds

Answer = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]  # (endpoint, body) -> (status, body)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


class SimBatch(BaseModel):
    id: str
    created_at: float
    duration_s: float
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    model: str | None = None
    total: int = 0
    errors: list[dict[str, Any]] | None = None  # validation errors: the batch fails
    error_rate: float = 0.0
    expires: bool = False  # ends expired (the window passed) instead of completed
    cancelled_at: float | None = None
    results_written: bool = False
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    usage: dict[str, Any] | None = None

    def _at(self, share: float) -> float:
        return self.created_at + share * self.duration_s

    def status_at(self, now: float) -> str:
        if self.errors:
            return "failed" if now >= self._at(_IN_PROGRESS) else "validating"
        if self.cancelled_at is not None and self.cancelled_at < self._at(1.0):
            return "cancelled" if now >= self._cancel_done() else "cancelling"
        end = "expired" if self.expires else "completed"
        for share, status in ((1.0, end), (_FINALIZING, "finalizing"), (_IN_PROGRESS, "in_progress")):
            if now >= self._at(share):
                return status
        return "validating"

    def _cancel_done(self) -> float:
        assert self.cancelled_at is not None
        return self.cancelled_at + 0.1 * self.duration_s

    def progress(self, at: float) -> float:
        """Share of the lines processed by time `at`."""
        span = self._at(_FINALIZING) - self._at(_IN_PROGRESS)
        return 1.0 if span <= 0 else min(max((at - self._at(_IN_PROGRESS)) / span, 0.0), 1.0)

    def api(self, now: float) -> dict[str, Any]:
        status = self.status_at(now)
        out: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
            "completion_window": self.completion_window, "status": status, "created_at": int(self.created_at),
            "expires_at": int(self.created_at + WINDOW_S), "metadata": self.metadata,
        }
        if self.model is not None:
            out["model"] = self.model
        if self.errors:
            out["errors"] = {"object": "list", "data": self.errors}
            out["failed_at"] = int(self._at(_IN_PROGRESS))
            out["request_counts"] = {"total": 0, "completed": 0, "failed": 0}
            return out
        times = {"in_progress_at": _IN_PROGRESS, "finalizing_at": _FINALIZING,
                 "expired_at" if self.expires else "completed_at": 1.0}
        for name, share in times.items():
            if now >= self._at(share) and (self.cancelled_at is None or self._at(share) <= self.cancelled_at):
                out[name] = int(self._at(share))
        if self.cancelled_at is not None and status in ("cancelling", "cancelled"):
            out["cancelling_at"] = int(self.cancelled_at)
            if status == "cancelled":
                out["cancelled_at"] = int(self._cancel_done())
        if self.results_written:
            out["request_counts"] = {"total": self.total, "completed": self.completed, "failed": self.failed}
            for name in ("output_file_id", "error_file_id", "usage"):
                if getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        else:
            done = int(self.total * self.progress(now if self.cancelled_at is None else min(now, self.cancelled_at)))
            out["request_counts"] = {"total": self.total, "completed": done, "failed": 0}
        return out


def _validate(content: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """(lines, errors, model) of an input file: each line a BatchRequestInput for `endpoint`,
    custom_ids unique, one model for all."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()

    def error(code: str, message: str, line: int | None, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": line})

    for n, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            error("invalid_json_line", "This line is not valid JSON.", n)
            continue
        shaped = isinstance(item, dict) and isinstance(item.get("custom_id"), str) and isinstance(item.get("body"), dict)
        if not shaped:
            error("invalid_request", "Each line needs a string 'custom_id' and an object 'body'.", n)
            continue
        if item["custom_id"] in seen:
            error("duplicate_custom_id", f"The custom_id {item['custom_id']!r} is used more than once.", n, "custom_id")
            continue
        if item.get("method") != "POST":
            error("invalid_method", "Only the POST method is supported.", n, "method")
            continue
        if item.get("url") != endpoint:
            error("invalid_url", f"The url must be the batch's endpoint {endpoint}.", n, "url")
            continue
        seen.add(item["custom_id"])
        models.add(str(item["body"].get("model")))
        lines.append(item)
    if not lines and not errors:
        error("empty_file", "The input file holds no requests.", None)
    if len(lines) > MAX_LINES:
        error("too_many_requests", f"A batch holds at most {MAX_LINES} requests; this file has {len(lines)}.", None)
    if len(models) > 1:
        error("mismatched_model", f"All requests of a batch must use the same model; found {sorted(models)}.", None,
              "body.model")
    return lines, errors, next(iter(models)) if len(models) == 1 else None


class BatchStore:
    def __init__(self, state_dir: Path | None):
        self.dir = Path(state_dir) / "batches" if state_dir is not None else None
        self.batches: dict[str, SimBatch] = {}
        if self.dir is not None:
            for path in sorted(self.dir.glob("*.json")):
                try:
                    b = SimBatch.model_validate_json(path.read_bytes())
                except (OSError, ValidationError) as e:
                    log.warning("simulator state: skipping unreadable batch record %s (%s)", path, e)
                    continue
                self.batches[b.id] = b

    def save(self, batch: SimBatch) -> None:
        if self.dir is not None:
            write_model(self.dir / f"{batch.id}.json", batch)
        self.batches[batch.id] = batch


def _new_id(prefix: str, existing, *parts: object) -> str:
    """`<prefix><24 hex>` from the parts, deterministic like the simulator's job ids."""
    n = 0
    while True:
        candidate = prefix + hashlib.sha256("|".join(map(str, (*parts, n))).encode()).hexdigest()[:24]
        if candidate not in existing:
            return candidate
        n += 1


def make_router(sim, answer: Answer) -> APIRouter:
    """`sim`: the app's state (cfg, store); `answer(endpoint, body)`: (status, response body) of
    one request."""
    router = APIRouter(prefix="/v1")
    store = sim.store
    book = BatchStore(store.state_dir)

    def write_results(batch: SimBatch, now: float) -> SimBatch:
        """The output and error files, once the batch has completed or been cancelled."""
        status = batch.status_at(now)
        if batch.results_written or status not in ("completed", "cancelled", "expired"):
            return batch
        lines, _, _ = _validate(store.content(batch.input_file_id), batch.endpoint)
        if status == "cancelled":  # the lines processed before the cancellation are answered
            lines = lines[: int(len(lines) * batch.progress(batch.cancelled_at or now))]
        elif status == "expired":  # the window ran out half way
            lines = lines[: len(lines) // 2]
        out, err = [], []
        usage = {"input_tokens": 0, "output_tokens": 0}
        for item in lines:
            cid = item["custom_id"]
            request_id = "req_" + hashlib.sha256(f"{batch.id}|{cid}".encode()).hexdigest()[:24]
            if rng_for("batch-line", sim.cfg.seed, batch.id, cid).random() < batch.error_rate:
                code, body = 500, {"error": {"message": "The server had an error processing this request "
                                                        "(simulated fault).", "type": "server_error",
                                             "param": None, "code": None}}
            else:
                code, body = answer(batch.endpoint, item["body"])
            line = {"id": f"batch_req_{request_id[4:]}", "custom_id": cid,
                    "response": {"status_code": code, "request_id": request_id, "body": body}, "error": None}
            (out if code == 200 else err).append(line)
            if code == 200:
                usage["input_tokens"] += body["usage"]["prompt_tokens"]
                usage["output_tokens"] += body["usage"].get("completion_tokens", 0)  # embeddings have none
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                data = ("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n").encode()
                file_id = _new_id("file-", store.files, sim.cfg.seed, batch.id, name)
                store.add_file(FileRecord(id=file_id, bytes=len(data), created_at=int(now),
                                          filename=f"{batch.id}_{name.split('_')[0]}.jsonl", purpose="batch_output"),
                               data)
                ids[name] = file_id
        batch = batch.model_copy(update={
            "results_written": True, "completed": len(out), "failed": len(err), **ids,
            "usage": {"input_tokens": usage["input_tokens"], "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": usage["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage["input_tokens"] + usage["output_tokens"]}})
        book.save(batch)
        return batch

    def current(batch_id: str) -> SimBatch:
        batch = book.batches.get(batch_id)
        if batch is None:
            raise not_found("batch", batch_id)
        return write_results(batch, time.time())

    @router.post("/batches")
    async def create(request: Request):
        body = await parse_body(request, BatchCreate)
        if body.endpoint not in ENDPOINTS:
            raise ApiError(400, f"The simulator runs batches for {', '.join(ENDPOINTS)} only, not {body.endpoint!r}.",
                           param="endpoint")
        if body.completion_window != "24h":
            raise ApiError(400, "completion_window must be '24h'.", param="completion_window")
        _check_metadata(body.metadata)
        rec = store.files.get(body.input_file_id)
        if rec is None:
            raise ApiError(400, f"No such file: {body.input_file_id}.", param="input_file_id", code="invalid_file_id")
        if rec.purpose != "batch":
            raise ApiError(400, f"File {rec.id} has purpose {rec.purpose!r}; upload it with purpose 'batch'.",
                           param="input_file_id")
        lines, errors, model = _validate(store.content(rec.id), body.endpoint)
        now = time.time()
        batch_id = _new_id("batch_", book.batches, sim.cfg.seed, rec.id, json.dumps(body.metadata, sort_keys=True))
        batch = SimBatch(id=batch_id, created_at=now, duration_s=sim.cfg.batch_seconds, input_file_id=rec.id,
                         endpoint=body.endpoint, completion_window=body.completion_window, metadata=body.metadata,
                         model=model, total=len(lines), errors=errors or None, error_rate=sim.cfg.batch_error_rate,
                         expires=rng_for("batch-expire", sim.cfg.seed, batch_id).random() < sim.cfg.batch_expire_rate)
        book.save(batch)
        return batch.api(now)

    @router.get("/batches")
    async def list_batches(request: Request):
        now = time.time()
        batches = sorted(book.batches.values(), key=lambda b: (b.created_at, b.id), reverse=True)
        items = [write_results(b, now).api(now) for b in batches]
        return _page(items, request.query_params.get("after"), _limit(request, 20, 100), ids=True)

    @router.get("/batches/{batch_id}")
    async def retrieve(batch_id: str):
        return current(batch_id).api(time.time())

    @router.post("/batches/{batch_id}/cancel")
    async def cancel(batch_id: str):
        batch = current(batch_id)
        now = time.time()
        status = batch.status_at(now)
        if status not in ("validating", "in_progress", "finalizing"):
            raise ApiError(409, f"Cannot cancel a batch with status '{status}'.", param="id")
        batch = batch.model_copy(update={"cancelled_at": now})
        book.save(batch)
        return batch.api(now)

    return router


__all__ = ["BatchStore", "SimBatch", "make_router"]
