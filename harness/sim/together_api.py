"""Together AI's fine-tuning API, simulated: `/v1/files/upload` and `/v1/fine-tunes` (create,
list, retrieve, events, cancel, supported models), shaped as Together's published OpenAPI spec
says (togethercomputer/openapi, openapi.yaml of 2026-04-28: FileResponse, FinetuneResponse,
FinetuneResponseTruncated, FinetuneTruncatedList, FinetuneListEvents, FineTuneEvent, ErrorData).

Training is the simulator's own rule (training.py): a finished job's `model_output_name`
(`sim-org/<base>-<suffix>-<8 hex>`) then answers chat calls with the skill its data gave it,
and can be trained further (`from_checkpoint`, by output name or job id, optionally `:STEP`).

Statuses over a job's `job_seconds`: pending, queued (10%), running (20%), uploading (90%),
completed; a bad file ends in `error` at 10% with a `job_error` event naming the problem, and
an injected failure (`job_failure_rate`) at the end. Cancel gives `cancel_requested`, then
`cancelled`. Like Together, a message's `weight` may be 0 or 1 and a conversation starts with
system or user and alternates user/assistant; the simulated training rule reads the answers,
not the weights (as for OpenAI files).

Faults by API key (Together answers these; the simulator has no accounts): a key starting
`sim-invalid` gets 401 on every route, `sim-nocredit` gets 402 when creating a job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.fileio import write_model
from harness.sim.knowledge import rng_for
from harness.sim.models import ModelParams, estimate_tokens, message_text
from harness.sim.protocol import ApiError, parse_body, parse_multipart
from harness.sim.store import ORG, FileRecord
from harness.sim.training import MIN_EXAMPLES, TrainingData, derive_params

log = logging.getLogger(__name__)

USER_ID = "user_sim0000000000000000"
MAX_EPOCHS, MAX_RANK, MIN_BATCH, MAX_BATCH = 20, 64, 8, 32  # what /fine-tunes/models/limits would say
PRICE_PER_M_TOKENS = 0.48  # nominal (Together's LoRA rate up to 16B); SIMULATED: nobody is billed


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="allow")

    training_file: str
    model: str | None = None
    from_checkpoint: str | None = None
    suffix: str | None = Field(None, max_length=40)
    n_epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    batch_size: int | str = "max"
    learning_rate: float = Field(1e-5, gt=0)
    training_type: dict[str, Any] | None = None
    training_method: dict[str, Any] | None = None
    random_seed: int | None = None


class TogetherJob(BaseModel):
    id: str
    created_at: float
    duration_s: float
    model: str  # the root base model
    from_checkpoint: str | None = None
    training_file: str
    suffix: str | None = None
    output_name: str
    request: dict[str, Any]  # the create body as sent (echoed back in responses)
    batch_size: int
    token_count: int = 0
    params: ModelParams | None = None
    file_error: str | None = None
    fails: bool = False
    cancelled_at: float | None = None

    def timeline(self) -> list[tuple[float, str]]:
        t0, d = self.created_at, self.duration_s
        if self.file_error:
            return [(t0, "pending"), (t0 + 0.1 * d, "error")]
        end = "error" if self.fails else "completed"
        return [(t0, "pending"), (t0 + 0.1 * d, "queued"), (t0 + 0.2 * d, "running"), (t0 + 0.9 * d, "uploading"),
                (t0 + d, end)]

    def status_at(self, now: float) -> tuple[str, float]:
        """(status, when it began)."""
        status, since = "pending", self.created_at
        for at, step in self.timeline():
            if self.cancelled_at is not None and self.cancelled_at <= at:
                break
            if at <= now:
                status, since = step, at
        if self.cancelled_at is not None and status not in ("completed", "error"):
            done = self.cancelled_at + 0.05 * self.duration_s
            return ("cancelled", done) if now >= done else ("cancel_requested", self.cancelled_at)
        return status, since

    def events(self, now: float) -> list[dict[str, Any]]:
        texts = {"pending": ("job_pending", "info", "Fine-tune request created"),
                 "queued": ("job_pending", "info", "Job is queued for training"),
                 "running": ("training_start", "info", f"Training started (simulated: {self.params.note if self.params else ''})"),
                 "uploading": ("model_uploading", "info", f"Uploading model {self.output_name}"),
                 "completed": ("job_complete", "info", f"Training completed. Model: {self.output_name}"),
                 "error": ("job_error", "error", self.file_error or
                           "Job failed due to an internal error during training (simulated failure). Create the job again.")}
        out = []
        for i, (at, step) in enumerate(self.timeline()):
            if at > now or (self.cancelled_at is not None and self.cancelled_at <= at):
                break
            out.append(_event(self, i, at, *texts[step]))
        status, since = self.status_at(now)
        if status in ("cancel_requested", "cancelled"):
            out.append(_event(self, 8, self.cancelled_at or now, "cancel_requested", "info", "Cancel requested"))
        if status == "cancelled":
            out.append(_event(self, 9, since, "job_stopped", "info", "Job cancelled"))
        return out

    def truncated(self, now: float) -> dict[str, Any]:
        """FinetuneResponseTruncated (create, list, cancel)."""
        status, since = self.status_at(now)
        r = self.request
        out: dict[str, Any] = {
            "id": self.id, "status": status, "created_at": iso(self.created_at), "updated_at": iso(since),
            "started_at": iso(since), "user_id": USER_ID, "owner_address": "sim@example.invalid",
            "total_price": int(self.token_count * PRICE_PER_M_TOKENS),  # the spec's integer (nano-dollars here)
            "token_count": self.token_count, "events": [], "training_file": self.training_file,
            "model": self.model, "model_output_name": self.output_name, "n_epochs": r.get("n_epochs", 1),
            "n_evals": r.get("n_evals", 0), "n_checkpoints": r.get("n_checkpoints", 1), "batch_size": self.batch_size,
            "learning_rate": r.get("learning_rate", 1e-5), "packing": r.get("packing", True),
            "training_type": r.get("training_type") or {"type": "Lora", "lora_r": 8, "lora_alpha": 16},
            "training_method": r.get("training_method") or {"method": "sft", "train_on_inputs": "auto"},
        }
        for key in ("suffix", "from_checkpoint", "lr_scheduler", "warmup_ratio", "max_grad_norm", "weight_decay",
                    "random_seed"):
            if r.get(key) is not None:
                out[key] = r[key]
        return out

    def full(self, now: float) -> dict[str, Any]:
        """FinetuneResponse (retrieve)."""
        out = self.truncated(now)
        for key in ("user_id", "owner_address", "packing", "suffix", "random_seed"):
            out.pop(key, None)
        method = out["training_method"]
        out.update(job_id=self.id, events=self.events(now), epochs_completed=out["n_epochs"] if out["status"] == "completed" else 0,
                   train_on_inputs=method.get("train_on_inputs", "auto"), queue_depth=0,
                   trainingfile_numlines=self.request.get("_lines", 0), param_count=135_000_000)
        return out


def _event(job: TogetherJob, i: int, at: float, kind: str, level: str, message: str) -> dict[str, Any]:
    return {"object": "fine-tune-event", "created_at": iso(at), "level": level, "message": message, "type": kind,
            "param_count": 135_000_000, "token_count": job.token_count, "total_steps": 10, "wandb_url": "",
            "step": 10 if kind == "job_complete" else 0, "checkpoint_path": "", "model_path": "",
            "training_offset": 0, "hash": hashlib.sha256(f"{job.id}{i}".encode()).hexdigest()[:16]}


def parse_together_file(content: bytes) -> TrainingData:
    """Together's conversational format; raises ValueError naming the line."""
    examples, tokens = [], 0
    try:
        lines = content.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"the file is not UTF-8 (byte {e.start})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"line {i}: expected a JSON object with a 'messages' list") from None
        expect = "user"
        for k, m in enumerate(messages, start=1):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "system" and k == 1:
                continue
            if role != expect:
                raise ValueError(f"line {i}, message {k}: expected role {expect}, got {role!r} (a conversation starts "
                                 f"with system or user and alternates user and assistant)")
            if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
                raise ValueError(f"line {i}, message {k}: weight must be 0 or 1, got {m.get('weight')!r}")
            expect = "assistant" if role == "user" else "user"
            tokens += estimate_tokens(message_text(m.get("content"))) + 3
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"line {i}: the conversation must end with an assistant message")
        examples.append(messages)
    if len(examples) < MIN_EXAMPLES:
        raise ValueError(f"the file has {len(examples)} example(s); at least {MIN_EXAMPLES} are needed")
    return TrainingData(examples=examples, tokens=tokens)


class TogetherJobs:
    """The simulated account's Together jobs, persisted under <state_dir>/together-jobs."""

    def __init__(self, state_dir: Path | None):
        self.dir = state_dir / "together-jobs" if state_dir is not None else None
        self.jobs: dict[str, TogetherJob] = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir is not None else []:
            try:
                job = TogetherJob.model_validate_json(path.read_text(encoding="utf-8"))
            except (OSError, ValidationError) as e:
                log.warning("simulator state: skipping unreadable Together job %s (%s)", path, e)
                continue
            self.jobs[job.id] = job

    def save(self, job: TogetherJob) -> None:
        if self.dir is not None:
            write_model(self.dir / f"{job.id}.json", job)
        self.jobs[job.id] = job

    def resolve(self, ref: str) -> TogetherJob | None:
        """A job by id or output name (`from_checkpoint`; a `:STEP` is accepted and ignored)."""
        ref = ref.split(":", 1)[0]
        return self.jobs.get(ref) or next((j for j in self.jobs.values() if j.output_name == ref), None)

    def finetuned(self, name: str) -> ModelParams | None:
        job = next((j for j in self.jobs.values() if j.output_name == name), None)
        if job is None or job.status_at(time.time())[0] != "completed":
            return None
        return job.params


def _auth(request: Request, *, creating: bool = False) -> None:
    key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not key or key.startswith("sim-invalid"):
        raise ApiError(401, "Invalid API key provided. You can find your API key at "
                            "https://api.together.xyz/settings/api-keys.", type="invalid_api_key",
                       code="invalid_api_key")
    if creating and key.startswith("sim-nocredit"):
        raise ApiError(402, "Credit limit exceeded. Please add credits to your account to continue (simulated).",
                       type="credit_limit", code="payment_required")


def make_router(sim) -> APIRouter:
    """`sim` is the app's state object (app.py): cfg, store (files), together (jobs), params_for()."""
    router = APIRouter(prefix="/v1")
    store, jobs = sim.store, sim.together

    @router.post("/files/upload")
    async def upload(request: Request):
        _auth(request)
        fields, files = parse_multipart(await request.body(), request.headers.get("content-type", ""))
        if fields.get("purpose") not in ("fine-tune", "eval", "eval-sample", "eval-output", "eval-summary",
                                         "batch-generated", "batch-api"):
            raise ApiError(400, f"Invalid purpose {fields.get('purpose')!r}.", param="purpose")
        if "file" not in files or not fields.get("file_name"):
            raise ApiError(400, "An upload needs 'file', 'file_name' and 'purpose'.", param="file")
        content = files["file"][1]
        digest = hashlib.sha256(content + fields["file_name"].encode()).hexdigest()
        n = sum(1 for f in store.files if f.startswith(f"file-{digest[:8]}"))
        rec = FileRecord(id=f"file-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{n:04d}-{digest[16:28]}",
                         bytes=len(content), created_at=int(time.time()), filename=fields["file_name"],
                         purpose=fields["purpose"], shape="together")
        store.add_file(rec, content)
        return rec.api()

    @router.get("/fine-tunes/models/supported")
    async def supported(request: Request):
        _auth(request)
        return {"models": ["sim-base", "sim-strong", "sim-weak"]}

    @router.post("/fine-tunes")
    async def create(request: Request):
        _auth(request, creating=True)
        body = await parse_body(request, JobCreate)
        if body.model is None and body.from_checkpoint is None:
            raise ApiError(400, "Either 'model' or 'from_checkpoint' is required.", param="model")
        parent_job = None
        if body.from_checkpoint is not None:
            parent_job = jobs.resolve(body.from_checkpoint)
            if parent_job is None or parent_job.status_at(time.time())[0] != "completed":
                raise ApiError(400, f"Checkpoint {body.from_checkpoint} not found or its job has not completed.",
                               param="from_checkpoint")
            root, parent = parent_job.model, parent_job.params
        else:
            root = body.model
            parent = sim.params_for(root, finetunable=True) if root.startswith("sim-") else None
            if parent is None:
                raise ApiError(400, f"Model {root} is not supported for fine-tuning. See "
                                    f"/v1/fine-tunes/models/supported for the models you can fine-tune.", param="model")
        rec = store.files.get(body.training_file)
        if rec is None:
            raise ApiError(400, f"File {body.training_file} not found.", param="training_file")
        lora = (body.training_type or {"type": "Lora"})
        if lora.get("type") == "Lora" and not 1 <= int(lora.get("lora_r", 8)) <= MAX_RANK:
            raise ApiError(400, f"lora_r must be between 1 and {MAX_RANK}.", param="training_type.lora_r")
        batch = MAX_BATCH if body.batch_size == "max" else body.batch_size
        if not isinstance(batch, int) or not MIN_BATCH <= batch <= MAX_BATCH:
            raise ApiError(400, f"batch_size must be 'max' or between {MIN_BATCH} and {MAX_BATCH}.", param="batch_size")
        content = store.content(rec.id)
        file_error = params = None
        tokens = lines = 0
        try:
            data = parse_together_file(content)
        except ValueError as e:
            file_error = f"Invalid training file {rec.id}: {e}"
        else:
            lines = len(data.examples)
            tokens = data.tokens * body.n_epochs
            params = derive_params(parent_job.output_name if parent_job else root, parent, data, sim.knowledge)
        key = "|".join(map(str, (sim.cfg.seed, root, body.from_checkpoint, hashlib.sha256(content).hexdigest(),
                                 body.suffix, body.n_epochs, body.learning_rate)))
        n = 0
        while (job_id := "ft-" + _uuid(f"{key}|{n}")) in jobs.jobs:
            n += 1
        short = root.rsplit("/", 1)[-1]
        output = f"{ORG}/{short}-{body.suffix + '-' if body.suffix else ''}{job_id[3:11]}"
        request_echo = {**body.model_dump(exclude_none=True), "_lines": lines}
        job = TogetherJob(id=job_id, created_at=time.time(), duration_s=sim.cfg.job_seconds, model=root,
                          from_checkpoint=body.from_checkpoint, training_file=rec.id, suffix=body.suffix,
                          output_name=output, request=request_echo, batch_size=batch, token_count=tokens,
                          params=params, file_error=file_error,
                          fails=rng_for("together-fail", sim.cfg.seed, job_id).random() < sim.cfg.job_failure_rate)
        jobs.save(job)
        return job.truncated(time.time())

    @router.get("/fine-tunes")
    async def list_jobs(request: Request):
        _auth(request)
        now = time.time()
        return {"data": [j.truncated(now) for j in sorted(jobs.jobs.values(), key=lambda j: j.created_at, reverse=True)]}

    def _job(job_id: str) -> TogetherJob:
        job = jobs.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"Fine-tune job {job_id} not found.", param="id")
        return job

    @router.get("/fine-tunes/{job_id}")
    async def get_job(job_id: str, request: Request):
        _auth(request)
        return _job(job_id).full(time.time())

    @router.get("/fine-tunes/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        _auth(request)
        return {"data": _job(job_id).events(time.time())}

    @router.post("/fine-tunes/{job_id}/cancel")
    async def cancel(job_id: str, request: Request):
        _auth(request)
        job, now = _job(job_id), time.time()
        status, _ = job.status_at(now)
        if status in ("completed", "error", "cancelled", "cancel_requested"):
            raise ApiError(400, f"Job {job_id} is {status}; only a job in progress can be cancelled.", param="id")
        job = job.model_copy(update={"cancelled_at": now})
        jobs.save(job)
        return job.truncated(now)

    return router


def _uuid(text: str) -> str:
    h = hashlib.sha256(text.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
