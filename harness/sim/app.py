"""The simulator's FastAPI app: chat completions, text completions (completions.py), models, embeddings, vLLM's adapter endpoints,
health; files and fine-tuning jobs come from files_jobs.py (OpenAI's API) and together_api.py
(Together AI's fine-tunes API). Every response carries
`x-simulated: true`, and completions `system_fingerprint: "simulated"`.

Faults (latency, 429, 500, hangs) apply to chat completions only: they stand for a busy
inference service, and the other endpoints stay dependable so tests of them stay simple.
The embeddings endpoint accepts any model name.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import itertools
import math
import re
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.config import SimulatorConfig
from harness.records import Problem
from harness.sim.azure_arm import AzureDeployments, make_arm_router
from harness.sim.faults import Faults, RateLimited, hang
from harness.sim.batches import make_router as make_batch_router
from harness.sim.completions import make_router as make_completions_router
from harness.sim.files_jobs import make_router
from harness.sim.knowledge import Knowledge
from harness.sim.models import BASE_MODELS, ModelParams, base_params, estimate_tokens, prompt_tokens, respond
from harness.sim.protocol import (FINGERPRINT, ApiError, SimulatedMarker, install_error_handlers, parse_body,
                                  validation_error)
from harness.sim.store import Adapter, Store
from harness.sim.together_api import TogetherJobs
from harness.sim.together_api import make_router as make_together_router
from harness.sim.training import TrainingFileError, derive_params, parse_training_file

EMBEDDING_DIM = 64


class Sim:
    """Everything the endpoints share."""

    def __init__(self, cfg: SimulatorConfig, state_dir: Path | None, known_problems: Sequence[Problem]):
        self.cfg = cfg
        self.store = Store(state_dir)
        self.together = TogetherJobs(state_dir)  # Together's fine-tunes API (together_api.py)
        self.knowledge = Knowledge(known_problems)
        self.faults = Faults(cfg)
        # Numbers the unseeded samples this app draws (see `chat`); per app, so that a new
        # server replays the same sequence.
        self.unseeded_draws = itertools.count()
        self.azure = AzureDeployments(cfg.azure, state_dir, lambda m: self.params_for(m, finetunable=True) is not None)

    def root_model(self, name: str) -> str:
        """The base model under an adapter or a finetuned model (the name itself for a base)."""
        params = self.store.adapters[name].params if name in self.store.adapters else self.params_for(name)
        parent = params.parent if params is not None else None
        return self.root_model(parent) if parent and parent != name else name

    def params_for(self, name: str, *, finetunable: bool = False) -> ModelParams | None:
        """The parameters of a model that exists now; None for an unknown model."""
        if name.startswith("sim-"):
            return base_params(name, self.cfg)
        if name.startswith("ft:"):
            return self.store.finetuned(name)
        if "/" in name and (params := self.together.finetuned(name)) is not None:
            return params
        if not finetunable and name in self.store.adapters:
            adapter = self.store.adapters[name]
            if any(fnmatch.fnmatchcase(name, p) for p in self.cfg.unapplied_adapters):
                # Loaded and listed, but answering as its base: a server's silent failure to apply it.
                return self.params_for(adapter.params.parent or "sim-base", finetunable=True)
            return adapter.params
        served = None if finetunable else self.azure.served_model(name)  # an Azure deployment name
        return self.params_for(served, finetunable=True) if served else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown sampling fields are accepted and ignored

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stream: bool | None = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=4096)


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = None


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)


def model_not_found(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{name}` does not exist or you do not have access to it (simulated models: sim-*, "
        "finetuned ft:* models once their job succeeded, and loaded adapters).",
        code="model_not_found",
        param="model",
    )


def embed(text: str, dim: int) -> list[float]:
    """A deterministic embedding: hashed words and word pairs, signed, L2-normalised. Equal texts
    get equal vectors; texts differing in words or word order get different ones."""
    words = re.findall(r"\w+", text.lower())
    features = [(w, 1.0) for w in words] + [(f"{a} {b}", 0.5) for a, b in zip(words, words[1:])]
    vec = [0.0] * dim
    for feature, weight in features or [(text, 1.0)]:
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
        vec[h % dim] += weight if (h >> 32) & 1 else -weight
    norm = math.sqrt(sum(x * x for x in vec))
    if norm == 0:  # all features cancelled out: fall back to one hashed axis
        vec[int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), 16) % dim] = 1.0
        return vec
    return [x / norm for x in vec]


def admit(sim: Sim, req: ChatRequest) -> tuple[ModelParams, list[dict[str, Any]], int]:
    """A chat request's model parameters, messages and prompt tokens; ApiError for an unknown model
    or a prompt longer than the context window. Shared by /v1/chat/completions and batches."""
    params = sim.params_for(req.model)
    if params is None:
        raise model_not_found(req.model)
    messages = [m.model_dump() for m in req.messages]
    p_tokens = prompt_tokens(messages)
    window = sim.cfg.context_tokens
    if window is not None and p_tokens > window:
        raise ApiError(400, f"This model's maximum context length is {window} tokens. However, your messages "
                            f"resulted in {p_tokens} tokens. Please reduce the length of the messages.",
                       param="messages", code="context_length_exceeded")
    return params, messages, p_tokens


def complete(sim: Sim, req: ChatRequest, params: ModelParams, messages: list[dict[str, Any]],
             p_tokens: int) -> tuple[dict[str, Any], int]:
    """The chat.completion body answering an admitted request, and its completion tokens: the
    same answer whether it was asked directly or in a batch."""
    cfg = sim.cfg
    limit = req.max_completion_tokens or req.max_tokens
    choices, c_tokens = [], 0
    for i in range(req.n or 1):
        # Without a seed a real server samples afresh each time, so agents sending the same
        # prompt get different answers. The arrival number stands in for that fresh draw; it
        # is ignored at temperature 0 (greedy), and seeded requests stay reproducible.
        draw_no = i if req.seed is not None else next(sim.unseeded_draws)
        text = respond(req.model, params, messages, sim.knowledge, cfg, seed=req.seed, choice=draw_no,
                       temperature=req.temperature)
        finish = "stop"
        if limit is not None and estimate_tokens(text) > limit:
            text, finish = text[: limit * 4], "length"  # cut like a model hitting max_tokens
        c_tokens += estimate_tokens(text)
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": finish,
                "logprobs": None,
            }
        )
    body = {
        "id": f"chatcmpl-sim{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": p_tokens,
            "completion_tokens": c_tokens,
            "total_tokens": p_tokens + c_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "system_fingerprint": FINGERPRINT,
    }
    return body, c_tokens


def embeddings_body(req: EmbeddingRequest) -> dict[str, Any]:
    """The embeddings list answering a request: the same whether asked directly or in a batch."""
    inputs: list[str]
    if isinstance(req.input, str):
        inputs = [req.input]
    elif req.input and isinstance(req.input[0], int):
        inputs = [" ".join(str(t) for t in req.input)]  # token ids: hash them as words
    else:
        inputs = [x if isinstance(x, str) else " ".join(map(str, x)) for x in req.input]
    if not inputs or any(x == "" for x in inputs):
        raise ApiError(400, "'input' must be a non-empty string or a list of non-empty strings.", param="input")
    dim = req.dimensions or EMBEDDING_DIM
    data = []
    for i, text in enumerate(inputs):
        vec = embed(text, dim)
        value: Any = vec
        if req.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(estimate_tokens(t) for t in inputs)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def answer_request(sim: Sim, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One request of a batch: (HTTP status, response body) as `endpoint` (/v1/chat/completions
    or /v1/embeddings) answers it, without the chat endpoint's faults."""
    try:
        if endpoint == "/v1/embeddings":
            return 200, embeddings_body(EmbeddingRequest.model_validate(body))
        req = ChatRequest.model_validate(body)
        if req.stream:
            raise ApiError(400, "Streaming is not available in a batch.", param="stream")
        params, messages, p_tokens = admit(sim, req)
        return 200, complete(sim, req, params, messages, p_tokens)[0]
    except ValidationError as e:
        err = validation_error(e.errors())
    except ApiError as e:
        err = e
    return err.status, {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def create_app(
    cfg: SimulatorConfig, *, state_dir: Path | None = None, known_problems: Sequence[Problem] = ()
) -> FastAPI:
    sim = Sim(cfg, state_dir, known_problems)
    app = FastAPI(title="Simulated OpenAI-compatible server (test double)", docs_url=None, redoc_url=None)
    app.state.sim = sim
    install_error_handlers(app)
    app.add_middleware(SimulatedMarker)
    app.include_router(make_router(sim))
    app.include_router(make_together_router(sim))
    app.include_router(make_arm_router(sim.azure))  # Azure's management plane: deployments
    app.include_router(make_completions_router(sim))  # /v1/completions with prompt_logprobs
    app.include_router(make_batch_router(sim, lambda endpoint, body: answer_request(sim, endpoint, body)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "simulated": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse_body(request, ChatRequest)
        if req.stream:
            raise ApiError(400, "Streaming is not supported by the simulator; send stream=false.", param="stream")
        params, messages, p_tokens = admit(sim, req)
        draw = sim.faults.draw()
        limit = req.max_completion_tokens or req.max_tokens
        try:
            limit_headers = sim.faults.admit(p_tokens, limit * (req.n or 1) if limit else None, req.model)
        except RateLimited as e:
            kind = "tokens" if "(TPM)" in e.message and "(RPM)" not in e.message else "requests"
            raise ApiError(429, e.message, type=kind, code="rate_limit_exceeded", headers=e.headers) from None
        if draw.latency_s > 0:
            await asyncio.sleep(draw.latency_s)
        if draw.hang:
            await hang(request)
            return ApiError(504, "Simulated timeout.", type="server_error").response()
        if draw.error:
            raise ApiError(
                500,
                "The server had an error while processing your request (simulated fault). Retry the request.",
                type="server_error",
                headers=limit_headers,
            )
        body, c_tokens = complete(sim, req, params, messages, p_tokens)
        if not limit:
            sim.faults.spend(c_tokens)  # no output allowance was counted at admission
        return JSONResponse(body, headers=limit_headers)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return embeddings_body(await parse_body(request, EmbeddingRequest))

    def _models() -> list[dict[str, Any]]:
        out = [{"id": m, "object": "model", "created": 0, "owned_by": "simulator"} for m in BASE_MODELS]
        for name, created, parent in sim.store.finetuned_models():
            out.append({"id": name, "object": "model", "created": created, "owned_by": "sim-org", "parent": parent})
        for a in sim.store.adapters.values():
            out.append({"id": a.name, "object": "model", "created": a.created_at, "owned_by": "vllm", "root": a.path, "parent": a.params.parent})
        return out

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": _models()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for m in _models():
            if m["id"] == model_id:
                return m
        if sim.params_for(model_id) is not None:  # an unlisted sim-* name
            return {"id": model_id, "object": "model", "created": 0, "owned_by": "simulator"}
        raise model_not_found(model_id)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        req = await parse_body(request, LoadAdapter)
        if req.lora_name in sim.store.adapters:
            raise ApiError(400, f"The lora adapter '{req.lora_name}' has already been loaded.", param="lora_name")
        base = req.base_model_name or "sim-base"
        parent = sim.params_for(base, finetunable=True)
        if parent is None:
            raise model_not_found(base)
        path = Path(req.lora_path)
        if not path.exists():
            raise ApiError(400, f"Loading lora {req.lora_name} failed: no adapter found at {path}.", param="lora_path")
        params = await asyncio.to_thread(_adapter_params, path, base, parent, sim.knowledge)
        sim.store.adapters[req.lora_name] = Adapter(name=req.lora_name, path=str(path), params=params, created_at=int(time.time()))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        req = await parse_body(request, UnloadAdapter)
        if sim.store.adapters.pop(req.lora_name, None) is None:
            raise ApiError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name", code="model_not_found")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return app


def _adapter_params(path: Path, base: str, parent: ModelParams, knowledge: Knowledge) -> ModelParams:
    """An adapter's parameters: by the finetuning rule from a training JSONL at `path` (the file
    itself, or the first *.jsonl in the directory); without one, its base model's."""
    source = path if path.is_file() else next(iter(sorted(path.glob("*.jsonl"))), None)
    if source is None:
        return parent.model_copy(update={"parent": base, "note": "adapter without training data: base parameters"})
    try:
        data = parse_training_file(source.read_bytes())
    except (TrainingFileError, OSError) as e:
        return parent.model_copy(update={"parent": base, "note": f"adapter training data unusable ({e}): base parameters"})
    return derive_params(base, parent, data, knowledge)
