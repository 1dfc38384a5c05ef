"""`python -m harness.compare` on the simulator: one row per method, pins hold, reruns reuse."""

import csv
import json

import pytest

from harness.compare import load_comparison, method_key

METHODS = ["single-agent", "majority-vote", "debate", "star", "multiagent-ft"]


def test_paper_table1_lists_the_five_methods():
    assert [method_key(m) for m in load_comparison("paper-table1").methods] == METHODS


def test_bad_override_fails_before_anything_runs(cli, tmp_path):
    proc = cli("--out", "out", "--set", "debate.agents=zero", "--no-report", module="harness.compare")
    assert proc.returncode == 2 and "debate.agents" in proc.stderr
    assert not list((tmp_path / "out").glob("*/config.yaml"))


@pytest.mark.slow
def test_comparison_set_writes_one_row_per_method(cli, tmp_path):
    args = ("--out", "out", "--no-report", "--set", "task.n_test=12", "--set", "task.n_train=30",
            "--set", "debate.agents=2")
    proc = cli(*args, module="harness.compare", timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    with open(tmp_path / "out" / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == METHODS
    by = {r["method"]: r for r in rows}
    assert all(r["n"] == "12" and r["status"] == "ran" and r["simulated"] == "True" for r in rows)
    # --set applies to every method, but a method's defining fields are pinned.
    assert by["single-agent"]["agents"] == "1" and by["debate"]["agents"] == "2"
    assert by["majority-vote"]["rounds"] == "1" and by["debate"]["rounds"] == "2"
    assert by["star"]["iterations"] == "1" and by["debate"]["iterations"] == "0"
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["stderr"]) > 0 and int(r["calls"]) > 0
    # STaR pools every agent's data into one shared model; multiagent finetuning keeps one per agent.
    star = json.loads((tmp_path / "out" / "star" / "registry.json").read_text())["entries"]
    maft = json.loads((tmp_path / "out" / "multiagent-ft" / "registry.json").read_text())["entries"]
    star_gens = {e["model_id"] for e in star if e["role"] == "generator" and e["status"] == "succeeded"}
    maft_gens = {e["model_id"] for e in maft if e["role"] == "generator" and e["status"] == "succeeded"}
    assert len(star_gens) == 1 and len(maft_gens) == 2
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "SIMULATED" in md and md.count("\n| ") == 1 + len(METHODS)
    # Run again: every finished method is reused, nothing is rerun.
    again = cli(*args, module="harness.compare", timeout=120)
    assert again.returncode == 0, again.stderr
    with open(tmp_path / "out" / "table1.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"reused"}
