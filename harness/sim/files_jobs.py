"""/v1/files and /v1/fine_tuning/jobs with OpenAI's semantics (simulated training).

Shapes and ranges follow OpenAI's official OpenAPI spec v2.3.0 (openai/openai-openapi): OpenAIFile,
ListFilesResponse (with first_id/last_id), ListPaginatedFineTuningJobsResponse and
ListFineTuningJobEventsResponse (object, data, has_more only), FineTuneSupervisedHyperparameters,
CreateFineTuningJobRequest.seed, and the pause/resume routes."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from harness.sim.knowledge import rng_for
from harness.sim.protocol import ApiError, not_found, parse_body, parse_multipart
from harness.sim.store import ORG, STARTED_SHARE, FileRecord, JobRecord
from harness.sim.training import TrainingFileError, derive_params, parse_training_file

PURPOSES = {"assistants", "batch", "fine-tune", "vision", "user_data", "evals"}
# What "auto" (or an absent value) resolves to; OpenAI picks by data size, a fixed choice is enough here.
AUTO_HYPER = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 2.0}


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None


def _hyperparameters(body: JobCreate) -> dict[str, Any]:
    given: dict[str, Any] = {}
    if body.method is not None:
        kind = body.method.get("type")
        if kind != "supervised":
            raise ApiError(400, f"Fine-tuning method {kind!r} is not supported by the simulator; use 'supervised'.", param="method.type")
        given = ((body.method.get("supervised") or {}).get("hyperparameters")) or {}
    elif body.hyperparameters:
        given = body.hyperparameters
    out = dict(AUTO_HYPER)
    # The spec's ranges; learning_rate_multiplier has an exclusive minimum of 0 and no maximum.
    limits = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 0.0, None)}
    for key, value in given.items():
        if key not in limits:
            raise ApiError(400, f"Unknown hyperparameter {key!r}.", param=f"hyperparameters.{key}")
        if value == "auto" or value is None:
            continue
        kind, lo, hi = limits[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ApiError(400, f"Hyperparameter {key} must be a number or 'auto', got {value!r}.", param=f"hyperparameters.{key}")
        if hi is None and not value > lo:
            raise ApiError(400, f"Hyperparameter {key} must be greater than {lo}, got {value!r}.", param=f"hyperparameters.{key}")
        if hi is not None and not lo <= value <= hi:
            raise ApiError(400, f"Hyperparameter {key} must be between {lo} and {hi}, got {value!r}.", param=f"hyperparameters.{key}")
        out[key] = kind(value)
    return out


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16:
        raise ApiError(400, "metadata may hold at most 16 key-value pairs.", param="metadata")
    for k, v in metadata.items():
        if len(k) > 64 or len(v) > 512:
            raise ApiError(400, f"metadata[{k[:64]}]: keys are at most 64 characters, values 512.", param="metadata")


def _page(items: list[dict[str, Any]], after: str | None, limit: int, *, ids: bool = False) -> dict[str, Any]:
    """A cursor page. Only the files list carries first_id/last_id (ListFilesResponse); they are
    strings, never null, so an empty page is {"object": "list", "data": [], "has_more": false}."""
    if after is not None:
        known = [it["id"] for it in items]
        items = items[known.index(after) + 1 :] if after in known else []
    page = items[:limit]
    out: dict[str, Any] = {"object": "list", "data": page, "has_more": len(items) > limit}
    if ids and page:
        out["first_id"], out["last_id"] = page[0]["id"], page[-1]["id"]
    return out


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, got {raw!r}.", param="limit") from None
    if not 1 <= value <= most:
        raise ApiError(400, f"limit must be between 1 and {most}.", param="limit")
    return value


def make_router(sim) -> APIRouter:
    """`sim` is the app's state object (see app.py): cfg, store, knowledge, params_for()."""
    router = APIRouter(prefix="/v1")
    store = sim.store

    # ------------------------------------------------------------------ files
    @router.post("/files")
    async def upload(request: Request):
        fields, files = parse_multipart(await request.body(), request.headers.get("content-type", ""))
        purpose = fields.get("purpose")
        if purpose not in PURPOSES:
            raise ApiError(400, f"'purpose' must be one of {sorted(PURPOSES)}, got {purpose!r}.", param="purpose")
        if "file" not in files:
            raise ApiError(400, "Missing the 'file' part of the upload.", param="file")
        filename, content = files["file"]
        rec = FileRecord(
            id=_stable_id("file", store.files, sim.cfg.seed, hashlib.sha256(content).hexdigest()),
            bytes=len(content),
            created_at=int(time.time()),
            filename=filename or "upload",
            purpose=purpose,
        )
        store.add_file(rec, content)
        return rec.api()

    @router.get("/files")
    async def list_files(request: Request):
        purpose = request.query_params.get("purpose")
        order = request.query_params.get("order", "desc")
        recs = [r for r in store.files.values() if purpose is None or r.purpose == purpose]
        recs.sort(key=lambda r: (r.created_at, r.id), reverse=order != "asc")
        return _page([r.api() for r in recs], request.query_params.get("after"), _limit(request, 10000, 10000), ids=True)

    def _file(file_id: str) -> FileRecord:
        rec = store.files.get(file_id)
        if rec is None:
            raise not_found("file", file_id)
        return rec

    @router.get("/files/{file_id}")
    async def get_file(file_id: str):
        return _file(file_id).api()

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str):
        _file(file_id)
        return Response(store.content(file_id), media_type="application/octet-stream")

    @router.delete("/files/{file_id}")
    async def delete_file(file_id: str):
        _file(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------ jobs
    @router.post("/fine_tuning/jobs")
    async def create_job(request: Request):
        body = await parse_body(request, JobCreate)
        parent = sim.params_for(body.model, finetunable=True)
        if parent is None:
            raise ApiError(
                400,
                f"Model {body.model} is not available for fine-tuning or does not exist "
                "(simulated models: sim-* and their finetunes).",
                param="model",
                code="model_not_available",
            )
        rec = store.files.get(body.training_file)
        if rec is None:
            raise ApiError(400, f"invalid training_file: {body.training_file} (no such file)", param="training_file", code="invalid_file_id")
        if rec.purpose != "fine-tune":
            raise ApiError(400, f"File {rec.id} has purpose {rec.purpose!r}; upload it with purpose 'fine-tune'.", param="training_file")
        if body.validation_file is not None and body.validation_file not in store.files:
            raise ApiError(400, f"invalid validation_file: {body.validation_file}", param="validation_file", code="invalid_file_id")
        _check_metadata(body.metadata)
        hyper = _hyperparameters(body)

        # Deterministic ids (unlike OpenAI's): the simulated finetune's behaviour is seeded by its
        # model name, so the same config must give the same names for runs to be reproducible.
        # Run-specific metadata stays out of the hash; identical requests still get distinct ids.
        job_id = _stable_id("ftjob", store.jobs, sim.cfg.seed, body.model,
                            hashlib.sha256(store.content(rec.id)).hexdigest(), body.suffix,
                            json.dumps(hyper, sort_keys=True), body.seed)
        root = body.model.split(":")[1] if body.model.startswith("ft:") else body.model
        name = f"ft:{root}:{ORG}:{body.suffix or ''}:{job_id[6:14]}"
        error = params = tokens = None
        n = 0
        try:
            data = parse_training_file(store.content(rec.id))
        except TrainingFileError as e:
            error = {"code": "invalid_training_file", "message": f"The training file {rec.id} is invalid: {e}", "param": "training_file"}
        else:
            n = len(data.examples)
            tokens = data.tokens * hyper["n_epochs"]
            params = derive_params(body.model, parent, data, sim.knowledge)
        now = time.time()
        job = JobRecord(
            id=job_id,
            created_at=now,
            duration_s=sim.cfg.job_seconds,
            model=body.model,
            training_file=rec.id,
            validation_file=body.validation_file,
            suffix=body.suffix,
            seed=body.seed if body.seed is not None else rng_for("job-seed", sim.cfg.seed, job_id).randrange(2**31),
            metadata=body.metadata,
            hyperparameters=hyper,
            fine_tuned_model=name,
            validation_error=error,
            fails=rng_for("job-fail", sim.cfg.seed, job_id).random() < sim.cfg.job_failure_rate,
            pauses=[[now + STARTED_SHARE * sim.cfg.job_seconds, None]]
            if error is None and rng_for("job-pause", sim.cfg.seed, job_id).random() < sim.cfg.job_pause_rate else [],
            trained_tokens=tokens,
            n_examples=n,
            params=params,
        )
        store.save_job(job)
        return job.api(time.time())

    @router.get("/fine_tuning/jobs")
    async def list_jobs(request: Request):
        wanted: dict[str, str] = {}
        null_metadata = False
        for key, value in request.query_params.multi_items():
            if key == "metadata" and value == "null":
                null_metadata = True
            elif key.startswith("metadata[") and key.endswith("]"):
                wanted[key[9:-1]] = value
        now = time.time()
        jobs = sorted(store.jobs.values(), key=lambda j: j.created_at, reverse=True)
        if null_metadata:
            jobs = [j for j in jobs if not j.metadata]
        elif wanted:
            jobs = [j for j in jobs if j.metadata and all(j.metadata.get(k) == v for k, v in wanted.items())]
        return _page([j.api(now) for j in jobs], request.query_params.get("after"), _limit(request, 20, 100))

    def _job(job_id: str) -> JobRecord:
        job = store.jobs.get(job_id)
        if job is None:
            raise not_found("fine-tuning job", job_id)
        return job

    @router.get("/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return _job(job_id).api(time.time())

    @router.get("/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        events = _job(job_id).events(time.time())
        return _page(events, request.query_params.get("after"), _limit(request, 20, 100))

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        job = _job(job_id)
        now = time.time()
        status, _ = job.status_at(now)
        if status in ("succeeded", "failed", "cancelled"):
            raise ApiError(400, f"Job {job_id} has already {status}; only a job still in progress can be cancelled.", param="id")
        job = job.model_copy(update={"cancelled_at": now})
        store.save_job(job)
        return job.api(now)

    @router.post("/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(job_id: str):
        job = _job(job_id)
        now = time.time()
        status, _ = job.status_at(now)
        if status not in ("validating_files", "queued", "running"):
            raise ApiError(400, f"Job {job_id} is {status}; only a job in progress can be paused.", param="id")
        job = job.model_copy(update={"pauses": [*job.pauses, [now, None]]})
        store.save_job(job)
        return job.api(now)

    @router.post("/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(job_id: str):
        job = _job(job_id)
        now = time.time()
        if job.status_at(now)[0] != "paused":
            raise ApiError(400, f"Job {job_id} is not paused.", param="id")
        job = job.model_copy(update={"pauses": [*job.pauses[:-1], [job.pauses[-1][0], now]]})
        store.save_job(job)
        return job.api(now)

    return router


def _stable_id(prefix: str, existing, *parts: object) -> str:
    """`prefix-<24 hex>` from the parts; the n-th identical request gets the n-th id."""
    n = 0
    while True:
        digest = hashlib.sha256("|".join(map(str, (*parts, n))).encode()).hexdigest()[:24]
        candidate = f"{prefix}-{digest}"
        if candidate not in existing:
            return candidate
        n += 1
