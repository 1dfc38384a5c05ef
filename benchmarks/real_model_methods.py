"""Running one method of the real-model comparison through the unpatched loop, shared by the
ad hoc benchmark (benchmarks/real_model.py) and the pre-registered protocol (real_model_run.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_iteration_0(source: Path, run_dir: Path) -> None:
    """Give a new run the iteration-0 debates of `source` (same base society, same problems): the
    loop reuses debate records it finds, so both methods then finetune on data from the very same
    debates and differ only in how they use them, as in the paper's comparison."""
    if (run_dir / "config.yaml").exists():
        return
    for name in ("debate-test.jsonl", "debate-train.jsonl"):
        src = source / "iter-0" / name
        if src.is_file():
            (run_dir / "iter-0").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, run_dir / "iter-0" / name)


def run_method(name: str, sets: list[str], run_dir: Path, log: Path, preset: str = "smollm2") -> float:
    """Run (or resume, or reuse) one method through the loop; returns this session's wall time."""
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("finished"):
        print(f"== {name}: finished earlier, reused ({run_dir})", flush=True)
        return 0.0
    args = ["--resume", str(run_dir)] if (run_dir / "config.yaml").is_file() else \
        ["--config", preset, "--run-dir", str(run_dir)]
    cmd = [sys.executable, "-m", "harness.loop", *args, *[a for s in sets for a in ("--set", s)]]
    print(f"== {name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    started = time.monotonic()
    with open(log, "a") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}. Run the benchmark again to resume it.")
    return time.monotonic() - started
