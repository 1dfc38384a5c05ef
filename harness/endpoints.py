"""Where chat calls go: the built-in simulator (started in-process on 127.0.0.1), OpenAI, or a
vLLM server. Yields the OpenAI-compatible base URL for the run."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator, Sequence

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.records import Problem

OPENAI_BASE_URL = "https://api.openai.com/v1"


@contextlib.asynccontextmanager
async def open_endpoint(cfg: RunConfig, run_dir: Path, problems: Sequence[Problem] = ()) -> AsyncIterator[str]:
    kind = cfg.endpoint.kind
    if kind == "simulator":
        from harness.sim import SimServer

        # The simulator keeps its files, jobs and finetuned models under the run directory, so a
        # resumed run finds the jobs it started.
        server = SimServer(cfg.endpoint.simulator, state_dir=run_dir / "simulator", known_problems=problems)
        server.start()
        try:
            yield server.base_url
        finally:
            server.stop()
    elif kind == "openai":
        yield cfg.endpoint.base_url or OPENAI_BASE_URL
    elif kind == "vllm":
        if not cfg.endpoint.base_url:
            raise ConfigError("endpoint.base_url: a vllm endpoint needs the server's URL, e.g. http://127.0.0.1:8000/v1")
        yield cfg.endpoint.base_url
    else:  # pragma: no cover - the config's Literal already forbids it
        raise ConfigError(f"endpoint.kind: unknown kind {kind!r}")
