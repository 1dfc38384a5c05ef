"""SimServer: the simulator served by uvicorn on 127.0.0.1 in a background thread.

A thread with its own event loop, so the server keeps answering while the caller's loop (or a
synchronous caller) blocks, and so callers talk to it over real HTTP as to any endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Sequence

import uvicorn

from harness.config import SimulatorConfig
from harness.errors import ServeError
from harness.records import Problem
from harness.sim.app import create_app

HOST = "127.0.0.1"  # never exposed beyond this machine


class SimServer:
    def __init__(
        self,
        cfg: SimulatorConfig | None = None,
        *,
        port: int = 0,
        state_dir: Path | None = None,
        known_problems: Sequence[Problem] = (),
    ):
        self.cfg = cfg or SimulatorConfig()
        self.port = port
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.known_problems = list(known_problems)
        self.base_url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> "SimServer":
        if self._thread is not None:
            return self
        app = create_app(self.cfg, state_dir=self.state_dir, known_problems=self.known_problems)
        # Bind here rather than in uvicorn, so port=0 gives a free port we know before serving.
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when their
        # proto says TCP, and without it every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, self.port))
        except OSError as e:
            sock.close()
            raise ServeError(f"simulator: cannot listen on {HOST}:{self.port} ({e}); pick another port or 0 for a free one") from e
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            backlog=2048,  # benchmarks open many connections at once
            timeout_graceful_shutdown=1,  # hung (simulated-timeout) requests must not hold up stop()
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"sim-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                self._thread = None
                raise ServeError(f"simulator: the server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"simulator: the server did not start within {timeout_s:.0f}s")
            time.sleep(0.01)
        self.base_url = f"http://{HOST}:{self.port}/v1"
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            assert self._server is not None
            asyncio.run(self._server.serve(sockets=[sock]))
        except BaseException as e:  # reported by start()
            self._error = e
        finally:
            sock.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None
        self._server = None

    def __enter__(self) -> "SimServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> "SimServer":
        # Starting blocks for a moment; keep the caller's event loop free meanwhile.
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        return f"SimServer({self.base_url or 'not started'}, simulated)"
