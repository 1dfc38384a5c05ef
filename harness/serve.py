"""Serve the base model with vLLM and load each agent's LoRA adapter at run time.

    python -m harness.serve --model PATH [--port 8000] [--adapters name=path ...]
    python -m harness.serve --config vllm --set serve.model=ORG/MODEL [--set serve.replicas=8]

starts vLLM's OpenAI-compatible server(s) with LoRA enabled (serve.replicas of them, on
consecutive ports and their own GPUs; or as Ray jobs with serve.runner: ray, see serve_ray.py),
waits for /health, loads the adapters, checks that every server applies each of them (the probes
of harness/probes.py: an adapter that scores a fixed text like the base model stops the command
with an error naming it; --no-probe skips the check) and blocks until Ctrl-C, then stops the
servers and their workers. The loop uses the same pieces: `serving()` starts the managed servers (serve.manage) or
checks the one(s) the user runs, and `load_adapters()` registers each agent's adapter under its
name and unloads stale ones.

With VLLM_API_KEY set in its environment the command's server requires that key (attach the loop
with endpoint.api_key_env: VLLM_API_KEY); servers the loop starts always require a key of the
run's own (see `serving()`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import struct
import sys
import tempfile
from pathlib import Path
from typing import AsyncIterator, NamedTuple, Sequence

import httpx2

from harness.config import RunConfig
from harness.errors import ConfigError, ServeError
# The server process lives in harness.serve_process (shared with serve_ray); re-exported here,
# where callers have always found it.
from harness.serve_process import ProcessServers, VLLMServer, auth_headers, default_python, replica_configs
from harness.serve_process import root_url as _root

__all__ = ["ProcessServers", "Served", "VLLMServer", "check_health", "default_python", "list_models",
           "load_adapters", "managed_servers", "replica_configs", "serving", "unload_adapters", "validate_adapter"]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ----------------------------------------------------------------------------- adapter checks

def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte length, then JSON), without torch."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


def validate_adapter(path: Path | str, *, max_lora_rank: int) -> dict:
    """Check that vLLM can load the adapter at `path` before anyone registers it: a LoRA of
    rank <= the server's --max-lora-rank, over the base vocabulary (no added tokens, no resized
    or fully trained embeddings). Returns adapter_config.json; raises ServeError saying why not."""
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        raise ServeError(f"{path}: no adapter_config.json; not a PEFT adapter directory")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ServeError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; vLLM serves LoRA adapters only")
    ranks = [cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        raise ServeError(f"{cfg_path}: LoRA rank {max(ranks)} exceeds the server's max_lora_rank {max_lora_rank}; "
                         f"lower finetune.local.r or raise serve.max_lora_rank")
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        raise ServeError(f"{cfg_path}: trains whole modules or token embeddings "
                         f"({cfg.get('modules_to_save') or 'trainable_token_indices'}); vLLM cannot serve that")
    added = path / "added_tokens.json"
    if added.exists() and json.loads(added.read_text(encoding="utf-8") or "{}"):
        raise ServeError(f"{added}: the adapter adds tokens; the server's base vocabulary must stay unchanged")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        full = [n for n in _safetensors_names(weights)
                if n.endswith(("embed_tokens.weight", "lm_head.weight")) and "lora_" not in n]
        if full:
            raise ServeError(f"{weights}: holds full embedding weights ({full[0]}), i.e. a resized vocabulary")
    return cfg


# ----------------------------------------------------------------------------- adapters over HTTP

def _message(resp: httpx2.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(body)


async def list_models(base_url: str, *, client: httpx2.AsyncClient | None = None,
                      api_key: str | None = None) -> list[dict]:
    """The server's /v1/models entries; LoRA adapters carry `parent` (the base) and `root` (their path).
    `api_key`: the server's key (a managed server's own, see serving()); a given `client` sends its own."""
    own = client is None
    client = client or httpx2.AsyncClient(timeout=30, headers=auth_headers(api_key))
    try:
        resp = await client.get(f"{_root(base_url)}/v1/models")
    except httpx2.TransportError as e:
        raise ServeError(f"no model server answers at {base_url} ({type(e).__name__}); start one with "
                         f"`python -m harness.serve --model PATH` or set serve.manage: true") from e
    finally:
        if own:
            await client.aclose()
    if resp.status_code != 200:
        raise ServeError(f"{base_url}/models answered HTTP {resp.status_code}: {_message(resp)}")
    return resp.json().get("data", [])


async def unload_adapters(base_url: str, names: Sequence[str], *, api_key: str | None = None) -> None:
    async with httpx2.AsyncClient(timeout=120, headers=auth_headers(api_key)) as client:
        for name in names:
            resp = await client.post(f"{_root(base_url)}/v1/unload_lora_adapter", json={"lora_name": name})
            if resp.status_code != 200:
                raise ServeError(f"vLLM at {base_url} refused to unload adapter '{name}': {_message(resp)}")


async def load_adapters(base_url: str, adapters: dict[str, str | Path], *, unload_stale: bool = True,
                        stale_prefix: str | None = None, api_key: str | None = None) -> list[str]:
    """Make exactly `adapters` ({name: adapter dir}) available on the server at `base_url`.

    Already loaded under the same name and path: kept. Same name, other path (a retrained
    adapter): reloaded. With `unload_stale`, other loaded adapters are unloaded -- only those
    whose name starts with `stale_prefix` when given, so adapters of other runs sharing the
    server are left alone. The server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."""
    async with httpx2.AsyncClient(timeout=300, headers=auth_headers(api_key)) as client:
        loaded = {m["id"]: m.get("root") for m in await list_models(base_url, client=client) if m.get("parent")}
        stale = [n for n in loaded if n not in adapters and (stale_prefix is None or n.startswith(stale_prefix))]
        wanted = {name: str(Path(p).resolve()) for name, p in adapters.items()}
        changed = [n for n, p in wanted.items() if n in loaded and loaded[n] not in (p, None)]
        for name in (stale if unload_stale else []) + changed:
            resp = await client.post(f"{_root(base_url)}/v1/unload_lora_adapter", json={"lora_name": name})
            if resp.status_code != 200:
                raise ServeError(f"vLLM at {base_url} refused to unload adapter '{name}': {_message(resp)}")
        for name, path in wanted.items():
            if name in loaded and name not in changed:
                continue
            if not Path(path, "adapter_config.json").exists():
                raise ServeError(f"adapter '{name}': {path} is not a LoRA adapter directory (a full finetune "
                                 f"needs a server of its own: python -m harness.serve --model {path})")
            resp = await client.post(f"{_root(base_url)}/v1/load_lora_adapter",
                                     json={"lora_name": name, "lora_path": path})
            if resp.status_code == 404:
                raise ServeError(f"the server at {base_url} has no /v1/load_lora_adapter; start vLLM with "
                                 f"--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
            if resp.status_code != 200:
                raise ServeError(f"vLLM at {base_url} refused adapter '{name}' ({path}): {_message(resp)}")
    return list(wanted)


async def check_health(base_url: str, timeout: float = 10.0, *, api_key: str | None = None) -> None:
    try:
        async with httpx2.AsyncClient(timeout=timeout, headers=auth_headers(api_key)) as client:
            resp = await client.get(f"{_root(base_url)}/health")
    except httpx2.TransportError as e:
        raise ServeError(f"no model server answers at {base_url} ({type(e).__name__}); start it with "
                         f"`python -m harness.serve --model PATH`, or set serve.manage: true") from e
    if resp.status_code != 200:
        raise ServeError(f"the server at {base_url} is unhealthy: HTTP {resp.status_code} {_message(resp)}")


def agent_base_url(base_urls: Sequence[str], agent: int) -> str:
    """Several servers: agent n talks to server n mod count (every server holds every adapter)."""
    return base_urls[agent % len(base_urls)]


def managed_servers(cfg: RunConfig, log_path: Path | None, api_key: str | None = None, *, lora: bool = True):
    """The servers the loop (or `python -m harness.serve`) starts: processes here, or Ray jobs
    (whose submission ids and logs are kept next to `log_path`), requiring `api_key` when given.
    `lora`: False for a whole model served on its own (harness.serve_pool)."""
    if cfg.serve.runner == "ray":
        from harness.serve_ray import RayServers

        return RayServers(cfg.serve, agents=cfg.debate.agents, log_path=log_path, api_key=api_key, lora=lora)
    return ProcessServers(cfg.serve, agents=cfg.debate.agents, log_path=log_path, api_key=api_key, lora=lora)


class Served(NamedTuple):
    """The run's vLLM servers: their base URLs and the key a client sends them."""

    urls: list[str]
    api_key: str


@contextlib.asynccontextmanager
async def serving(cfg: RunConfig, run_dir: Path) -> AsyncIterator[Served]:
    """The vLLM servers of a run: the one(s) we start and stop (serve.manage: serve.replicas of
    them, here or on a Ray cluster) or the ones the user runs (serve.base_urls, else
    endpoint.base_url), checked to answer /health.

    Servers we start answer only this run: each run makes a new random key, hands it to them in
    their environment and to its own clients in memory; it is in no file (not the config, not the
    logs, not the run directory). Attached servers get the user's key (endpoint.api_key_env)."""
    if cfg.serve.manage:
        key = secrets.token_urlsafe(32)
        servers = managed_servers(cfg, Path(run_dir) / "serve" / "vllm.log", api_key=key)
        try:
            # Inside the try: a Ctrl-C while the servers start still stops the ones started.
            servers.start()
            await servers.wait_healthy()
            yield Served(servers.urls, key)
        finally:
            servers.stop()
        return
    urls = list(cfg.serve.base_urls) or ([cfg.endpoint.base_url] if cfg.endpoint.base_url else [])
    if not urls:
        raise ConfigError("endpoint.base_url: a vllm endpoint needs the server's URL (or serve.base_urls, "
                          "or serve.manage: true to start one)")
    key = cfg.endpoint.api_key()
    for url in urls:
        await check_health(url, api_key=key)
    yield Served(urls, key)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ----------------------------------------------------------------------------- command line

async def _probe(urls: list[str], base: str, adapters: dict[str, str], cfg: RunConfig, key: str | None) -> None:
    """The loop's adapter probes (harness.probes) on the command's servers, one line per adapter and
    server; AdapterNotApplied (a ServeError) when a server does not apply one. The probe requests
    go through the harness's client, whose usage records go to a folder removed afterwards: this
    command has no run folder. AdapterNotApplied is a ServeError: main() prints it and stops."""
    from harness.config import EndpointConfig
    from harness.llm.client import LLMClient
    from harness.probes import PROBES_FILE, AdapterProbes, probe_adapters

    with tempfile.TemporaryDirectory(prefix="harness-serve-probe-") as tmp:
        out = Path(tmp) / PROBES_FILE
        endpoint = EndpointConfig(kind="vllm", api_key_env=None, max_retries=2)
        async with LLMClient(base_url=urls, api_key=key or "EMPTY", run_dir=Path(tmp), endpoint=endpoint,
                             sampling=cfg.sampling) as client:
            try:
                await probe_adapters(client, urls, base, sorted(adapters), settings=cfg.serve.probe, iteration=0,
                                     out_path=out)
            finally:  # every verdict, the failing ones included
                if out.exists():
                    for p in AdapterProbes.model_validate_json(out.read_bytes()).probes:
                        print(f"probe {p.adapter} at {p.server}: {p.verdict.replace('_', ' ')} (max |Δ logprob| "
                              f"{p.max_abs_delta:.4g} vs the base over {p.tokens} tokens; unchanged at <= "
                              f"{p.threshold:.3g})", flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.serve",
                                description="Start a vLLM server with LoRA enabled and load adapters.")
    p.add_argument("--config", help="a run config (file or preset) whose `serve` section is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value")
    p.add_argument("--model", help="base model path or hub id (overrides serve.model)")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--max-loras", type=int)
    p.add_argument("--python", help="interpreter with vLLM installed")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=PATH")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the check that each server applies every adapter (serve.probe.enabled: false)")
    p.add_argument("--log", type=Path, help="server log file; with serve.replicas > 1, one per server (LOG-0, LOG-1, ...)")
    args, extra = p.parse_known_args(argv)
    from harness.config import load_config

    cfg = load_config(args.config, args.overrides) if args.config else RunConfig()
    serve = cfg.serve.model_copy(update={k: v for k, v in {
        "model": args.model, "port": args.port, "host": args.host, "max_lora_rank": args.max_lora_rank,
        "max_loras": args.max_loras, "python": args.python,
        "extra_args": [*cfg.serve.extra_args, *[a for a in extra if a != "--"]]}.items() if v is not None})
    adapters = dict(a.split("=", 1) for a in args.adapters)
    # The key clients must send: $VLLM_API_KEY when set (vLLM's own variable; clients read it with
    # endpoint.api_key_env: VLLM_API_KEY). Never on the command line, which every local user can read.
    key = os.environ.get("VLLM_API_KEY") or None
    if key is None and (serve.runner == "ray" or not _loopback(serve.host)):
        print(f"warning: this server will answer anyone who reaches {serve.host if serve.runner != 'ray' else 'its node'};"
              f" export VLLM_API_KEY=<a secret> to require a key", file=sys.stderr, flush=True)
    servers = managed_servers(cfg.model_copy(update={"serve": serve}), args.log, api_key=key)

    async def run() -> None:
        servers.start()
        for command in servers.commands():
            print(f"starting vLLM: {' '.join(command)}", flush=True)
        await servers.wait_healthy()
        for url in servers.urls:
            if adapters:
                await load_adapters(url, adapters, api_key=key)
        if adapters and cfg.serve.probe.enabled and not args.no_probe:
            await _probe(list(servers.urls), serve.served_name, adapters, cfg, key)
        print(f"serving {serve.model} as '{serve.served_name}' at {', '.join(servers.urls)}"
              f"{' with ' + ', '.join(adapters) if adapters else ''}"
              f"{' for clients sending $VLLM_API_KEY' if key else ''}; Ctrl-C stops it", flush=True)
        while True:
            servers.check_alive()
            await asyncio.sleep(1.0)

    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the server as cleanly as Ctrl-C
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        print("stopping vLLM", flush=True)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
