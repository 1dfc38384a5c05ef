"""Where chat calls go: the built-in simulator (started in-process on 127.0.0.1), OpenAI, or
vLLM (a server the loop starts and stops, or servers the user runs). Yields the run's
OpenAI-compatible base URLs (one, or several vLLM servers that agents are spread across) and the
key to send them: the user's (endpoint.api_key_env), or the run's own for servers it started."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator, NamedTuple, Sequence

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.records import Problem

OPENAI_BASE_URL = "https://api.openai.com/v1"


class Endpoint(NamedTuple):
    urls: list[str]
    api_key: str  # held in memory only: never written to the run directory


@contextlib.asynccontextmanager
async def open_endpoint(cfg: RunConfig, run_dir: Path, problems: Sequence[Problem] = ()) -> AsyncIterator[Endpoint]:
    kind = cfg.endpoint.kind
    if kind == "simulator":
        from harness.sim import SimServer

        # The simulator keeps its files, jobs and finetuned models under the run directory, so a
        # resumed run finds the jobs it started.
        server = SimServer(cfg.endpoint.simulator, state_dir=run_dir / "simulator", known_problems=problems)
        server.start()
        try:
            yield Endpoint([server.base_url], cfg.endpoint.api_key())
        finally:
            server.stop()
    elif kind == "openai":
        yield Endpoint([cfg.endpoint.base_url or OPENAI_BASE_URL], cfg.endpoint.api_key())
    elif kind == "vllm":
        from harness.serve import serving

        async with serving(cfg, run_dir) as served:
            yield Endpoint(served.urls, served.api_key)
    else:  # pragma: no cover - the config's Literal already forbids it
        raise ConfigError(f"endpoint.kind: unknown kind {kind!r}")
