"""What a batch's output and error files mean (OpenAI's BatchRequestOutput lines), for
harness.llm.batch: each line sorted into an answer or a failure by its custom_id, and an answer
turned into the cache value a direct call of the same endpoint would have stored, costed at
batch price.

Two endpoints are batched: /v1/chat/completions (the debates) and /v1/embeddings (the diversity
stage's endpoint embedding model). An embeddings line is sent as the SDK sends a direct call
(base64, float32) and decoded as the SDK decodes it, so the vectors, and the diversity numbers
computed from them, are the same either way.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.llm.batch_api import EMBEDDINGS
from harness.llm.pricing import cost_usd

log = logging.getLogger(__name__)

_TRANSIENT = {408, 429}


@dataclass
class Failure:
    status: int | None
    code: str | None
    message: str
    transient: bool


@dataclass
class Outcome:
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # custom_id -> the output line
    failures: dict[str, Failure] = field(default_factory=dict)


def cache_kind(endpoint: str) -> str:
    """The kind the response cache files an endpoint's answers under (as LLMClient does)."""
    return "embed" if endpoint == EMBEDDINGS else "chat"


def _answered(body: dict[str, Any]) -> bool:
    choices, data = body.get("choices"), body.get("data")
    return (isinstance(choices, list) and bool(choices)) or (isinstance(data, list) and bool(data))


def parse_lines(data: bytes, outcome: Outcome) -> None:
    """Sorts a batch output or error file's lines into answers and failures by custom_id."""
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("an unreadable line in a batch result file: %r", raw[:200])
            continue
        cid = line.get("custom_id")
        if not isinstance(cid, str):
            continue
        response = line.get("response") or {}
        status = response.get("status_code")
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        if status == 200 and _answered(body):
            outcome.answers[cid] = line
            outcome.failures.pop(cid, None)
            continue
        err = body.get("error") if isinstance(body.get("error"), dict) else (line.get("error") or {})
        message = err.get("message") or f"HTTP {status}"
        transient = status is None or status in _TRANSIENT or status >= 500
        if cid not in outcome.answers:
            outcome.failures[cid] = Failure(status, err.get("code"), message, transient)


def value_of(endpoint: str, body: dict[str, Any], model: str, prices: dict, inputs: int | None) -> dict[str, Any]:
    """The cache value of one answer, as LLMClient stores a direct call's, costed at batch price.
    `inputs`: how many texts an embeddings request held. ValueError for an answer that does not
    fit its request (e.g. fewer vectors than inputs)."""
    if endpoint == EMBEDDINGS:
        value: dict[str, Any] = {"vectors": _vectors(body, inputs)}
    else:
        choice = body["choices"][0]
        value = {"text": (choice.get("message") or {}).get("content") or "",
                 "finish_reason": choice.get("finish_reason"), "served_model": body.get("model")}
    usage = body.get("usage")
    if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
        prompt, completion = usage["prompt_tokens"], usage.get("completion_tokens") or 0
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        value.update(prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached,
                     cost_usd=cost_usd(model, prompt, cached, completion, prices, batch=True))
    elif endpoint == EMBEDDINGS:
        value["completion_tokens"] = 0
    return value


def _vectors(body: dict[str, Any], inputs: int | None) -> list[list[float]]:
    data = sorted((d for d in body.get("data") or [] if isinstance(d, dict)), key=lambda d: d.get("index", 0))
    if inputs is not None and len(data) != inputs:
        raise ValueError(f"{len(data)} embeddings for {inputs} inputs")
    out = []
    for d in data:
        emb = d.get("embedding")
        if isinstance(emb, str):  # base64 of little-endian float32, as the SDK decodes it
            out.append(np.frombuffer(base64.b64decode(emb), dtype="<f4").tolist())
        elif isinstance(emb, list):
            out.append([float(x) for x in emb])
        else:
            raise ValueError(f"an embedding that is neither a list nor base64: {type(emb).__name__}")
    return out


def turnaround(batch: Any) -> float:
    end = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.failed_at
    return float(end - batch.created_at) if end and batch.created_at else 0.0


__all__ = ["Failure", "Outcome", "cache_kind", "parse_lines", "turnaround", "value_of"]
