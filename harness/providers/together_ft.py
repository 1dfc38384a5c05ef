"""Finetuning through Together AI's fine-tuning API: upload the JSONL file (`POST /files/upload`),
create a LoRA job (`POST /fine-tunes`), poll it (`GET /fine-tunes/{id}`, `/events`), cancel it.
Shapes follow Together's published OpenAPI spec (togethercomputer/openapi, openapi.yaml of
2026-04-28); the simulator serves the same shapes (harness/sim/together_api.py).

Plain HTTP through the OpenAI client's raw `get`/`post`, not the `together` SDK: the harness
already depends on that client (and its httpx2 transport) for chat, its errors are the ones the
one retry layer (`harness.llm.retry`) classifies (429s, 5xx, timeouts, 401), and its own retries
are off (`max_retries=0`). The SDK would add a second HTTP stack with retries and exceptions of
its own, for five routes. Together's errors have OpenAI's shape ({"error": {"message", ...}}).

Jobs carry no metadata on Together, so the tags are put where Together keeps what we send:
* the job's `suffix` ends in a hash of all the tags (run, iteration, role, agent, data sha256):
  `submit` lists the jobs and looks the hash up before creating, on every attempt, so neither a
  retried create nor a resumed run starts a second job;
* the uploaded file's name spells the tags out (`<run>.i<iteration>.<role>.a<agent>.<sha16>.jsonl`),
  so `jobs(partial tags)` (a run's jobs, when its registry must be rebuilt) reads them back from
  `GET /files/{training_file}` of each job the hash marks as ours.

A job's start: the base model (`model`) at iteration 1 or with `start_from: base`; the agent's
previous Together model (`from_checkpoint`, its output name) after that. With `from_checkpoint`
no `model` is sent, as Together's own SDK does ("a model or a checkpoint, not both"), although
the spec lists `model` as required.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import openai
from openai import AsyncOpenAI

from harness.errors import ConfigError, FinetuneError
from harness.llm.pricing_together import needs_dedicated_endpoint
from harness.llm.retry import is_terminal, short_error, with_retries
from harness.providers.base import FinetuneProvider, FinetuneRequest, JobState, JobStatus, OnUpdate
from harness.providers.together_data import together_training_data
from harness.providers.together_settings import MAX_SUFFIX, TogetherSettings, together_epochs_error

log = logging.getLogger(__name__)
T = TypeVar("T")

TOGETHER_BASE_URL = "https://api.together.xyz/v1"
TAGS = ("harness_run", "iteration", "role", "agent", "data_sha256")
_HASH = 12
_TAG_RE = re.compile(rf"-([0-9a-f]{{{_HASH}}})$")
_NAME_RE = re.compile(r"^(?P<harness_run>.+)\.i(?P<iteration>\d+)\.(?P<role>[a-z]+)\.a(?P<agent>\d+)"
                      r"\.(?P<data_sha256>[0-9a-f]+)\.jsonl$")
# Together's statuses (FinetuneJobStatus) in the harness's terms.
_STATUS = {"pending": JobStatus.QUEUED, "queued": JobStatus.QUEUED, "running": JobStatus.RUNNING,
           "compressing": JobStatus.RUNNING, "uploading": JobStatus.RUNNING, "cancel_requested": JobStatus.RUNNING,
           "cancelled": JobStatus.CANCELLED, "error": JobStatus.FAILED, "completed": JobStatus.SUCCEEDED}
_AUTH = {"security": {"bearer_auth": True}}


def tag_hash(metadata: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:_HASH]


def file_name(metadata: dict[str, str]) -> str:
    return (f"{metadata['harness_run']}.i{metadata['iteration']}.{metadata['role']}.a{metadata['agent']}."
            f"{metadata['data_sha256']}.jsonl")


def tags_from_file_name(name: str | None) -> dict[str, str]:
    m = _NAME_RE.match(name or "")
    return dict(m.groupdict()) if m else {}


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return float(value) if isinstance(value, (int, float)) else None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class TogetherFinetuneProvider(FinetuneProvider):
    name = "together"

    def __init__(self, base_url: str | None, api_key: str, *, base_model: str,
                 settings: TogetherSettings | None = None, n_epochs: int = 2, learning_rate_multiplier: float = 1.0,
                 max_retries: int = 6, poll_interval_s: float = 5.0, timeout_s: float = 120.0,
                 backoff_base_s: float = 0.5, paused_timeout_s: float = 1800.0, http_client: Any | None = None):
        problem = together_epochs_error(n_epochs)
        if problem:
            raise ConfigError(f"{problem}; change it before the run (nothing was called)")
        self.base_url = (base_url or TOGETHER_BASE_URL).rstrip("/")
        self.base_model = base_model
        self.settings = settings or TogetherSettings()
        self.n_epochs, self.lr_multiplier = n_epochs, learning_rate_multiplier
        self.max_retries, self.poll_interval_s, self.paused_timeout_s = max_retries, poll_interval_s, paused_timeout_s
        self._backoff_base_s = backoff_base_s
        self._client = AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout_s,
                                   http_client=http_client)
        self._file_tags: dict[str, dict[str, str]] = {}  # file id -> tags (file names never change)
        tuned = self.settings.model or base_model
        if "together" in self.base_url and needs_dedicated_endpoint(tuned, self.settings.lora,
                                                                    self.settings.serverless_lora_models):
            log.warning("Together serves finetunes of %s%s only from a dedicated endpoint (billed per hour): attach "
                        "the adapters to one before the next debate (docs/providers/together.md)", tuned,
                        "" if self.settings.lora else " (full finetunes)")

    # ------------------------------------------------------------------ plumbing

    async def _get(self, path: str) -> Any:
        return await self._client.get(path, cast_to=object, options=_AUTH)

    async def _post(self, path: str, body: dict | None = None, **kw: Any) -> Any:
        return await self._client.post(path, body=body, cast_to=object, options={**_AUTH, **kw.pop("options", {})}, **kw)

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(fn, self.max_retries, base_url=self.base_url, base_s=self._backoff_base_s,
                                  error=lambda exc, attempts: FinetuneError(self._explain(what, exc, attempts)))

    def _explain(self, what: str, exc: BaseException, attempts: int) -> str:
        status = getattr(exc, "status_code", None)
        message = getattr(exc, "message", None) or str(exc)
        if status == 429 or not is_terminal(exc):
            return (f"{what} at {self.base_url} failed after {attempts} attempt(s): {short_error(exc)}; Together is "
                    f"busy or rate-limiting this key (or, on a 429 that persists, the account is out of credit: "
                    f"https://api.together.ai/settings/billing): try again later with --resume (jobs already "
                    f"started are found, not repeated)")
        if status in (401, 403):
            return (f"{what}: Together refused the API key ({status}: {message}). Check the key in the environment "
                    f"variable named by endpoint.api_key_env (TOGETHER_API_KEY), e.g. `export TOGETHER_API_KEY=...` "
                    f"with a key from https://api.together.ai/settings/api-keys")
        if status == 402:
            return (f"{what}: Together says the account has no credit left ({message}). Add credit or raise the "
                    f"limit at https://api.together.ai/settings/billing, then continue with --resume")
        if status in (400, 404) and "model" in message.lower() and ("support" in message.lower()
                                                                    or "not found" in message.lower()):
            return (f"{what}: Together cannot finetune this model ({message}). Set models.base to a model on "
                    f"Together's fine-tuning list (GET {self.base_url}/fine-tunes/models/supported, or "
                    f"https://docs.together.ai/docs/fine-tuning-models)")
        return f"{what} rejected by {self.base_url} ({status}): {message}"

    def _state(self, job: dict, events: list[dict] | None = None, tags: dict[str, str] | None = None) -> JobState:
        raw = str(job.get("status"))
        status = _STATUS.get(raw, JobStatus.UNKNOWN)
        events = events if events is not None else job.get("events") or []
        latest = events[-1].get("message") if events else None
        error = None
        if status is JobStatus.FAILED:
            # Together reports why a job failed in its events (type job_error / level error).
            failed = [e for e in events if e.get("type") == "job_error" or e.get("level") == "error"]
            error = (failed[-1] if failed else {}).get("message") or f"the job ended in status {raw!r} without a message"
        finished = _epoch(job.get("updated_at")) if status.terminal else None
        return JobState(job_id=str(job["id"]), provider=self.name, status=status, raw_status=raw,
                        model_id=job.get("model_output_name") if status is JobStatus.SUCCEEDED else None,
                        base_model=job.get("from_checkpoint") or job.get("model"), file_id=job.get("training_file"),
                        trained_tokens=job.get("token_count"), error=error, latest_event=latest,
                        created_at=_epoch(job.get("created_at")), finished_at=finished, metadata=tags or {})

    # ------------------------------------------------------------------ lookup

    @staticmethod
    def _hash_of(job: dict) -> str | None:
        for text in (job.get("suffix"), job.get("model_output_name")):
            m = _TAG_RE.search(text or "") or re.search(rf"-([0-9a-f]{{{_HASH}}})-[0-9a-f]+$", text or "")
            if m:
                return m.group(1)
        return None

    async def _list(self) -> list[dict]:
        page = await self._get("/fine-tunes")
        jobs = [j for j in (page or {}).get("data") or [] if isinstance(j, dict) and j.get("id")]
        jobs.sort(key=lambda j: (_epoch(j.get("created_at")) or 0, str(j["id"])), reverse=True)
        return jobs

    async def _tags(self, job: dict) -> dict[str, str]:
        file_id = job.get("training_file")
        if not file_id:
            return {}
        if file_id not in self._file_tags:
            try:
                info = await self._get(f"/files/{file_id}")
            except openai.NotFoundError:
                info = {}
            self._file_tags[file_id] = tags_from_file_name((info or {}).get("filename"))
        return self._file_tags[file_id]

    async def _matching(self, metadata: dict[str, str]) -> list[tuple[dict, dict[str, str]]]:
        """Our jobs whose tags hold every given pair, newest first, with their tags."""
        jobs = [j for j in await self._list() if self._hash_of(j)]
        if set(metadata) == set(TAGS):  # a whole tag set: the suffix's hash decides, no file lookups
            want = tag_hash(metadata)
            return [(j, dict(metadata)) for j in jobs if self._hash_of(j) == want]
        out = []
        for j in jobs:
            tags = await self._tags(j)
            if tags and tag_hash(tags) == self._hash_of(j) and all(tags.get(k) == v for k, v in metadata.items()):
                out.append((j, tags))
        return out

    async def find(self, metadata: dict[str, str]) -> JobState | None:
        found = await self._call("looking up Together fine-tuning jobs", lambda: self._matching(metadata))
        return self._state(found[0][0], tags=found[0][1]) if found else None

    async def jobs(self, metadata: dict[str, str]) -> list[JobState]:
        found = await self._call("listing Together fine-tuning jobs", lambda: self._matching(metadata))
        return [self._state(j, tags=t) for j, t in found]

    # ------------------------------------------------------------------ submit

    def _suffix(self, request: FinetuneRequest) -> str:
        keep = MAX_SUFFIX - _HASH - 1
        prefix = re.sub(r"[^A-Za-z0-9-]+", "-", request.suffix or "mf").strip("-")[:keep].strip("-") or "mf"
        return f"{prefix}-{tag_hash(request.metadata)}"

    def _check_request(self, request: FinetuneRequest) -> None:
        missing = [k for k in TAGS if k not in request.metadata]
        extra = sorted(set(request.metadata) - set(TAGS))
        if missing or extra:
            raise FinetuneError(f"a Together job is tagged with exactly {', '.join(TAGS)} (its suffix and file name "
                                f"carry them); got {sorted(request.metadata)}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", request.metadata["harness_run"]):
            raise FinetuneError(f"run id {request.metadata['harness_run']!r} cannot be part of a file name on Together")

    def _create_body(self, request: FinetuneRequest, file_id: str, weighted: bool) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {
            "training_file": file_id, "suffix": self._suffix(request), "n_epochs": self.n_epochs,
            "batch_size": s.batch_size, "learning_rate": s.learning_rate * self.lr_multiplier,
            "lr_scheduler": {"lr_scheduler_type": s.lr_scheduler, "lr_scheduler_args": (
                {"min_lr_ratio": s.min_lr_ratio, "num_cycles": 0.5} if s.lr_scheduler == "cosine"
                else {"min_lr_ratio": s.min_lr_ratio})},
            "warmup_ratio": s.warmup_ratio, "max_grad_norm": s.max_grad_norm, "weight_decay": s.weight_decay,
            "n_checkpoints": 1, "n_evals": 0,
            # Explicit weights on every message need train_on_inputs (Together's own rule).
            "training_method": {"method": "sft", "train_on_inputs": True if weighted else s.train_on_inputs},
            "training_type": ({"type": "Lora", "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
                               "lora_dropout": s.lora_dropout, "lora_trainable_modules": s.lora_trainable_modules}
                              if s.lora else {"type": "Full"}),
        }
        if request.base_model == self.base_model:
            body["model"] = self.settings.model or request.base_model
        else:
            body["from_checkpoint"] = request.base_model  # the agent's previous Together model
        if request.seed is not None:
            body["random_seed"] = request.seed
        return body

    async def _upload(self, request: FinetuneRequest) -> tuple[str, bool]:
        data = together_training_data(Path(request.training_file))
        name = file_name(request.metadata)

        async def upload() -> str:
            created = await self._post("/files/upload", body={"purpose": "fine-tune", "file_name": name,
                                                              "file_type": "jsonl"},
                                       files=[("file", (name, data.content, "application/jsonl"))],
                                       options={"headers": {"Content-Type": "multipart/form-data"}})
            log.info("uploaded %s as %s", Path(request.training_file).name, created["id"])
            return str(created["id"])

        file_id = await self._call(f"uploading {Path(request.training_file).name} to Together", upload)
        self._file_tags[file_id] = dict(request.metadata)
        return file_id, data.weighted

    async def submit(self, request: FinetuneRequest) -> JobState:
        self._check_request(request)
        path = Path(request.training_file)
        live = await self._live(request.metadata)
        if live is not None:
            log.info("job %s already exists for %s; not creating another", live.job_id, request.metadata)
            return live
        if not path.is_file():
            raise FinetuneError(f"training file {path} does not exist; build the data first")
        file_id, weighted = await self._upload(request)
        body = self._create_body(request, file_id, weighted)

        async def lookup_then_create() -> JobState:
            # Repeated on every attempt: a create that timed out may have started the job.
            live = await self._live_now(request.metadata)
            if live is not None:
                return live
            job = await self._post("/fine-tunes", body=body)
            log.info("created Together job %s (%s from %s)", job.get("id"), path.name, request.base_model)
            return self._state(job, tags=dict(request.metadata))

        return await self._call(f"creating a Together fine-tuning job for {path.name}", lookup_then_create)

    async def _live_now(self, metadata: dict[str, str]) -> JobState | None:
        for job, tags in await self._matching(metadata):
            state = self._state(job, tags=tags)
            if state.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                return state
        return None

    async def _live(self, metadata: dict[str, str]) -> JobState | None:
        return await self._call("looking up Together fine-tuning jobs", lambda: self._live_now(metadata))

    # ------------------------------------------------------------------ follow, cancel

    async def refresh(self, job_id: str) -> JobState:
        job = await self._call(f"reading Together job {job_id}", lambda: self._get(f"/fine-tunes/{job_id}"))
        events = await self._events(job_id)
        return self._state(job, events if events is not None else None, tags=await self._safe_tags(job))

    async def _safe_tags(self, job: dict) -> dict[str, str]:
        try:
            return await self._tags(job)
        except openai.OpenAIError:
            return {}

    async def _events(self, job_id: str) -> list[dict] | None:
        try:
            page = await self._call(f"reading events of Together job {job_id}",
                                    lambda: self._get(f"/fine-tunes/{job_id}/events"))
        except FinetuneError as e:
            log.debug("%s", e)  # events are informational: a failure to read them must not stop a poll
            return None
        events = [e for e in (page or {}).get("data") or [] if isinstance(e, dict)]
        return sorted(events, key=lambda e: _epoch(e.get("created_at")) or 0)

    async def events(self, job_id: str, limit: int = 20) -> list[str]:
        return [str(e.get("message")) for e in (await self._events(job_id) or [])][-limit:]

    async def cancel(self, job_id: str) -> JobState:
        try:
            job = await self._call(f"cancelling Together job {job_id}",
                                   lambda: self._post(f"/fine-tunes/{job_id}/cancel"))
        except FinetuneError as e:
            if isinstance(e.__cause__, openai.APIStatusError) and e.__cause__.status_code in (400, 409):
                state = await self.refresh(job_id)
                if state.status.terminal:
                    return state
            raise
        return self._state(job, tags=await self._safe_tags(job))

    async def wait(self, job_id: str, *, poll_interval_s: float | None = None, max_interval_s: float = 60.0,
                   on_update: OnUpdate | None = None) -> JobState:
        return await super().wait(job_id, poll_interval_s=poll_interval_s or self.poll_interval_s,
                                  max_interval_s=max_interval_s, on_update=on_update)

    async def close(self) -> None:
        await self._client.close()
