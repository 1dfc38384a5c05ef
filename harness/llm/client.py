"""LLMClient: every chat and embedding call of a run goes through here.

One AsyncOpenAI client against any OpenAI-compatible base_url (OpenAI, vLLM, the simulator),
with: pacing under the server's rate limits and a concurrency limit (pacing.py), exactly one
retry layer (ours; the SDK's is off), the run's response cache, one usage.jsonl line per call or
cache hit, a journal of requests in flight (journal.py), costs from the price table, and the
budget cap.

What is sent follows OpenAI's current chat API: the output limit as `max_completion_tokens`
(vLLM accepts it too; `endpoint.max_tokens_param` names it for older servers), and for OpenAI's
reasoning models (`endpoint.reasoning_models`) no temperature or top_p, which they refuse. The
cache key is built from the logical parameters, so neither changes the keys of existing runs.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import openai

from harness.config import EndpointConfig, SamplingConfig
from harness.errors import HarnessError
from harness.llm import responses
from harness.llm.cache import CACHE_NAME, ResponseCache, cache_key
from harness.llm.ledger import Ledger, outcome
from harness.llm.pacing import Pacer
from harness.llm.pricing import check_overrides, estimate_cost
from harness.llm.responses import ChatResult, PromptLogprobs, dump_messages, sample_seed
from harness.llm.retry import (BACKOFF_BASE_S, BACKOFF_CAP_S, MalformedResponse, cannot_connect, final_error,
                               retrying)
from harness.llm.transport import Sending, http_client, sending
from harness.llm.usage import UsageLog, UsageTotals
from harness.records import Message, SampleId, UsageRecord

log = logging.getLogger(__name__)

# Inputs per /embeddings request: well under OpenAI's 2048 and small enough that one
# request body stays modest; each chunk is cached on its own.
EMBED_CHUNK = 256
# At close, calls still in flight (a caller that stopped waiting for them) get this long to end
# and be recorded before they are cancelled and the journal is closed.
DRAIN_S = 10.0


class _OwnerCancelled(Exception):
    """The call that identical in-flight requests were sharing was cancelled by its own caller."""


class LLMClient:
    def __init__(self, *, base_url: str | Sequence[str], api_key: str, run_dir: Path, endpoint: EndpointConfig,
                 sampling: SamplingConfig, budget_usd: float | None = None,
                 prices: dict[str, dict[str, float]] | None = None, seed: int = 0,
                 backoff_base_s: float = BACKOFF_BASE_S, backoff_cap_s: float = BACKOFF_CAP_S):
        """`backoff_*`: the exponential backoff used when a server gives no retry-after (see
        retry.py); a fast local server (or a test) can use shorter waits.

        `base_url`: one server, or several serving the same models (e.g. one vLLM per GPU):
        agent n's calls then go to server n mod count, so agents spread evenly."""
        self.base_urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not self.base_urls:
            raise ValueError("base_url: at least one server URL")
        self.base_url = self.base_urls[0]
        self.api_key = api_key  # also for the server's own routes (vLLM adapters); never written anywhere
        self.endpoint = endpoint
        self.sampling = sampling
        self.budget_usd = budget_usd
        self.prices = dict(prices or {})
        self.seed = seed
        self._backoff = {"base_s": backoff_base_s, "cap_s": backoff_cap_s}
        check_overrides(self.prices)  # a bad price entry fails now, not mid-run
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._cache = ResponseCache(run_dir / CACHE_NAME)
        self._ledger = Ledger(run_dir, self._cache, budget_usd)  # usage, the journal, the budget; crash recovery
        self.notes = self._ledger.notes  # what the run should report once (calls lost in a crash)
        # One pacer per server, shared by every caller: rate limits are per server (and key).
        self._pacers = {url: Pacer(url, max_in_flight=endpoint.concurrency, rpm_limit=endpoint.rpm_limit,
                                   tpm_limit=endpoint.tpm_limit) for url in self.base_urls}
        # The total cap over all servers; each pacer adapts its own share below it.
        self._sem = asyncio.Semaphore(endpoint.concurrency)
        # The SDK's aiohttp transport (the `openai[aiohttp]` extra): at 64 calls in flight its
        # connection pool costs far less CPU per request than httpx2's, whose pool scans every
        # connection on each request (measured: ~1.2x vs ~1.5-2x the ideal wall time).
        # `traced`: it signals when each request's body goes out (transport.py).
        self._http, self._traced = http_client(concurrency=endpoint.concurrency, timeout_s=endpoint.timeout_s)
        # max_retries=0: the SDK would otherwise retry underneath our retry layer.
        self._clients = [openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0,
                                            timeout=endpoint.timeout_s, http_client=self._http)
                         for url in self.base_urls]
        self._client = self._clients[0]
        self._routes: dict[str, int] = {}  # model -> its server, for models with a server of their own
        self._inflight: dict[str, asyncio.Future] = {}
        self._callers: set[asyncio.Task] = set()  # tasks inside a network call (see aclose)
        self._completed: set[int] = set()  # servers that gave a usable answer in this session
        self._reasoning: dict[str, bool] = {}
        if sampling.extra_body and endpoint.kind != "vllm":
            log.warning("sampling.extra_body %s is sent to vLLM endpoints only; endpoint.kind is %s, so it is ignored",
                        sorted(sampling.extra_body), endpoint.kind)

    # ------------------------------------------------------------------ public API

    def route(self, model: str, base_url: str) -> None:
        """Send every call for `model` to the server at `base_url` (a server that serves that
        model alone, e.g. a fully finetuned agent's; harness.serve_pool). A server not yet known
        (a Ray job's node) gets its own pacer and connection. Models without a route keep the
        agent-spread rule."""
        if base_url not in self.base_urls:
            e = self.endpoint
            self._pacers[base_url] = Pacer(base_url, max_in_flight=e.concurrency, rpm_limit=e.rpm_limit,
                                           tpm_limit=e.tpm_limit)
            self._clients.append(openai.AsyncOpenAI(base_url=base_url, api_key=self.api_key, max_retries=0,
                                                    timeout=e.timeout_s, http_client=self._http))
            self.base_urls.append(base_url)
        self._routes[model] = self.base_urls.index(base_url)

    def request_params(self, sample: SampleId) -> dict[str, Any]:
        """The logical sampling parameters of this sample's call: its cache key is built from
        these (names as they were when the first runs were cached, whatever the wire names);
        `wire_body` turns them into the request."""
        s = self.sampling
        params: dict[str, Any] = {"temperature": s.temperature, "max_tokens": s.max_tokens}
        if s.top_p is not None:
            params["top_p"] = s.top_p
        if s.seeded:
            params["seed"] = sample_seed(self.seed, sample)
        if self.endpoint.kind == "vllm" and s.extra_body:
            params["extra_body"] = dict(s.extra_body)
        return params

    def chat_request(self, model: str, messages: list[Message], sample: SampleId) -> tuple[str, dict[str, Any], int]:
        """(cache key, request body, prompt characters) of one chat call. The key is the same
        whether the call is sent directly or in a batch (harness.llm.batch)."""
        msgs = dump_messages(messages)
        params = self.request_params(sample)
        key = cache_key({"op": "chat", "model": model, "messages": msgs, "params": params,
                         "sample": sample.model_dump(mode="json")})
        return key, self.wire_body(model, msgs, params), sum(len(m["content"]) for m in msgs)

    async def chat(self, model: str, messages: list[Message], sample: SampleId, *,
                   purpose: str = "debate") -> ChatResult:
        key, body, prompt_chars = self.chat_request(model, messages, sample)
        server = self._routes.get(model, sample.agent % len(self.base_urls))

        async def call() -> tuple[dict, int, float, str]:
            return await self._network(key, model, purpose, server, prompt_chars, len(messages),
                                       self.sampling.max_tokens,
                                       lambda client: responses.chat_once(client, model, body, self.prices))

        value, rec = await self._cached(key, "chat", model, sample, purpose, call)
        return ChatResult(text=value["text"], cached=rec.cached, usage=rec,
                          finish_reason=value.get("finish_reason"), served_model=value.get("served_model"))

    def embed_request(self, model: str, chunk: list[str]) -> tuple[str, dict[str, Any], int]:
        """(cache key, request body, input characters) of one /embeddings call of at most
        EMBED_CHUNK inputs. The key is the same whether the call is sent directly or in a batch;
        the body is what the SDK sends for `embeddings.create` (it asks for base64, float32)."""
        key = cache_key({"op": "embed", "model": model, "input": chunk})
        return key, {"model": model, "input": chunk, "encoding_format": "base64"}, sum(len(t) for t in chunk)

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Embeddings via the OpenAI-compatible /embeddings route, cached per chunk of inputs."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), EMBED_CHUNK):
            chunk = list(texts[start:start + EMBED_CHUNK])
            key, _, _ = self.embed_request(model, chunk)

            async def call(chunk: list[str] = chunk, key: str = key) -> tuple[dict, int, float, str]:
                return await self._network(key, model, "embed", 0, sum(len(t) for t in chunk), len(chunk), 0,
                                           lambda client: responses.embed_once(client, model, chunk, self.prices))

            value, _ = await self._cached(key, "embed", model, None, "embed", call)
            vectors.extend(value["vectors"])
        return vectors

    def wire_body(self, model: str, msgs: list[dict], params: dict[str, Any]) -> dict[str, Any]:
        """The chat request as sent: OpenAI's current parameter names, and only the sampling
        parameters the model accepts."""
        body: dict[str, Any] = {"model": model, "messages": msgs}
        reasoning = self.is_reasoning_model(model)
        for name, value in params.items():
            if name == "extra_body":
                continue
            if name == "max_tokens":
                body[self.endpoint.max_tokens_param] = value
            elif not (reasoning and name in ("temperature", "top_p")):
                body[name] = value
        body.update(params.get("extra_body", {}))
        return body

    def is_reasoning_model(self, model: str) -> bool:
        """An OpenAI reasoning model (endpoint.reasoning_models), which refuses a temperature or
        top_p other than its default: they are left out of its requests (said once per model)."""
        known = self._reasoning.get(model)
        if known is not None:
            return known
        base = model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 2 else model
        known = self.endpoint.kind == "openai" and any(fnmatch.fnmatchcase(base, p) for p in self.endpoint.reasoning_models)
        self._reasoning[model] = known
        s = self.sampling
        if known and (s.temperature != 1.0 or s.top_p is not None):
            dropped = [f"sampling.temperature={s.temperature:g}"] if s.temperature != 1.0 else []
            dropped += [f"sampling.top_p={s.top_p:g}"] if s.top_p is not None else []
            log.warning("model '%s' is a reasoning model (endpoint.reasoning_models): OpenAI accepts only its default "
                        "sampling there, so %s is not sent and it samples at its default", model, " and ".join(dropped))
        return known

    async def prompt_logprobs(self, model: str, messages: list[Message] | list[dict], *, add_generation_prompt: bool,
                              sample: SampleId | None = None, purpose: str = "score") -> PromptLogprobs:
        """vLLM only: the tokens of `messages` as `model`'s chat template renders them (with the
        assistant header appended when `add_generation_prompt`) and the log-probability `model`
        gives each one. One /chat/completions call with vLLM's `prompt_logprobs` extension; the
        single generated token is thrown away. Cached, retried, budgeted and written to
        usage.jsonl like every call (`sample` only attributes that line to an iteration).
        Raises LogprobsUnavailable when the server sends no prompt log-probabilities."""
        msgs = dump_messages(messages)
        key = cache_key({"op": "prompt_logprobs", "model": model, "messages": msgs,
                         "add_generation_prompt": add_generation_prompt})
        prompt_chars = sum(len(m["content"]) for m in msgs)

        async def call() -> tuple[dict, int, float, str]:
            return await self._network(key, model, purpose, self._routes.get(model, 0), prompt_chars, len(msgs), 1,
                                       lambda client: responses.prompt_logprobs_once(client, model, msgs,
                                                                                     add_generation_prompt, self.prices))

        value, _ = await self._cached(key, "prompt_logprobs", model, sample, purpose, call)
        return PromptLogprobs(token_ids=value["token_ids"], logprobs=value["logprobs"])

    async def score_text(self, model: str, text: str, *, server: int = 0, purpose: str = "probe") -> PromptLogprobs:
        """vLLM only: each token of the plain text `text` (no chat template) and its
        log-probability under `model`, on server number `server` (one /completions call with
        `prompt_logprobs`). Never answered from the cache: it checks what that server computes now
        (e.g. after an adapter was loaded again under the same name). Retried, budgeted and
        written to usage.jsonl like every call. LogprobsUnavailable when the server sends none."""
        key = cache_key({"op": "score_text", "model": model, "text": text, "server": self.base_urls[server]})

        async def call() -> tuple[dict, int, float, str]:
            return await self._network(key, model, purpose, server, len(text), 1, 1,
                                       lambda client: responses.completion_logprobs_once(client, model, text,
                                                                                         self.prices))

        value, _ = await self._cached(key, "score_text", model, None, purpose, call, use_cache=False)
        return PromptLogprobs(token_ids=value["token_ids"], logprobs=value["logprobs"],
                              served_model=value.get("served_model"))

    def totals(self) -> UsageTotals:
        """This run so far, earlier sessions included (read from usage.jsonl and the journal of
        requests in flight at start)."""
        return self._ledger.totals()

    # The Batch API path (harness.llm.batch) answers chat calls itself, into the same cache and
    # usage log and under the same budget cap.
    @property
    def cache(self) -> ResponseCache:
        return self._cache

    @property
    def usage_log(self) -> UsageLog:
        return self._ledger.usage

    def reserve_budget(self, model: str, est: float | None) -> float:
        """Reserve `est` USD of the budget cap for a call about to be sent (BudgetExceeded if it
        would pass the cap); give it back with `release_budget` once the call is recorded."""
        return self._ledger.reserve(model, est)

    def release_budget(self, amount: float) -> None:
        self._ledger.release(amount)

    def pacing(self) -> dict[str, dict[str, float]]:
        """Per server: 429s met, seconds callers waited for the rate limit, the current window."""
        return {url: {"rate_limited": p.rate_limited, "waited_s": round(p.waited_s, 3), "window": p.window}
                for url, p in self._pacers.items()}

    async def aclose(self) -> None:
        await self._drain()
        for client in self._clients:
            await client.close()  # the first also closes the shared http client
        self._cache.close()
        self._ledger.close()

    async def _drain(self) -> None:
        """Let calls still in flight end and be recorded before the files close. A caller that
        stopped waiting (e.g. asyncio.gather raising on a sibling's error) leaves its call running;
        closing the journal under it lost the call's outcome (reported as possibly billed at the
        next start) and printed a traceback per call."""
        me = asyncio.current_task()
        tasks = {t for t in self._callers if t is not me and not t.done()}
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in tasks:  # their errors repeat the one the run stops with: not "never retrieved"
            if not task.cancelled() and task.exception() is not None:
                log.debug("a call still in flight at close ended with: %s", task.exception())

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    async def _cached(self, key: str, kind: str, model: str, sample: SampleId | None, purpose: str,
                      call: Callable[[], Awaitable[tuple[dict, int, float]]], *,
                      use_cache: bool = True) -> tuple[dict, UsageRecord]:
        """The cached value or a fresh one from `call()`, with the usage line written for it.
        Identical requests in flight at the same time share one call (a caller bug or a
        re-entered stage must not pay twice); the followers are logged as cache hits.
        `use_cache` False: always a fresh call, and its answer is not stored."""
        hit = self._cache.get(key) if use_cache else None
        if hit is None and key in self._inflight:
            try:
                hit = await asyncio.shield(self._inflight[key])
            except _OwnerCancelled:
                # The caller that owned the shared call was cancelled, not this one: start over
                # (the first follower back becomes the new owner, the others wait for it).
                return await self._cached(key, kind, model, sample, purpose, call)
        if hit is not None:
            rec = UsageRecord(ts=time.time(), model=model, sample=sample, purpose=purpose, prompt_tokens=0,
                              completion_tokens=0, cached_prompt_tokens=0, latency_s=0.0, cost_usd=0.0,
                              cached=True, attempts=0)
            self._ledger.record(rec)
            return hit, rec
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        task = asyncio.current_task()
        if task is not None:
            self._callers.add(task)
        try:
            value, attempts, latency, call_id = await call()
            rec = UsageRecord(ts=time.time(), model=model, sample=sample, purpose=purpose,
                              prompt_tokens=value.get("prompt_tokens"),
                              completion_tokens=value.get("completion_tokens"),
                              cached_prompt_tokens=value.get("cached_prompt_tokens"), latency_s=round(latency, 6),
                              cost_usd=value.get("cost_usd"), cached=False, attempts=attempts, call_id=call_id)
            # The cache row carries its usage record, and is written first: a crash before the
            # usage line is repaired from the row at the next start (`_settle`), so the answer is
            # neither paid twice nor left unrecorded; a crash before the row leaves the request
            # open in the journal, counted as possibly billed.
            if use_cache:
                self._cache.put(key, kind, model, value, usage=rec.model_dump(mode="json"))
            self._ledger.record(rec)
            self._ledger.ended(call_id, "answered")
        except BaseException as exc:
            # Followers must not inherit the owner's cancellation: they get a marker and retry.
            fut.set_exception(_OwnerCancelled() if isinstance(exc, asyncio.CancelledError) else exc)
            fut.exception()  # mark retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            del self._inflight[key]
            self._callers.discard(task)
        fut.set_result(value)
        return value, rec

    async def _network(self, key: str, model: str, purpose: str, server: int, prompt_chars: int, messages: int,
                       max_output_tokens: int, once: Callable[[openai.AsyncOpenAI], Awaitable[tuple[dict, Any]]]
                       ) -> tuple[dict, int, float, str]:
        """One logical call: attempts paced by the server's pacer, each journaled as its body goes
        out (transport.py), under our retry layer (429s are waited out, not counted), with the
        budget reserved once. Returns (value, attempts, latency of the successful attempt, its
        journal id)."""
        url = self.base_urls[server]
        pacer, client = self._pacers[url], self._clients[server]
        est = estimate_cost(model, prompt_chars, max_output_tokens, self.prices)
        reserved: float | None = None
        attempts = 0

        def give_up(exc: BaseException) -> bool:
            # Nothing listening, or a page that is no completion, at a server that never answered
            # in this session: a wrong URL, which more attempts would only make slower to report.
            return ((cannot_connect(exc) and not pacer.answered)
                    or (isinstance(exc, MalformedResponse) and exc.kind != "malformed" and server not in self._completed))

        try:
            async for attempt in retrying(self.endpoint.max_retries, **self._backoff,
                                          rate_limit_wait_s=self.endpoint.rate_limit_wait_s, stalled_s=pacer.stalled_s,
                                          give_up=give_up):
                with attempt:
                    async with pacer.slot(prompt_chars, messages, max_output_tokens) as ticket, self._sem:
                        if reserved is None:  # checked once a slot is ours, so queued calls do not count
                            reserved = self._ledger.reserve(model, est)
                        attempts = attempt.retry_state.attempt_number
                        ids: list[str] = []
                        with sending(lambda: ids.append(self._ledger.sent(key, model, purpose, est))) as tx:
                            if not self._traced:
                                tx.transmit()
                            t0 = time.monotonic()
                            value, headers = await self._attempt(once, client, tx, ids)
                        latency = time.monotonic() - t0
                        call_id = ids[0]
                        pacer.succeeded(ticket, headers, value.get("prompt_tokens"))
                        self._completed.add(server)
            if value.get("prompt_tokens") is None and "cost_usd" not in value:
                # The server sent no usage: charge the estimate so the budget stays conservative.
                value["cost_usd"] = est
                log.warning("no usage in the response of %s at %s: cost estimated", model, url)
            return value, attempts, latency, call_id
        except (HarnessError, OSError, sqlite3.Error):
            raise  # our own decisions, and the run directory failing (harness.ioerrors explains it)
        except Exception as exc:
            raise final_error(exc, attempts=attempts, base_url=url, model=model,
                              api_key_env=self.endpoint.api_key_env, rate_limit_wait_s=self.endpoint.rate_limit_wait_s,
                              answered_before=pacer.answered) from exc
        finally:
            if reserved:
                self._ledger.release(reserved)

    async def _attempt(self, once: Callable[[openai.AsyncOpenAI], Awaitable[tuple[dict, Any]]],
                       client: openai.AsyncOpenAI, tx: Sending, ids: list[str]) -> tuple[dict, Any]:
        """One HTTP request; its journal line is closed with its outcome if it went out."""
        try:
            value, headers = await once(client)
        except BaseException as exc:
            if tx.error is not None:  # the journal line could not be written, so nothing was sent
                raise tx.error from None
            if tx.sent:
                self._ledger.ended(ids[0], outcome(exc))
            raise
        tx.transmit()  # answered without the send signal (not expected): journaled all the same
        return value, headers


__all__ = ["ChatResult", "LLMClient", "PromptLogprobs", "sample_seed"]
