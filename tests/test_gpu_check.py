"""benchmarks/gpu_check.py, the script a lab runs first on its GPU machine, rehearsed on CPU
processes here so it does not rot between the rare runs on a GPU: every check passes on the tiny
model, and its report says what ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the `local` extra (torch, transformers, peft, trl) is not installed")

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1500)  # four trainings; minutes on a busy 2-core machine
def test_the_gpu_check_passes_on_cpu_processes(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--models", "tiny", "--out", str(out)], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert set(checks) == {"LoRA, one process", "full FT, one process", "full FT, FSDP over 2 processes",
                           "resident: 2 adapters, one process"}
    assert all(c["ok"] for c in checks.values()) and report["ok"]
    # The two comparisons really compared curves of the same length, within the CPU tolerance.
    for name in ("full FT, FSDP over 2 processes", "resident: 2 adapters, one process"):
        assert checks[name]["steps"] == checks["LoRA, one process"]["steps"] > 1
        assert checks[name]["max_rel_diff"] <= report["rtol"]


def test_the_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "--device cpu" in proc.stderr and "Traceback" not in proc.stderr
