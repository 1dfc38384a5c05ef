"""Finetuning through OpenAI's fine-tuning API (or any service, such as the built-in simulator,
that speaks it): upload the JSONL file, create a supervised job, poll it, cancel it.

Creating a job has no idempotency key, so a create that timed out on our side may still have
started a job. Every job is therefore tagged with the request's metadata (run, iteration, role,
agent) and `submit` looks the tags up before creating; the lookup and the create are retried
together, so neither a retry nor a resumed run ever starts a second job. Uploads work the same
way: the uploaded filename carries the data's sha256, and a file with that name and size is
reused instead of uploaded again.

The SDK's own retries are off (`max_retries=0`); `harness.llm.retry` is the one retry layer.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import openai
from openai import AsyncOpenAI

from harness.config import openai_ft_range_error
from harness.errors import FinetuneError
from harness.llm.retry import is_terminal, short_error, terminal_message, with_retries
from harness.providers.base import FinetuneProvider, FinetuneRequest, JobState, JobStatus, LossPoint, OnUpdate

log = logging.getLogger(__name__)
T = TypeVar("T")

# OpenAI's documented limits on job metadata and model-name suffixes; checked here so a bad
# tag fails before anything is uploaded.
_MAX_METADATA_PAIRS = 16
_MAX_METADATA_KEY = 64
_MAX_METADATA_VALUE = 512
_MAX_SUFFIX = 64
_DEAD = (JobStatus.FAILED, JobStatus.CANCELLED)
# A metrics event's message, for services that send the message without OpenAI's `data` object.
_STEP_LOSS = re.compile(r"\bstep\s+(\d+)(?:\s*/\s*\d+)?\s*:\s*training loss\s*=\s*([-+0-9.eE]+)", re.IGNORECASE)
_MAX_EVENT_PAGES = 100


def loss_point(event: Any) -> LossPoint | None:
    """The (step, training loss) of a fine-tuning event, if it carries one: OpenAI's "metrics"
    events hold them in `data` ({"step": 12, "train_loss": 0.41, ...}) and in the message
    ("Step 12/100: training loss=0.41")."""
    data = getattr(event, "data", None)
    if isinstance(data, dict) and isinstance(data.get("step"), (int, float)) \
            and isinstance(data.get("train_loss"), (int, float)):
        return LossPoint(step=int(data["step"]), loss=float(data["train_loss"]))
    m = _STEP_LOSS.search(getattr(event, "message", None) or "")
    if m:
        try:
            return LossPoint(step=int(m.group(1)), loss=float(m.group(2)))
        except ValueError:
            return None
    return None


def _first_live(jobs: list[Any]) -> Any | None:
    """The newest job that is running or succeeded; failed and cancelled ones may be redone."""
    return next((j for j in jobs if JobStatus.normalize(getattr(j, "status", None)) not in _DEAD), None)


class OpenAIFinetuneProvider(FinetuneProvider):
    name = "openai"

    def __init__(self, base_url: str | None, api_key: str, *, max_retries: int = 6,
                 poll_interval_s: float = 5.0, timeout_s: float = 120.0,
                 backoff_base_s: float = 0.5, http_client: Any | None = None, paused_timeout_s: float = 1800.0):
        self.base_url = base_url or "https://api.openai.com/v1"
        self.max_retries = max_retries
        self.poll_interval_s = poll_interval_s
        self.paused_timeout_s = paused_timeout_s
        self._backoff_base_s = backoff_base_s
        self._client = AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0,
                                   timeout=timeout_s, http_client=http_client)

    # ------------------------------------------------------------------ plumbing

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` under the retry layer; a final failure becomes a FinetuneError that quotes
        the provider's own message."""
        return await with_retries(fn, self.max_retries, base_url=self.base_url, base_s=self._backoff_base_s,
                                  error=lambda exc, attempts: FinetuneError(self._explain(what, exc, attempts)))

    def _explain(self, what: str, exc: BaseException, attempts: int) -> str:
        status = getattr(exc, "status_code", None)
        if not is_terminal(exc):
            return (f"{what} at {self.base_url} failed after {attempts} attempt(s): {short_error(exc)}; "
                    f"try again later (the run resumes and finds jobs already started)")
        if status in (401, 403):
            return f"{what}: " + terminal_message(exc, base_url=self.base_url)
        # The provider's explanation (bad file, unknown model or job) is passed on as is.
        message = getattr(exc, "message", None) or str(exc)
        if status == 404:
            return (f"{what}: not found at {self.base_url}: {message} (check models.base, the model ids "
                    f"in registry.json and endpoint.base_url)")
        return f"{what} rejected by {self.base_url}: {message}"

    @staticmethod
    def _state(job: Any, latest_event: str | None = None) -> JobState:
        raw = getattr(job, "status", None)
        err = getattr(job, "error", None)
        error = None
        if err is not None:
            # Surface the provider's own message verbatim; fall back to its code.
            error = getattr(err, "message", None) or getattr(err, "code", None) or None
        return JobState(
            job_id=job.id, provider="openai", status=JobStatus.normalize(raw), raw_status=str(raw),
            model_id=getattr(job, "fine_tuned_model", None), file_id=getattr(job, "training_file", None),
            base_model=getattr(job, "model", None),
            trained_tokens=getattr(job, "trained_tokens", None), error=error, latest_event=latest_event,
            created_at=getattr(job, "created_at", None), finished_at=getattr(job, "finished_at", None),
            metadata={str(k): str(v) for k, v in (getattr(job, "metadata", None) or {}).items()})

    @staticmethod
    def _check_request(req: FinetuneRequest) -> None:
        md = req.metadata
        if not md:
            raise FinetuneError("a fine-tuning request needs metadata (run, iteration, role, agent): "
                                "it is how a resumed run finds the job instead of starting another")
        if len(md) > _MAX_METADATA_PAIRS:
            raise FinetuneError(f"job metadata has {len(md)} pairs; the API allows {_MAX_METADATA_PAIRS}")
        for k, v in md.items():
            if len(k) > _MAX_METADATA_KEY or len(v) > _MAX_METADATA_VALUE:
                raise FinetuneError(f"job metadata {k!r}: keys may have {_MAX_METADATA_KEY} characters "
                                    f"and values {_MAX_METADATA_VALUE}")
        if req.suffix is not None and len(req.suffix) > _MAX_SUFFIX:
            raise FinetuneError(f"finetune.suffix {req.suffix!r} is longer than {_MAX_SUFFIX} characters")
        problem = openai_ft_range_error(req.hyperparameters, req.seed)
        if problem:
            raise FinetuneError(f"{problem}; nothing was uploaded")

    # ------------------------------------------------------------------ lookup

    async def _matching(self, metadata: dict[str, str]) -> list[Any]:
        """Jobs whose metadata holds every given pair, newest first. The filter is also applied
        here, so a compatible server that ignores `metadata[k]=v` cannot match someone else's job."""
        found = []
        async for job in self._client.fine_tuning.jobs.list(metadata=metadata, limit=100):
            tags = getattr(job, "metadata", None) or {}
            if all(tags.get(k) == v for k, v in metadata.items()):
                found.append(job)
        found.sort(key=lambda j: (getattr(j, "created_at", 0) or 0, j.id), reverse=True)
        return found

    async def find(self, metadata: dict[str, str]) -> JobState | None:
        jobs = await self._call("looking up fine-tuning jobs", lambda: self._matching(metadata))
        return self._state(jobs[0]) if jobs else None

    async def jobs(self, metadata: dict[str, str]) -> list[JobState]:
        jobs = await self._call("listing fine-tuning jobs", lambda: self._matching(metadata))
        return [self._state(j) for j in jobs]

    async def _upload(self, path: Path) -> str:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        # Content-addressed name: the same bytes map to the same upload across resumes.
        upload_name = f"{path.stem}-{digest[:16]}{path.suffix}"

        async def lookup_or_upload() -> str:
            async for f in self._client.files.list(purpose="fine-tune"):
                if (f.filename == upload_name and f.bytes == len(data)
                        and getattr(f, "status", None) not in ("error", "deleted")):
                    log.info("reusing uploaded file %s for %s", f.id, path.name)
                    return f.id
            created = await self._client.files.create(file=(upload_name, data, "application/jsonl"),
                                                      purpose="fine-tune")
            log.info("uploaded %s as %s", path.name, created.id)
            return created.id

        return await self._call(f"uploading {path.name}", lookup_or_upload)

    # ------------------------------------------------------------------ the interface

    async def submit(self, request: FinetuneRequest) -> JobState:
        self._check_request(request)
        path = Path(request.training_file)
        live = await self._live_job(request.metadata)
        if live is not None:
            log.info("job %s already exists for %s; not creating another", live.job_id, request.metadata)
            return live
        if not path.is_file():
            raise FinetuneError(f"training file {path} does not exist; build the data first")
        file_id = await self._upload(path)
        hp = request.hyperparameters
        params: dict[str, Any] = {
            "model": request.base_model, "training_file": file_id, "metadata": dict(request.metadata),
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
                "learning_rate_multiplier": hp.learning_rate_multiplier}}},
        }
        if request.suffix is not None:
            params["suffix"] = request.suffix
        if request.seed is not None:
            params["seed"] = request.seed

        async def lookup_then_create() -> JobState:
            # Repeated on every attempt: a create that timed out may have started the job.
            live = _first_live(await self._matching(request.metadata))
            if live is not None:
                return self._state(live)
            job = await self._client.fine_tuning.jobs.create(**params)
            log.info("created fine-tuning job %s (%s from %s)", job.id, path.name, request.base_model)
            return self._state(job)

        return await self._call(f"creating a fine-tuning job for {path.name}", lookup_then_create)

    async def _live_job(self, metadata: dict[str, str]) -> JobState | None:
        jobs = await self._call("looking up fine-tuning jobs", lambda: self._matching(metadata))
        live = _first_live(jobs)
        return self._state(live) if live is not None else None

    async def refresh(self, job_id: str) -> JobState:
        job = await self._call(f"reading fine-tuning job {job_id}",
                               lambda: self._client.fine_tuning.jobs.retrieve(job_id))
        latest = await self.events(job_id, limit=1)
        return self._state(job, latest[-1] if latest else None)

    async def events(self, job_id: str, limit: int = 20) -> list[str]:
        async def fetch() -> list[str]:
            page = await self._client.fine_tuning.jobs.list_events(job_id, limit=limit)
            return [e.message for e in page.data]

        try:
            newest_first = await self._call(f"reading events of job {job_id}", fetch)
        except FinetuneError as e:
            # Events are informational: a failure to read them must not stop a poll.
            log.debug("%s", e)
            return []
        return list(reversed(newest_first))

    async def loss_curve(self, job_id: str) -> list[LossPoint]:
        """Every event of the job, page by page (newest first), keeping the metrics ones."""
        points: dict[int, LossPoint] = {}
        after: str | None = None
        for _ in range(_MAX_EVENT_PAGES):
            async def fetch(after=after) -> Any:
                kwargs = {"after": after} if after else {}
                return await self._client.fine_tuning.jobs.list_events(job_id, limit=100, **kwargs)

            page = await self._call(f"reading events of job {job_id}", fetch)
            for event in page.data:
                point = loss_point(event)
                if point is not None:
                    points.setdefault(point.step, point)
            if not page.data or not getattr(page, "has_more", False):
                break
            after = page.data[-1].id
        return [points[s] for s in sorted(points)]

    async def cancel(self, job_id: str) -> JobState:
        try:
            job = await self._call(f"cancelling job {job_id}",
                                   lambda: self._client.fine_tuning.jobs.cancel(job_id))
        except FinetuneError as e:
            # Cancelling a job that already ended is refused; report its final state instead.
            if isinstance(e.__cause__, openai.APIStatusError) and e.__cause__.status_code in (400, 409):
                state = await self.refresh(job_id)
                if state.status.terminal:
                    return state
            raise
        return self._state(job)

    async def wait(self, job_id: str, *, poll_interval_s: float | None = None, max_interval_s: float = 60.0,
                   on_update: OnUpdate | None = None) -> JobState:
        return await super().wait(job_id, poll_interval_s=poll_interval_s or self.poll_interval_s,
                                  max_interval_s=max_interval_s, on_update=on_update)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "OpenAIFinetuneProvider":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
