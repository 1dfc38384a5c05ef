"""Shared test helpers. Tests never reach the internet or read reference data outside the repo: servers run on
127.0.0.1 and fixtures live here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> ...` as a user would, capturing its output."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli(tmp_path):
    def _run(*args: str, module: str = "harness.loop", timeout: float = 240, env: dict | None = None):
        return run_cli(module, *args, cwd=tmp_path, timeout=timeout, env=env)
    return _run


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The interpreter of .venv-vllm (built by .ci/setup-vllm.sh): skipped without it, failed
    with HARNESS_REQUIRE_VLLM=1 (CI); the `local` extra is needed too (tiny model, adapters)."""
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        reason = f"{python} is missing; create it with .ci/setup-vllm.sh"
        if os.environ.get("HARNESS_REQUIRE_VLLM") == "1":
            pytest.fail(reason + " (HARNESS_REQUIRE_VLLM=1)")
        pytest.skip(reason)
    pytest.importorskip("trl", reason="the `local` extra is needed to build the tiny model and train adapters")
    return python
