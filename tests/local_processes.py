"""Helpers of the tests that start servers and jobs on 127.0.0.1 and check that they end."""

from __future__ import annotations

import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_gone(pid: int, limit_s: float = 120.0) -> bool:
    """Waits for a process to end; the limit only keeps a broken test from hanging."""
    deadline = time.monotonic() + limit_s
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return gone(pid)
