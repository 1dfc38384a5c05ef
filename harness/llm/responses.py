"""What LLMClient's calls return, and one request each: a chat completion, vLLM's prompt
log-probabilities, a chunk of embeddings, with the checks that turn a server's answer into the
value cached for it.

An answer that is not the expected JSON raises MalformedResponse with the content type and the
first characters of the body: an HTML page or a `{}` with status 200 is almost always a wrong
`endpoint.base_url` or a proxy / login page answering in the server's place, and the user needs
to see what came back to tell which.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx2
import openai
from pydantic import BaseModel

from harness.errors import LogprobsUnavailable
from harness.llm.pricing import cost_usd
from harness.llm.retry import MalformedResponse
from harness.records import Message, SampleId, UsageRecord

BODY_START = 80  # characters of an unexpected body shown in the error


class ChatResult(BaseModel):
    text: str
    cached: bool  # answered from the run's cache: no call was made, nothing was paid
    usage: UsageRecord  # the line written to usage.jsonl for this call
    finish_reason: str | None = None  # "length" means max_tokens cut the answer
    # The `model` field of the server's answer: the model (vLLM: base or adapter name) that says it
    # produced the reply. None when the server named none, or for an answer cached by an older run.
    served_model: str | None = None


class PromptLogprobs(BaseModel):
    """Each token of a chat-rendered prompt and its log-probability under a model (None for the
    first token, which nothing precedes)."""

    token_ids: list[int]
    logprobs: list[float | None]
    served_model: str | None = None  # the `model` the server's answer named, when it said


def sample_seed(client_seed: int, sample: SampleId) -> int:
    """A stable 31-bit seed per (run seed, sample identity): each agent's sample is reproducible
    and differs from the other agents'. sha256 rather than hash(): hash() of str is salted per
    process, so it would change on every resume."""
    digest = hashlib.sha256(f"{client_seed}|{sample.key()}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def dump_messages(messages: list[Message] | list[dict]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        d = m.model_dump() if isinstance(m, BaseModel) else dict(m)
        out.append({"role": d["role"], "content": d["content"]})
    return out


def _unexpected(raw: httpx2.Response, model: str, what: str, kind: str) -> MalformedResponse:
    try:
        text = raw.text
    except Exception:  # undecodable bytes: show them as they are
        text = raw.content.decode("latin-1")
    start = " ".join(text[:BODY_START].split())
    return MalformedResponse(f"the answer of {model} is {what}", kind=kind,
                             content_type=raw.headers.get("content-type"), body_start=start)


def _json(raw: httpx2.Response, model: str) -> Any:
    try:
        return raw.json()
    except ValueError:
        raise _unexpected(raw, model, "not JSON", "not_json") from None


def add_usage(value: dict, model: str, usage: Any, prices: dict[str, dict[str, float]]) -> None:
    """Token counts and cost from an OpenAI-shaped `usage` dict (None or incomplete: left out)."""
    if not isinstance(usage, dict) or usage.get("prompt_tokens") is None:
        return
    prompt = usage["prompt_tokens"]
    completion = usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    value.update(prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached,
                 cost_usd=cost_usd(model, prompt, cached, completion, prices))


async def chat_once(client: openai.AsyncOpenAI, model: str, body: dict,
                    prices: dict[str, dict[str, float]]) -> tuple[dict, Any]:
    # The SDK's raw `post` rather than `chat.completions.create`: same auth, headers, timeouts
    # and exception types, but it skips the recursive TypedDict transform of the parameters
    # and the typed response model, which cost ~3 ms of CPU per call (profiled) and were the
    # bottleneck at 64 calls in flight. Our messages are plain JSON and need no transform.
    # cast_to=httpx2.Response: the raw response, whose rate-limit headers the pacer reads.
    raw = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
    resp = _json(raw, model)
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise _unexpected(raw, model, "JSON without choices", "not_completion")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content")
    # `model`: the name the server says answered (vLLM: the adapter or base the request named).
    value: dict[str, Any] = {"text": text or "", "finish_reason": choice.get("finish_reason"),
                             "served_model": resp.get("model")}
    add_usage(value, model, resp.get("usage"), prices)
    return value, raw.headers


async def prompt_logprobs_once(client: openai.AsyncOpenAI, model: str, msgs: list[dict], add_generation_prompt: bool,
                               prices: dict[str, dict[str, float]]) -> tuple[dict, Any]:
    body = {"model": model, "messages": msgs, "max_completion_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
            "add_generation_prompt": add_generation_prompt}
    raw = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
    resp = _json(raw, model)
    entries = resp.get("prompt_logprobs") if isinstance(resp, dict) else None
    value = _prompt_logprobs_value(entries, client, model)
    add_usage(value, model, resp.get("usage"), prices)
    return value, raw.headers


async def completion_logprobs_once(client: openai.AsyncOpenAI, model: str, text: str,
                                   prices: dict[str, dict[str, float]]) -> tuple[dict, Any]:
    """vLLM's /completions with `prompt_logprobs`: the log-probability of each token of a plain
    text (no chat template) under `model`, in one forward pass; the one generated token is thrown
    away. `echo` with `logprobs` would give the same numbers, with the decoded text as well."""
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    raw = await client.post("/completions", body=body, cast_to=httpx2.Response)
    resp = _json(raw, model)
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise _unexpected(raw, model, "JSON without choices", "not_completion")
    value = _prompt_logprobs_value(choices[0].get("prompt_logprobs"), client, model)
    value["served_model"] = resp.get("model")
    add_usage(value, model, resp.get("usage"), prices)
    return value, raw.headers


def _prompt_logprobs_value(entries: Any, client: openai.AsyncOpenAI, model: str) -> dict[str, Any]:
    """{token_ids, logprobs} from vLLM's `prompt_logprobs` list (None first, then one
    {token id: {logprob, ...}} per token when asked for 0 alternatives)."""
    if not isinstance(entries, list) or not entries:
        raise LogprobsUnavailable(f"{client.base_url} sent no prompt_logprobs for {model}: only vLLM servers "
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
    return {"token_ids": ids, "logprobs": logprobs}


async def embed_once(client: openai.AsyncOpenAI, model: str, chunk: list[str],
                     prices: dict[str, dict[str, float]]) -> tuple[dict, Any]:
    raw = await client.embeddings.with_raw_response.create(model=model, input=chunk)
    resp = raw.parse()
    data = sorted(getattr(resp, "data", None) or [], key=lambda d: d.index)
    if len(data) != len(chunk):
        raise MalformedResponse(f"{len(data)} embeddings for {len(chunk)} inputs from {model}")
    value: dict[str, Any] = {"vectors": [list(d.embedding) for d in data]}
    usage = getattr(resp, "usage", None)
    add_usage(value, model, usage.model_dump() if usage is not None else None, prices)
    value.setdefault("completion_tokens", 0)
    return value, raw.headers


__all__ = ["ChatResult", "PromptLogprobs", "add_usage", "chat_once", "dump_messages", "embed_once",
           "prompt_logprobs_once", "completion_logprobs_once", "sample_seed"]
