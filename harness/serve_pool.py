"""Fully finetuned agents served by vLLM: one server per distinct model a debate needs.

With `finetune.local.full_finetune` every trained role is a whole model folder, which vLLM
cannot load into a running server as it loads a LoRA adapter. The pool gives each model a
server of its own, under the name the registry uses (so debate records keep naming the model),
in a slot with its own port (serve.port + slot) and, with serve.devices, its own GPUs
(tensor x data parallel size of them). The client is told which server answers which model
(`LLMClient.route`).

Lifetime: `serve()` before a debate keeps the servers of models still needed, stops the others,
then starts the missing ones; `stop_all()` before a finetuning stage hands every GPU to training,
and at the end of the run. Each server is a managed server (harness.serve_process: the run's own
key, dies with the run even when it is SIGKILLed; or a Ray job with serve.runner: ray). Each
start and stop is a line of <run>/serve/servers.jsonl with the seconds the start took.

When the GPUs are fewer than the models, the config check refuses the run and says how many it
needs (harness.serve_full); see docs/serving/full-models.md for why there is no swap mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from pathlib import Path
from typing import AsyncIterator, Iterable, Literal

from pydantic import BaseModel

from harness.config import RunConfig
from harness.endpoints import Endpoint
from harness.errors import ServeError
from harness.fileio import JsonlAppender
from harness.serve_full import gpus_per_server, scores_base, servers_needed, serves_full_models

RECORD = "servers.jsonl"


class ServerEvent(BaseModel):
    """One line of <run>/serve/servers.jsonl: a model's server started (with how long it took to
    answer /health) or stopped."""

    event: Literal["started", "stopped"]
    model: str  # the name it is served under (the registry's model id)
    weights: str
    slot: int
    url: str
    devices: list[str] | None = None  # CUDA_VISIBLE_DEVICES given to it (None: the environment's)
    pids: list[int] = []
    seconds: float | None = None  # started: from launch to /health answering
    at: float


class _Slot:
    def __init__(self, model: str, weights: str, servers, url: str, devices: list[str] | None):
        self.model, self.weights, self.servers, self.url, self.devices = model, weights, servers, url, devices


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:100] or "model"


class ModelPool:
    """The run's servers of whole models, `slots` of them at most (see servers_needed)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, slots: int | None = None):
        self.cfg = cfg
        self.dir = Path(run_dir) / "serve"
        self.slots: list[_Slot | None] = [None] * (slots or servers_needed(cfg))
        self.api_key = secrets.token_urlsafe(32)  # in memory only, as serve.serving() does
        from harness.models import resolve

        self.base_weights = resolve(cfg.serve.model) if cfg.serve.model else None
        self.base_names = {n for n in (cfg.models.base, cfg.serve.served_name, cfg.serve.model) if n}

    @property
    def urls(self) -> list[str]:
        """One URL per slot (a Ray server's real address is routed once it runs)."""
        s = self.cfg.serve
        return [f"http://{s.host}:{s.port + i}/v1" for i in range(len(self.slots))]

    def served(self) -> dict[str, str]:
        """{model: base URL} of the servers up now."""
        return {s.model: s.url for s in self.slots if s is not None}

    # ------------------------------------------------------------------ which models

    def models_for(self, generators: Iterable[str], critics: Iterable[str], summarizer: str, *, rounds: int,
                   split: str, artifacts: dict[str, str]) -> dict[str, str]:
        """{model: weights folder} a debate needs: the generators, and with later rounds the
        critics and (mode summarize) the summarizer; on the test split the base model when the
        likelihood measures score it. `artifacts`: the provider's {model id: folder}."""
        names = list(generators)
        if rounds > 1:
            names += list(critics) + ([summarizer] if self.cfg.debate.mode == "summarize" else [])
        if split == "test" and scores_base(self.cfg):
            names.append(self.cfg.models.base)
        out: dict[str, str] = {}
        for name in dict.fromkeys(names):
            if name in artifacts:
                out[name] = artifacts[name]
            elif name in self.base_names and self.base_weights:
                out[name] = self.base_weights
            else:
                raise ServeError(f"model '{name}': no weights for it (neither a model this run finetuned nor the base "
                                 f"model {sorted(self.base_names)}); a fully finetuned society is served from the "
                                 f"run's own job folders")
        return out

    # ------------------------------------------------------------------ servers

    async def serve(self, models: dict[str, str], client=None) -> dict[str, str]:
        """Make exactly `models` ({served name: weights folder}) served, one server each; route
        `client`'s calls for each to its server. Returns {model: base URL}."""
        if len(models) > len(self.slots):
            raise ServeError(f"{len(models)} models to serve at once ({', '.join(models)}) but the run has "
                             f"{len(self.slots)} server slots; this is a bug in counting them (harness.serve_full)")
        for i, slot in enumerate(self.slots):
            if slot is not None and models.get(slot.model) != slot.weights:
                self._stop(i)
        missing = [(m, w) for m, w in models.items() if m not in self.served()]
        started = []
        try:
            for model, weights in missing:
                i = self.slots.index(None)
                self.slots[i] = self._launch(i, model, weights)
                started.append((i, time.monotonic()))
            await asyncio.gather(*(self._healthy(i, t0) for i, t0 in started))
        except BaseException:
            for i, _ in started:
                self._stop(i)
            raise
        routes = self.served()
        if client is not None:
            for model, url in routes.items():
                client.route(model, url)
        return routes

    def _launch(self, i: int, model: str, weights: str) -> _Slot:
        from harness.serve import managed_servers

        s = self.cfg.serve
        per = gpus_per_server(self.cfg)
        devices = [str(d) for d in s.devices[i * per:(i + 1) * per]] if s.devices is not None else None
        one = s.model_copy(update={"model": weights, "served_name": model, "port": s.port + i, "replicas": 1,
                                   "devices": devices})
        log = self.dir / "models" / _safe(model) / "vllm.log"
        servers = managed_servers(self.cfg.model_copy(update={"serve": one}), log, api_key=self.api_key, lora=False)
        servers.start()
        return _Slot(model, weights, servers, f"http://{s.host}:{s.port + i}/v1", devices)

    async def _healthy(self, i: int, t0: float) -> None:
        slot = self.slots[i]
        assert slot is not None
        await slot.servers.wait_healthy()
        if slot.servers.urls:  # a Ray job is reached at its node's address
            slot.url = slot.servers.urls[0]
        self._record("started", i, seconds=round(time.monotonic() - t0, 2))

    def _pids(self, slot: _Slot) -> list[int]:
        return [srv.proc.pid for srv in getattr(slot.servers, "servers", []) if getattr(srv, "proc", None)]

    def _record(self, event: str, i: int, seconds: float | None = None) -> None:
        slot = self.slots[i]
        assert slot is not None
        with JsonlAppender(self.dir / RECORD) as out:
            out.append(ServerEvent(event=event, model=slot.model, weights=slot.weights, slot=i, url=slot.url,
                                   devices=slot.devices, pids=self._pids(slot), seconds=seconds, at=time.time()))

    def _stop(self, i: int) -> None:
        slot = self.slots[i]
        if slot is None:
            return
        pids = self._pids(slot)
        try:
            slot.servers.stop()
        finally:
            self.slots[i] = None
            with JsonlAppender(self.dir / RECORD) as out:
                out.append(ServerEvent(event="stopped", model=slot.model, weights=slot.weights, slot=i, url=slot.url,
                                       devices=slot.devices, pids=pids, at=time.time()))

    def stop_all(self) -> None:
        """Every server, even when stopping one is interrupted (a second Ctrl-C kills the rest)."""
        interrupted: BaseException | None = None
        for i in range(len(self.slots)):
            try:
                self._stop(i)
            except KeyboardInterrupt as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted

    @contextlib.asynccontextmanager
    async def endpoint(self) -> AsyncIterator[Endpoint]:
        """The run's endpoint: the slots' URLs and the key; every server stopped at the end."""
        try:
            yield Endpoint(self.urls, self.api_key)
        finally:
            self.stop_all()


def model_pool(cfg: RunConfig, run_dir: Path) -> ModelPool | None:
    """The pool when the run serves fully finetuned agents (harness.serve_full), else None."""
    return ModelPool(cfg, run_dir) if serves_full_models(cfg) else None
