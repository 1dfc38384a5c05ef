"""The chaos suite's short version (benchmarks/chaos.py): SIGKILLs at random stages during a fault
storm, each followed by --resume, checked against an uninterrupted run with the same seed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "chaos.py"


@pytest.mark.slow
def test_three_kills_in_a_fault_storm_lose_nothing_and_repeat_nothing(tmp_path):
    report = tmp_path / "chaos.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--trials", "1", "--kills", "3", "--storm", "always",
                             "--seed", "1", "--out", str(report), "--workdir", str(tmp_path / "work")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert "**1 of 1 trials passed every check**" in text
    landed = int(re.search(r"(\d+) SIGKILLs landed", text).group(1))
    assert landed >= 2, text  # a kill planned at the very end may come after the run has finished
