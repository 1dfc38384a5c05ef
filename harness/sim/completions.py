"""The simulator's /v1/completions: vLLM's plain-text completions route, enough of it to score a
text with `prompt_logprobs` (what harness/probes.py sends to check that adapters are applied).

Simulated log-probabilities are a deterministic function of the model's *base* (its root: an
adapter's or finetuned model's parent) and the text: one "token" per word or punctuation mark.
A loaded adapter with training data (a *.jsonl in its folder, as the simulator's finetuning rule
reads) adds a shift of up to +-0.05 nats per token, drawn from that data; an adapter without any
(the analogue of LoRA weights that change nothing) or one listed in simulator.unapplied_adapters
(loaded, but answering as its base) scores exactly like the base. A finetuned ft: model shifts
when its parameters differ from its base's. Test double numbers; they mean nothing else.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from harness.sim.models import estimate_tokens
from harness.sim.protocol import FINGERPRINT, ApiError, parse_body

_TOKEN = re.compile(r"\w+|[^\w\s]")
SHIFT_NATS = 0.05


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown sampling fields are accepted and ignored

    model: str
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    prompt_logprobs: int | None = Field(None, ge=-1)
    stream: bool | None = False


def _unit(*parts: str) -> float:
    """A number in [0, 1) from its parts, the same in every process."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def token_ids(text: str) -> list[tuple[int, str]]:
    return [(int(_unit("token", t) * 50_000), t) for t in _TOKEN.findall(text)]


def prompt_logprobs(root: str, shift_key: str | None, text: str) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt_logprobs list for `text` (None for the first token): each entry
    {token id: {logprob, rank, decoded_token}}."""
    tokens = token_ids(text)
    out: list[dict[str, dict[str, Any]] | None] = [None] if tokens else []
    for (prev_id, _), (tid, tok) in zip(tokens, tokens[1:]):
        logprob = -1.0 - 8.0 * _unit(root, str(prev_id), str(tid))
        if shift_key is not None:
            logprob += SHIFT_NATS * (2 * _unit(shift_key, str(prev_id), str(tid)) - 1)
        out.append({str(tid): {"logprob": min(logprob, 0.0), "rank": 1, "decoded_token": tok}})
    return out


def _shift_key(sim: Any, name: str, params: Any) -> str | None:
    """What a model's scores shift by: a loaded adapter's training data (None without any, or when
    the server does not apply it); a finetuned model's parameters when they differ from its base's."""
    if name in sim.store.adapters:
        if sim.params_for(name) is not sim.store.adapters[name].params:  # unapplied: answers as its base
            return None
        path = Path(sim.store.adapters[name].path)
        source = path if path.is_file() else next(iter(sorted(path.glob("*.jsonl"))), None)
        if source is None:
            return None
        try:
            return hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            return None
    base = sim.params_for(sim.root_model(name), finetunable=True)
    fields = {"skill", "persuadability", "correction"}
    own = params.model_dump(include=fields)
    return None if base is not None and own == base.model_dump(include=fields) else repr(sorted(own.items()))


def make_router(sim: Any) -> APIRouter:
    """`sim`: harness.sim.app.Sim (its params_for and root_model)."""
    router = APIRouter()

    @router.post("/v1/completions")
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        if req.stream:
            raise ApiError(400, "Streaming is not supported by the simulator; send stream=false.", param="stream")
        params = sim.params_for(req.model)
        if params is None:
            from harness.sim.app import model_not_found

            raise model_not_found(req.model)
        root = sim.root_model(req.model)
        shift_key = _shift_key(sim, req.model, params)
        text = " sim" * (req.max_tokens or 0)
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                                  "finish_reason": "length" if req.max_tokens else "stop"}
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs(root, shift_key, req.prompt)
        p_tokens, c_tokens = max(1, len(token_ids(req.prompt))), estimate_tokens(text)
        return {"id": f"cmpl-sim{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": [choice], "system_fingerprint": FINGERPRINT,
                "usage": {"prompt_tokens": p_tokens, "completion_tokens": c_tokens,
                          "total_tokens": p_tokens + c_tokens}}

    return router
