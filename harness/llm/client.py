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
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import httpx2
import openai
from pydantic import BaseModel

from harness.config import EndpointConfig, SamplingConfig
from harness.errors import BudgetExceeded, ConfigError, HarnessError, LogprobsUnavailable
from harness.llm.cache import CACHE_NAME, ResponseCache, cache_key
from harness.llm.journal import JOURNAL_NAME, CallJournal, JournalEntry
from harness.llm.pacing import Pacer
from harness.llm.pricing import check_overrides, cost_usd, estimate_cost
from harness.llm.retry import (BACKOFF_BASE_S, BACKOFF_CAP_S, MalformedResponse, cannot_connect, final_error,
                               retrying)
from harness.llm.usage import UsageLog, UsageTotals
from harness.records import Message, SampleId, UsageRecord

log = logging.getLogger(__name__)

# Inputs per /embeddings request: well under OpenAI's 2048 and small enough that one
# request body stays modest; each chunk is cached on its own.
EMBED_CHUNK = 256


class ChatResult(BaseModel):
    text: str
    cached: bool  # answered from the run's cache: no call was made, nothing was paid
    usage: UsageRecord  # the line written to usage.jsonl for this call
    finish_reason: str | None = None  # "length" means max_tokens cut the answer


class PromptLogprobs(BaseModel):
    """Each token of a chat-rendered prompt and its log-probability under a model (None for the
    first token, which nothing precedes)."""

    token_ids: list[int]
    logprobs: list[float | None]


def sample_seed(client_seed: int, sample: SampleId) -> int:
    """A stable 31-bit seed per (run seed, sample identity): each agent's sample is reproducible
    and differs from the other agents'. sha256 rather than hash(): hash() of str is salted per
    process, so it would change on every resume."""
    digest = hashlib.sha256(f"{client_seed}|{sample.key()}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _usd(x: float) -> str:
    return f"${x:.4f}" if abs(x) >= 0.01 else f"${x:.6f}"


def _dump_messages(messages: list[Message] | list[dict]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        d = m.model_dump() if isinstance(m, BaseModel) else dict(m)
        out.append({"role": d["role"], "content": d["content"]})
    return out


class _OwnerCancelled(Exception):
    """The call that identical in-flight requests were sharing was cancelled by its own caller."""


def _journal_state(exc: BaseException) -> str:
    """How a failed request ends in the journal: refused (the server answered with an error, or
    no connection was made: not billed) or unanswered (it may have been billed)."""
    if isinstance(exc, openai.APIStatusError) or cannot_connect(exc):
        return "refused"
    return "unanswered"


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
        self._usage = UsageLog(run_dir / "usage.jsonl")
        self._cache = ResponseCache(run_dir / CACHE_NAME)
        self._restored = 0
        self._journal = CallJournal(run_dir / JOURNAL_NAME, settle=self._settle)
        self.notes: list[str] = []  # what the run should report once (calls lost in a crash)
        self._report_recovery()
        # One pacer per server, shared by every caller: rate limits are per server (and key).
        self._pacers = {url: Pacer(url, max_in_flight=endpoint.concurrency, rpm_limit=endpoint.rpm_limit,
                                   tpm_limit=endpoint.tpm_limit) for url in self.base_urls}
        # The total cap over all servers; each pacer adapts its own share below it.
        self._sem = asyncio.Semaphore(endpoint.concurrency)
        # The pool must hold at least `concurrency` connections, or it, not the semaphore, becomes
        # the limit; keep-alive for all of them so bursts reuse connections instead of reopening.
        # The SDK's aiohttp transport (the `openai[aiohttp]` extra): at 64 calls in flight its
        # connection pool costs far less CPU per request than httpx2's, whose pool scans every
        # connection on each request (measured: ~1.2x vs ~1.5-2x the ideal wall time).
        # keepalive_expiry 3 s: below the 5 s idle timeout of uvicorn (vLLM, the simulator). At the
        # same 5 s, a connection reused just as the server closes it fails ("server disconnected",
        # reported as a timeout) and the request would count as possibly billed.
        self._http = openai.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=endpoint.concurrency + 16,
                                 max_keepalive_connections=endpoint.concurrency, keepalive_expiry=3.0),
            timeout=endpoint.timeout_s,
        )
        # max_retries=0: the SDK would otherwise retry underneath our retry layer.
        self._clients = [openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0,
                                            timeout=endpoint.timeout_s, http_client=self._http)
                         for url in self.base_urls]
        self._client = self._clients[0]
        self._reserved_usd = 0.0  # budget estimates of calls in flight
        self._inflight: dict[str, asyncio.Future] = {}
        self._reasoning: dict[str, bool] = {}
        if sampling.extra_body and endpoint.kind != "vllm":
            log.warning("sampling.extra_body %s is sent to vLLM endpoints only; endpoint.kind is %s, so it is ignored",
                        sorted(sampling.extra_body), endpoint.kind)

    # ------------------------------------------------------------------ public API

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

    async def chat(self, model: str, messages: list[Message], sample: SampleId, *,
                   purpose: str = "debate") -> ChatResult:
        msgs = _dump_messages(messages)
        params = self.request_params(sample)
        key = cache_key({"op": "chat", "model": model, "messages": msgs, "params": params,
                         "sample": sample.model_dump(mode="json")})
        prompt_chars = sum(len(m["content"]) for m in msgs)

        body = self.wire_body(model, msgs, params)
        server = sample.agent % len(self.base_urls)

        async def call() -> tuple[dict, int, float, str]:
            return await self._network(key, model, purpose, server, prompt_chars, len(msgs), params["max_tokens"],
                                       lambda client: self._chat_once(client, model, body))

        value, rec = await self._cached(key, "chat", model, sample, purpose, call)
        return ChatResult(text=value["text"], cached=rec.cached, usage=rec,
                          finish_reason=value.get("finish_reason"))

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Embeddings via the OpenAI-compatible /embeddings route, cached per chunk of inputs."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), EMBED_CHUNK):
            chunk = list(texts[start:start + EMBED_CHUNK])
            key = cache_key({"op": "embed", "model": model, "input": chunk})

            async def call(chunk: list[str] = chunk, key: str = key) -> tuple[dict, int, float, str]:
                return await self._network(key, model, "embed", 0, sum(len(t) for t in chunk), len(chunk), 0,
                                           lambda client: self._embed_once(client, model, chunk))

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
        msgs = _dump_messages(messages)
        key = cache_key({"op": "prompt_logprobs", "model": model, "messages": msgs,
                         "add_generation_prompt": add_generation_prompt})
        prompt_chars = sum(len(m["content"]) for m in msgs)

        async def call() -> tuple[dict, int, float, str]:
            return await self._network(key, model, purpose, 0, prompt_chars, len(msgs), 1,
                                       lambda client: self._prompt_logprobs_once(client, model, msgs,
                                                                                add_generation_prompt))

        value, _ = await self._cached(key, "prompt_logprobs", model, sample, purpose, call)
        return PromptLogprobs(token_ids=value["token_ids"], logprobs=value["logprobs"])

    def totals(self) -> UsageTotals:
        """This run so far, earlier sessions included (read from usage.jsonl and the journal of
        requests in flight at start)."""
        totals = self._usage.totals()
        n, cost, unknown = self._journal.possibly_billed()
        totals.unanswered_calls, totals.unanswered_cost_usd, totals.unanswered_unknown_cost_calls = n, cost, unknown
        return totals

    def pacing(self) -> dict[str, dict[str, float]]:
        """Per server: 429s met, seconds callers waited for the rate limit, the current window."""
        return {url: {"rate_limited": p.rate_limited, "waited_s": round(p.waited_s, 3), "window": p.window}
                for url, p in self._pacers.items()}

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()  # the first also closes the shared http client
        self._cache.close()
        self._usage.close()
        self._journal.close_file()

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    async def _cached(self, key: str, kind: str, model: str, sample: SampleId | None, purpose: str,
                      call: Callable[[], Awaitable[tuple[dict, int, float]]]) -> tuple[dict, UsageRecord]:
        """The cached value or a fresh one from `call()`, with the usage line written for it.
        Identical requests in flight at the same time share one call (a caller bug or a
        re-entered stage must not pay twice); the followers are logged as cache hits."""
        hit = self._cache.get(key)
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
            self._usage.append(rec)
            return hit, rec
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
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
            self._cache.put(key, kind, model, value, usage=rec.model_dump(mode="json"))
            self._usage.append(rec)
            self._journal.close(call_id, "answered")
        except BaseException as exc:
            # Followers must not inherit the owner's cancellation: they get a marker and retry.
            fut.set_exception(_OwnerCancelled() if isinstance(exc, asyncio.CancelledError) else exc)
            fut.exception()  # mark retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            del self._inflight[key]
        fut.set_result(value)
        return value, rec

    async def _network(self, key: str, model: str, purpose: str, server: int, prompt_chars: int, messages: int,
                       max_output_tokens: int, once: Callable[[openai.AsyncOpenAI], Awaitable[tuple[dict, Any]]]
                       ) -> tuple[dict, int, float, str]:
        """One logical call: attempts paced by the server's pacer, each journaled before it is sent,
        under our retry layer (429s are waited out, not counted), with the budget reserved once.
        Returns (value, attempts, latency of the successful attempt, its journal id)."""
        url = self.base_urls[server]
        pacer, client = self._pacers[url], self._clients[server]
        est = estimate_cost(model, prompt_chars, max_output_tokens, self.prices)
        reserved: float | None = None
        attempts = 0
        try:
            async for attempt in retrying(self.endpoint.max_retries, **self._backoff,
                                          rate_limit_wait_s=self.endpoint.rate_limit_wait_s, stalled_s=pacer.stalled_s,
                                          give_up=lambda exc: cannot_connect(exc) and not pacer.answered):
                with attempt:
                    async with pacer.slot(prompt_chars, messages, max_output_tokens) as ticket, self._sem:
                        if reserved is None:  # checked once a slot is ours, so queued calls do not count
                            reserved = self._reserve(model, est)
                        attempts = attempt.retry_state.attempt_number
                        call_id = self._journal.sent(key, model, purpose, est)
                        t0 = time.monotonic()
                        try:
                            value, headers = await once(client)
                        except BaseException as exc:
                            self._journal.close(call_id, _journal_state(exc))
                            raise
                        latency = time.monotonic() - t0
                        pacer.succeeded(ticket, headers, value.get("prompt_tokens"))
            if value.get("prompt_tokens") is None and "cost_usd" not in value:
                # The server sent no usage: charge the estimate so the budget stays conservative.
                value["cost_usd"] = est
                log.warning("no usage in the response of %s at %s: cost estimated", model, url)
            return value, attempts, latency, call_id
        except HarnessError:
            raise
        except Exception as exc:
            raise final_error(exc, attempts=attempts, base_url=url, model=model,
                              api_key_env=self.endpoint.api_key_env, rate_limit_wait_s=self.endpoint.rate_limit_wait_s,
                              answered_before=pacer.answered) from exc
        finally:
            if reserved:
                self._reserved_usd -= reserved

    def _reserve(self, model: str, est: float | None) -> float:
        if self.budget_usd is None:
            return 0.0
        if est is None:
            # Decision: refuse rather than run uncapped. A cap that silently ignores a model
            # is no cap; the user can price it (even at 0 for a local server) in one line.
            raise ConfigError(
                f"budget.max_cost_usd is set but the price of model '{model}' is unknown, so the cap cannot be "
                f"enforced: add it to the config, e.g. --set 'prices.{model}={{input: 0.15, output: 0.6}}' "
                f"(USD per 1M tokens; 0 for a local server), or remove budget.max_cost_usd"
            )
        _, unanswered, _ = self._journal.possibly_billed()
        spent = self._usage.spent_usd + unanswered
        if spent + self._reserved_usd + est > self.budget_usd:
            lost = f" (of which {_usd(unanswered)} worst case for calls that may have been billed without an answer)"
            raise BudgetExceeded(
                f"budget cap reached: {_usd(spent)} spent so far in this run (earlier sessions included"
                f"{lost if unanswered else ''}) plus "
                f"{_usd(self._reserved_usd)} for calls in flight, and the next call to '{model}' may cost up to "
                f"{_usd(est)}, which would pass budget.max_cost_usd=${self.budget_usd:g}. Raise the cap with "
                f"--set budget.max_cost_usd=<more> and start the run again: it resumes from where it stopped "
                f"and finished calls come from the cache at no cost."
            )
        self._reserved_usd += est
        return est

    async def _chat_once(self, client: openai.AsyncOpenAI, model: str, body: dict) -> tuple[dict, Any]:
        # The SDK's raw `post` rather than `chat.completions.create`: same auth, headers, timeouts
        # and exception types, but it skips the recursive TypedDict transform of the parameters
        # and the typed response model, which cost ~3 ms of CPU per call (profiled) and were the
        # bottleneck at 64 calls in flight. Our messages are plain JSON and need no transform.
        # cast_to=httpx2.Response: the raw response, whose rate-limit headers the pacer reads.
        raw = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        try:
            resp = raw.json()
        except ValueError:
            raise MalformedResponse(f"the answer of {model} is not JSON") from None
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise MalformedResponse(f"no choices in the answer of {model}")
        choice = choices[0]
        text = (choice.get("message") or {}).get("content")
        value: dict[str, Any] = {"text": text or "", "finish_reason": choice.get("finish_reason")}
        self._add_usage(value, model, resp.get("usage"))
        return value, raw.headers

    async def _prompt_logprobs_once(self, client: openai.AsyncOpenAI, model: str, msgs: list[dict],
                                    add_generation_prompt: bool) -> tuple[dict, Any]:
        body = {"model": model, "messages": msgs, "max_completion_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
                "add_generation_prompt": add_generation_prompt}
        raw = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        try:
            resp = raw.json()
        except ValueError:
            raise MalformedResponse(f"the answer of {model} is not JSON") from None
        entries = resp.get("prompt_logprobs") if isinstance(resp, dict) else None
        if not isinstance(entries, list) or not entries:
            raise LogprobsUnavailable(f"{self.base_url} sent no prompt_logprobs for {model}: only vLLM servers "
                                      f"score a given text (OpenAI and the simulator do not)")
        ids: list[int] = []
        logprobs: list[float | None] = []
        for i, entry in enumerate(entries):
            if entry is None and i == 0:  # nothing precedes the first token
                continue
            # prompt_logprobs=0: exactly the prompt's own token, keyed by its id
            if not isinstance(entry, dict) or len(entry) != 1:
                raise LogprobsUnavailable(f"prompt_logprobs entry {i} from {model} is not one token: {entry!r:.200}")
            (tok, info), = entry.items()
            ids.append(int(tok))
            logprobs.append(float(info["logprob"]))
        if entries[0] is None:  # the first token's id is not sent: mark it so positions line up
            ids.insert(0, -1)
            logprobs.insert(0, None)
        value: dict[str, Any] = {"token_ids": ids, "logprobs": logprobs}
        self._add_usage(value, model, resp.get("usage"))
        return value, raw.headers

    async def _embed_once(self, client: openai.AsyncOpenAI, model: str, chunk: list[str]) -> tuple[dict, Any]:
        raw = await client.embeddings.with_raw_response.create(model=model, input=chunk)
        resp = raw.parse()
        data = sorted(getattr(resp, "data", None) or [], key=lambda d: d.index)
        if len(data) != len(chunk):
            raise MalformedResponse(f"{len(data)} embeddings for {len(chunk)} inputs from {model}")
        value: dict[str, Any] = {"vectors": [list(d.embedding) for d in data]}
        usage = getattr(resp, "usage", None)
        self._add_usage(value, model, usage.model_dump() if usage is not None else None)
        value.setdefault("completion_tokens", 0)
        return value, raw.headers

    # ------------------------------------------------------------------ crash recovery

    def _settle(self, entry: JournalEntry) -> bool:
        """An request an earlier session left open in the journal: True if its answer made it into
        the cache (its usage line is appended if the crash came before it), False if it is lost."""
        stored = self._cache.usage(entry.key) if entry.key else None
        if stored is None or stored.get("call_id") != entry.id:
            return False
        if not self._usage.has_call(entry.id):
            self._usage.append(UsageRecord.model_validate(stored))
            self._restored += 1
        return True

    def _report_recovery(self) -> None:
        if self._restored:
            log.info("%d usage lines restored from the cache (a crash came between an answer and its line)",
                     self._restored)
        lost = self._journal.lost_now
        if not lost:
            return
        known = [e.est_cost_usd for e in lost if e.est_cost_usd is not None]
        worst = _usd(sum(known)) + (f" plus {len(lost) - len(known)} of unknown price" if len(known) < len(lost) else "")
        note = (f"{len(lost)} model call(s) were in flight when an earlier session of this run stopped: the provider "
                f"may have billed them although no answer was saved (worst case {worst}). They count against "
                f"budget.max_cost_usd at that estimate and are listed in {JOURNAL_NAME}; their work is asked again.")
        log.warning(note)
        self.notes.append(note)

    def _add_usage(self, value: dict, model: str, usage: Any) -> None:
        """Token counts from an OpenAI-shaped `usage` dict (None or incomplete: left out)."""
        if not isinstance(usage, dict) or usage.get("prompt_tokens") is None:
            return
        prompt = usage["prompt_tokens"]
        completion = usage.get("completion_tokens") or 0
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        value.update(prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached,
                     cost_usd=cost_usd(model, prompt, cached, completion, self.prices))


__all__ = ["ChatResult", "LLMClient", "PromptLogprobs", "sample_seed"]
