"""Debate rounds, and the diversity stage's embeddings, through OpenAI's Batch API
(`endpoint.batch: true`): half the price, answers within the completion window instead of seconds.

`BatchChat` is a chat client for the debate (the same `chat(model, messages, sample)` as
LLMClient), so the debate protocol is one implementation whichever way its calls travel. In
batch mode every problem of a split debates at once; each call that the run's cache cannot
answer waits in a queue, and once no new call has arrived for `gather_s` (the whole round has
asked: all problems x agents, then the summaries, then the next round) the queue goes out as one
batch per model (OpenAI's batches hold one model each), through harness.llm.batch_api:

    input JSONL (custom_id = the call's cache key) -> /v1/files (purpose "batch") -> /v1/batches
    -> polled until completed, failed, expired or cancelled -> output and error files read

Each answer goes into the run's cache and usage.jsonl (one line per call, `batch_id` set, cost
at batch price, latency = the batch's turnaround) exactly as a direct call's would, so a run
can switch between batch and direct on --resume and keep every answer. The budget cap reserves
each batch's worst case at batch price before it is submitted.

`embed(model, texts)` is LLMClient.embed's twin for an endpoint embedding model: the same chunks
under the same cache keys, each chunk one line of a /v1/embeddings batch (a batch holds one
endpoint's requests, as OpenAI requires), so the diversity stage too is paid at batch price and
resumes like a debate round. What each result line means is harness.llm.batch_lines.

Resuming: every batch is recorded in run_dir/batches/ before it is sent (batch_records.py). A
resumed run rebuilds the same calls (the debate is deterministic up to the answers, which come
from the cache) and a call held by an unfinished batch of an earlier session waits for that
batch, polled under its recorded id, instead of going out again.

Failed lines: a request answered with a transient error (5xx, 429, 408) in the error file, or
left unanswered because the batch expired, is sent again IN THE NEXT BATCH (together with the
next round's calls if they are gathering), at most `batch_settings.retries` times; a refused
request (other 4xx, e.g. context length) fails at once with the server's message, as a direct
call would (the debate records a context-length refusal as an empty reply and goes on). Nothing
is dropped silently: a request that runs out of retries stops the debate with an error naming
the batch and the server's message, and --resume sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import openai

from harness.errors import BatchUnfinished, HarnessError, LLMError
from harness.llm.batch_api import EMBEDDINGS, ENDPOINT, TERMINAL, BatchApi
from harness.llm.batch_lines import Failure, Outcome, cache_kind, parse_lines, turnaround, value_of
from harness.llm.batch_records import BatchBook, BatchRecord, BatchRequest
from harness.llm.batch_settings import BatchSettings
from harness.config import EndpointConfig
from harness.llm.client import EMBED_CHUNK, ChatResult, LLMClient
from harness.llm.pricing import estimate_cost
from harness.records import Message, SampleId, UsageRecord

log = logging.getLogger(__name__)


@dataclass
class _Call:
    key: str
    endpoint: str  # ENDPOINT (chat) or EMBEDDINGS
    model: str
    sample: SampleId | None
    purpose: str
    body: dict[str, Any]
    prompt_chars: int
    max_output: int  # tokens, for the worst-case cost
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    attempts: int = 0  # batches this call has failed in (this session)


class BatchChat:
    """The debate's chat client (and the diversity stage's embedder) in batch mode. Use as
    `async with BatchChat(...) as chat:`; leaving it cancels the waiting (batches already
    submitted stay recorded for --resume)."""

    def __init__(self, client: LLMClient, api: BatchApi, settings: BatchSettings, run_dir: Path, run: str):
        self.client = client
        self.api = api
        self.settings = settings
        self.run = run
        self.book = BatchBook(run_dir)
        self._waiting: dict[str, _Call] = {}  # cache key -> the call waiting for its answer
        self._queue: list[str] = []  # keys gathering for the next batch
        self._arrivals = 0
        self._gatherer: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}  # record id -> the task seeing it through
        self._tasks: set[asyncio.Task] = set()
        self._reserved: dict[str, float] = {}  # record id -> budget reserved for it

    async def __aenter__(self) -> "BatchChat":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tasks = [t for t in (self._gatherer, *self._tasks) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ the chat client

    async def chat(self, model: str, messages: list[Message], sample: SampleId, *,
                   purpose: str = "debate") -> ChatResult:
        key, body, prompt_chars = self.client.chat_request(model, messages, sample)
        value, rec = await self._ask(_Call(key, ENDPOINT, model, sample, purpose, body, prompt_chars,
                                           self.client.sampling.max_tokens))
        return ChatResult(text=value["text"], cached=rec.cached, usage=rec, finish_reason=value.get("finish_reason"),
                          served_model=value.get("served_model"))

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """LLMClient.embed through the Batch API: every chunk at once, so they share a batch."""
        async def chunk_vectors(chunk: list[str]) -> list[list[float]]:
            key, body, chars = self.client.embed_request(model, chunk)
            value, _ = await self._ask(_Call(key, EMBEDDINGS, model, None, "embed", body, chars, 0))
            return value["vectors"]

        chunks = [list(texts[i:i + EMBED_CHUNK]) for i in range(0, len(texts), EMBED_CHUNK)]
        return [v for vectors in await asyncio.gather(*map(chunk_vectors, chunks)) for v in vectors]

    async def prompt_logprobs(self, *args, **kwargs):
        """vLLM's prompt log-probabilities have no Batch API form: asked directly."""
        return await self.client.prompt_logprobs(*args, **kwargs)

    async def _ask(self, call: _Call) -> tuple[dict[str, Any], UsageRecord]:
        """The call's cached answer, or the answer of the batch it goes out in."""
        hit = self._cached(call)
        if hit is not None:
            return hit
        waiting = self._waiting.get(call.key)
        if waiting is None:
            self._waiting[call.key] = call
            self._enqueue(call.key)
            return await call.future
        # The same request twice at once (a re-entered stage): one line in the batch, and the
        # second caller is logged as a cache hit, as LLMClient does.
        await asyncio.shield(waiting.future)
        hit = self._cached(call)
        assert hit is not None
        return hit

    def _cached(self, call: _Call) -> tuple[dict[str, Any], UsageRecord] | None:
        value = self.client.cache.get(call.key)
        if value is None:
            return None
        rec = UsageRecord(ts=time.time(), model=call.model, sample=call.sample, purpose=call.purpose, prompt_tokens=0,
                          completion_tokens=0, cached_prompt_tokens=0, latency_s=0.0, cost_usd=0.0, cached=True,
                          attempts=0)
        self.client.usage_log.append(rec)
        return value, rec

    # ------------------------------------------------------------------ gathering a round

    def _enqueue(self, key: str) -> None:
        self._queue.append(key)
        self._arrivals += 1
        if self._gatherer is None or self._gatherer.done():
            self._gatherer = asyncio.create_task(self._gather())

    async def _gather(self) -> None:
        while self._queue:
            # A round's calls arrive together; it is complete once none has come for gather_s.
            seen = -1
            while seen != self._arrivals:
                seen = self._arrivals
                await asyncio.sleep(self.settings.gather_s)
            keys, self._queue = self._queue, []
            self._spawn(self._dispatch(keys))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _dispatch(self, keys: list[str]) -> None:
        """Calls held by an unfinished batch wait for it; the others go out in new batches."""
        held = self.book.open_for()
        records: dict[str, BatchRecord] = {}
        fresh: dict[tuple[str, str], list[_Call]] = {}  # (endpoint, model) -> calls
        for key in keys:
            call = self._waiting.get(key)
            if call is None or call.future.done():
                continue
            rec = held.get(key)
            if rec is not None:
                records[rec.id] = rec
            else:
                fresh.setdefault((call.endpoint, call.model), []).append(call)
        for (endpoint, model), calls in fresh.items():
            for start in range(0, len(calls), self.settings.max_requests):
                rec = self._prepare(endpoint, model, calls[start:start + self.settings.max_requests])
                if rec is not None:
                    records[rec.id] = rec
        await asyncio.gather(*(self._see_through(rec) for rec in records.values()))

    def _prepare(self, endpoint: str, model: str, calls: list[_Call]) -> BatchRecord | None:
        """Writes the batch's input and record (state prepared) before anything is sent."""
        requests, lines = [], []
        for c in calls:
            est = estimate_cost(c.model, c.prompt_chars, c.max_output, self.client.prices, batch=True)
            requests.append(BatchRequest(custom_id=c.key, model=c.model, sample=c.sample, purpose=c.purpose,
                                         est_cost_usd=est))
            lines.append(json.dumps({"custom_id": c.key, "method": "POST", "url": endpoint, "body": c.body},
                                    ensure_ascii=False, separators=(",", ":")))
        rec = BatchRecord(id=uuid.uuid4().hex[:20], run=self.run, model=model, endpoint=endpoint, requests=requests)
        try:
            # The whole batch's worst case at batch price, reserved before it is submitted.
            reserved = self.client.reserve_budget(model, sum(r.est_cost_usd or 0.0 for r in requests)
                                                  if all(r.est_cost_usd is not None for r in requests) else None)
        except HarnessError as e:
            self._fail([c.key for c in calls], e)
            return None
        self._reserved[rec.id] = reserved
        self.book.prepare(rec, ("\n".join(lines) + "\n").encode("utf-8"))
        log.info("batch %s: %d requests to %s (%s) prepared", rec.id, len(requests), model, endpoint)
        return rec

    def _see_through(self, rec: BatchRecord) -> asyncio.Task:
        """One task per batch record, however many dispatches wait for it."""
        task = self._running.get(rec.id)
        if task is None or task.done():
            task = self._spawn(self._run(rec))
            self._running[rec.id] = task
        return task

    # ------------------------------------------------------------------ one batch, start to end

    async def _run(self, rec: BatchRecord) -> None:
        keys = [r.custom_id for r in rec.requests]
        try:
            rec = await self._submit(rec)
            if rec.state == "abandoned":
                self._requeue(keys)
                return
            batch = await self._wait(rec)
            await self._read(rec, batch)
        except HarnessError as e:
            self._fail(keys, e)
        except Exception as e:  # a bug or an unexpected answer: reported, never a silent hang
            self._fail(keys, LLMError(f"batch {rec.batch_id or rec.id}: {type(e).__name__}: {e}"))
        finally:
            reserved = self._reserved.pop(rec.id, 0.0)
            if reserved:
                self.client.release_budget(reserved)

    async def _submit(self, rec: BatchRecord) -> BatchRecord:
        if rec.batch_id is not None:
            return rec
        if rec.state != "prepared" or rec.id not in self._reserved:
            # An earlier session prepared it: find out whether it was ever created.
            found = await self.api.find(rec.id, rec.created_at)
            if found is None:
                log.info("batch %s of an earlier session was never created: its requests go out again", rec.id)
                rec = rec.model_copy(update={"state": "abandoned"})
                self.book.save(rec)
                return rec
            rec = rec.model_copy(update={"state": "submitted", "batch_id": found.id, "status": found.status})
            self.book.save(rec)
            return rec
        if rec.input_file_id is None:
            content = self.book.input_path(rec).read_bytes()
            file_id = await self.api.upload(rec.filename, content, rec.created_at)
            rec = rec.model_copy(update={"state": "uploaded", "input_file_id": file_id})
            self.book.save(rec)
        batch = await self.api.submit(rec.id, rec.run, rec.input_file_id, self.settings.completion_window,
                                      rec.created_at, rec.endpoint)
        rec = rec.model_copy(update={"state": "submitted", "batch_id": batch.id, "status": batch.status})
        self.book.save(rec)
        log.info("batch %s submitted as %s (%d requests)", rec.id, batch.id, len(rec.requests))
        return rec

    async def _wait(self, rec: BatchRecord) -> Any:
        assert rec.batch_id is not None
        started = time.monotonic()
        limit = self.settings.wait_limit_s()
        while True:
            batch = await self.api.retrieve(rec.batch_id)
            if batch.status != rec.status:
                rec = rec.model_copy(update={"status": batch.status})
                self.book.save(rec)
            if batch.status in TERMINAL:
                return batch
            if time.monotonic() - started > limit:
                raise BatchUnfinished(
                    f"batch {rec.batch_id} is still {batch.status} after {limit:.0f}s of waiting "
                    f"(endpoint.batch_settings.max_wait_s). Nothing is lost: resume the run later with --resume and "
                    f"it polls the same batch, which is never submitted again.")
            await asyncio.sleep(self.settings.poll_interval_s)

    async def _read(self, rec: BatchRecord, batch: Any) -> None:
        outcome = Outcome()
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                parse_lines(await self.api.content(file_id), outcome)
        requests = {r.custom_id: r for r in rec.requests}
        if batch.status == "failed":  # the whole file was refused at validation
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            detail = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors)
            failure = Failure(None, "batch_failed", f"batch {batch.id} failed validation: {detail or 'no detail'}",
                               transient=False)
        else:
            why = {"expired": "the batch expired before answering it",
                   "cancelled": "the batch was cancelled before answering it"}.get(batch.status,
                                                                                  "the batch returned no line for it")
            failure = Failure(None, batch.status, why, transient=batch.status == "expired")
        for cid in requests:
            if cid not in outcome.answers and cid not in outcome.failures:
                outcome.failures[cid] = failure
        latency = turnaround(batch)
        for cid, line in list(outcome.answers.items()):
            req = requests.get(cid)
            if req is None:
                continue
            call = self._waiting.get(cid)
            inputs = len(call.body["input"]) if call is not None and rec.endpoint == EMBEDDINGS else None
            try:
                value = value_of(rec.endpoint, line["response"]["body"], req.model, self.client.prices, inputs)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                del outcome.answers[cid]
                outcome.failures[cid] = Failure(200, "malformed", f"an answer that does not fit its request ({e})",
                                                transient=False)
                continue
            self._record_answer(req, rec.endpoint, value, batch.id, latency)
        self._handle_failures(batch.id, outcome.failures, requests)
        self.book.save(rec.model_copy(update={"state": "done", "status": batch.status,
                                              "output_file_id": batch.output_file_id,
                                              "error_file_id": batch.error_file_id,
                                              "answered": len(outcome.answers), "failed": len(outcome.failures)}))

    def _record_answer(self, req: BatchRequest, endpoint: str, value: dict[str, Any], batch_id: str,
                       latency_s: float) -> None:
        """usage.jsonl first, then the cache (which serves it): a crash between the two leaves a
        usage line whose answer a resumed run reads again from the batch's output, not twice."""
        call_id = f"{batch_id}/{req.custom_id}"
        rec = UsageRecord(ts=time.time(), model=req.model, sample=req.sample, purpose=req.purpose,
                          prompt_tokens=value.get("prompt_tokens"), completion_tokens=value.get("completion_tokens"),
                          cached_prompt_tokens=value.get("cached_prompt_tokens"), latency_s=round(latency_s, 3),
                          cost_usd=value.get("cost_usd"), cached=False, attempts=1, call_id=call_id,
                          batch_id=batch_id)
        if not self.client.usage_log.has_call(call_id):
            self.client.usage_log.append(rec)
        self.client.cache.put(req.custom_id, cache_kind(endpoint), req.model, value, usage=rec.model_dump(mode="json"))
        call = self._waiting.pop(req.custom_id, None)
        if call is not None and not call.future.done():
            call.future.set_result((value, rec))

    def _handle_failures(self, batch_id: str, failures: dict[str, Failure], requests: dict[str, BatchRequest]) -> None:
        again: list[str] = []
        for cid, f in failures.items():
            call = self._waiting.get(cid)
            if call is None or call.future.done():
                continue  # nobody waits for it now: a later session sends it again if it is needed
            call.attempts += 1
            if f.transient and call.attempts <= self.settings.retries:
                again.append(cid)
                continue
            batches = f"{call.attempts} batch" + ("es" if call.attempts != 1 else "")
            tries = (f" (failed in {batches}; endpoint.batch_settings.retries={self.settings.retries})"
                     if f.transient else "")
            what = call.sample.key() if call.sample is not None else f"{len(call.body['input'])} embeddings"
            self._fail([cid], LLMError(
                f"batch {batch_id}: the request for {what} ({call.model}) failed: {f.message}{tries}. "
                f"The run can be resumed with --resume: it is sent again.", status=f.status, code=f.code))
        if again:
            log.warning("batch %s: %d request(s) failed (e.g. %s); they go out again in the next batch", batch_id,
                        len(again), failures[again[0]].message)
            self._requeue(again)

    def _requeue(self, keys: list[str]) -> None:
        for key in keys:
            call = self._waiting.get(key)
            if call is not None and not call.future.done():
                self._enqueue(key)

    def _fail(self, keys: list[str], error: BaseException) -> None:
        for key in keys:
            call = self._waiting.pop(key, None)
            if call is not None and not call.future.done():
                call.future.set_exception(error)


@contextlib.asynccontextmanager
async def debate_client(endpoint: EndpointConfig, client: LLMClient, run_dir: Path, run: str,
                        base_url: str) -> AsyncIterator[Any]:
    """The client a debate's chats (and the diversity stage's endpoint embeddings) go through:
    `client` itself, or with endpoint.batch a BatchChat over it."""
    if not endpoint.batch:
        waiting = [r.batch_id for r in BatchBook(run_dir).records.values() if r.state == "submitted"]
        if waiting:
            log.warning("endpoint.batch is off, but batch(es) %s of an earlier session are still open: their "
                        "requests are asked again directly (and paid twice); resume with --set endpoint.batch=true "
                        "to wait for them instead", ", ".join(map(str, waiting)))
        yield client
        return
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key=endpoint.api_key(), max_retries=0, timeout=endpoint.timeout_s)
    try:
        api = BatchApi(sdk, base_url, max_retries=endpoint.max_retries, api_key_env=endpoint.api_key_env)
        async with BatchChat(client, api, endpoint.batch_settings, run_dir, run) as chat:
            yield chat
    finally:
        await sdk.close()


__all__ = ["BatchChat", "debate_client"]
