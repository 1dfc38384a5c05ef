"""`python -m harness.compare` on the simulator: the paper's Tables 1 and 2, one row per method,
pins hold, a paired test against multiagent FT, reruns reuse; --base sets up every method."""

import csv
import json

import pytest

from harness.compare import load_comparison, method_key, resolve_method
from harness.fileio import read_jsonl
from harness.records import DebateRecord
from harness.stats import mcnemar_exact

TABLE1 = ["single-agent", "majority-vote", "debate", "star", "majority-ft", "multiagent-ft"]
TABLE2 = ["multiagent-ft", "multiagent-ft-wo-summary", "multiagent-ft-wo-critic", "single-agent-ft",
          "single-agent-ft-wo-debate"]


def test_the_paper_sets_list_their_methods_as_the_paper_names_them():
    t1, t2 = load_comparison("paper-table1"), load_comparison("paper-table2")
    assert [method_key(m) for m in t1.methods] == TABLE1 and [method_key(m) for m in t2.methods] == TABLE2
    assert [m.label for m in t1.methods] == ["Single agent", "Majority", "Debate", "STaR (reads ground truth)",
                                             "Majority FT", "Multiagent FT (ours)"]
    assert t1.reference == t2.reference == "multiagent-ft" and (t1.table, t2.table) == ("table1", "table2")


def test_paper_sizes_by_default_and_small_on_the_simulator():
    cs = load_comparison("paper-table1")
    spec = cs.methods[TABLE1.index("multiagent-ft")]
    sim = resolve_method(spec, cs, [], None)
    assert sim.endpoint.kind == "simulator" and (sim.task.n_train, sim.task.n_test) == (100, 100)
    assert resolve_method(spec, cs, ["task.n_test=7"], None).task.n_test == 7  # --set wins
    real = resolve_method(spec, cs, ["endpoint.kind=openai", "models.base=gpt-4.1-mini-2025-04-14"], None)
    assert (real.task.n_train, real.task.n_test, real.debate.agents, real.debate.rounds) == (500, 500, 3, 2)
    assert real.finetune.iterations == 1


def test_one_base_preset_sets_up_every_method_and_pins_still_hold():
    cs = load_comparison("paper-table2")
    cfgs = {method_key(s): resolve_method(s, cs, ["serve.model=/models/phi3", "debate.agents=5"], "vllm")
            for s in cs.methods}
    for key, cfg in cfgs.items():
        assert cfg.name == key and cfg.endpoint.kind == "vllm" and cfg.finetune.provider == "local"
        assert cfg.serve.model == "/models/phi3" and cfg.task.name == "math" and cfg.task.n_test == 500
        assert cfg.debate.agents == 5  # the override reaches every method ...
    assert cfgs["multiagent-ft-wo-summary"].debate.mode == "concatenate"  # ... the method's own fields stay
    assert cfgs["multiagent-ft-wo-critic"].finetune.train_critics is False
    wo = cfgs["single-agent-ft-wo-debate"]
    assert wo.finetune.single_model and (wo.test_agents, wo.test_rounds) == (1, 1)
    t1 = load_comparison("paper-table1")
    star = resolve_method(t1.methods[TABLE1.index("star")], t1, ["debate.agents=5"], "openai")
    assert star.debate.agents == 1 and star.finetune.selection == "star" and star.finetune.start_from == "base"
    assert star.endpoint.kind == "openai" and star.models.base.startswith("gpt-")


def test_bad_override_fails_before_anything_runs(cli, tmp_path):
    proc = cli("--out", "out", "--set", "debate.agents=zero", "--no-report", module="harness.compare")
    assert proc.returncode == 2 and "debate.agents" in proc.stderr
    assert not list((tmp_path / "out").glob("*/config.yaml"))


def _table(path) -> dict[str, dict]:
    with open(path) as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def _check_paired(out, rows: dict[str, dict], method: str) -> None:
    """The table's paired numbers are those of the two runs' test debates, matched by problem."""
    def outcomes(m):
        return {r.problem.id: r.correct for r in read_jsonl(out / m / "iter-1" / "debate-test.jsonl", DebateRecord)}
    ours, ref = outcomes(method), outcomes("multiagent-ft")
    only_m = sum(ours[p] and not ref[p] for p in ref)
    only_r = sum(ref[p] and not ours[p] for p in ref)
    row = rows[method]
    assert (int(float(row["only_method"])), int(float(row["only_ref"])), int(float(row["n_paired"]))) == (only_m, only_r, len(ref))
    assert float(row["p_mcnemar"]) == pytest.approx(mcnemar_exact(only_m, only_r))
    assert float(row["diff_vs_ref"]) == pytest.approx((only_m - only_r) / len(ref))
    assert float(row["ci_low"]) <= float(row["diff_vs_ref"]) <= float(row["ci_high"])


SMALL = ("--no-report", "--set", "task.n_test=12", "--set", "task.n_train=24")


@pytest.mark.slow
def test_paper_table1_end_to_end_on_the_simulator(cli, tmp_path):
    proc = cli("--comparison", "paper-table1", "--out", "out", *SMALL, module="harness.compare", timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    out = tmp_path / "out"
    rows = _table(out / "table1.csv")
    assert list(rows) == TABLE1
    assert all(r["n"] == "12" and r["status"] == "ran" and r["simulated"] == "True" for r in rows.values())
    assert [rows[m]["agents"] + "x" + rows[m]["rounds"] for m in TABLE1] == ["1x1", "3x1", "3x2", "1x1", "3x1", "3x2"]
    assert [rows[m]["iterations"] for m in TABLE1] == ["0", "0", "0", "1", "1", "1"]
    for r in rows.values():
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["truncated_rate"]) == 0 and int(r["calls"]) > 0
    assert rows["multiagent-ft"]["p_mcnemar"] == "" and "McNemar" in rows["star"]["paired_test"]
    _check_paired(out, rows, "star")
    # STaR read gold and rationalized; Majority FT pooled its samples into one model.
    star = json.loads((out / "star" / "iter-0" / "ftdata" / "stats.json").read_text())
    assert star["reads_gold"] and star["agents"][0]["rationalized_tried"] > 0
    assert (out / "star" / "iter-0" / "star-rationalize.jsonl").is_file()
    mft = json.loads((out / "majority-ft" / "registry.json").read_text())["entries"]
    assert len({e["job_id"] for e in mft}) == 1 and len(mft) == 3
    md = (out / "table1.md").read_text()
    assert "SIMULATED" in md and md.count("\n| ") == 1 + len(TABLE1)
    assert "exact McNemar" in md and "reference" in md and "task.n_test=100" in md


@pytest.mark.slow
def test_paper_table2_end_to_end_on_the_simulator_and_rerun_reuses(cli, tmp_path):
    args = ("--comparison", "paper-table2", "--out", "out", *SMALL)
    proc = cli(*args, module="harness.compare", timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    out = tmp_path / "out"
    rows = _table(out / "table2.csv")
    assert list(rows) == TABLE2 and all(r["n"] == "12" and r["status"] == "ran" for r in rows.values())
    assert rows["single-agent-ft-wo-debate"]["agents"] == "1" and rows["single-agent-ft"]["agents"] == "3"
    _check_paired(out, rows, "single-agent-ft-wo-debate")
    metrics = json.loads((out / "single-agent-ft-wo-debate" / "iter-1" / "metrics.json").read_text())
    assert len(metrics["generators"]) == 1  # data from a 3-agent debate, one agent at test
    entries = json.loads((out / "single-agent-ft" / "registry.json").read_text())["entries"]
    assert len(entries) == 6 and len({e["model_id"] for e in entries}) == 1
    critics = [e for e in json.loads((out / "multiagent-ft-wo-critic" / "registry.json").read_text())["entries"]
               if e["role"] == "critic"]
    assert {(e["status"], e["model_id"]) for e in critics} == {("kept", "sim-base")}
    assert "Multiagent FT w/o summary" in (out / "table2.md").read_text()
    # Run again: every finished method is reused, nothing is rerun.
    again = cli(*args, module="harness.compare", timeout=120)
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in _table(out / "table2.csv").values()} == {"reused"}


def test_star_iterations_set_for_star_alone(tmp_path):
    """STaR's iteration count apart from the other methods': from the command line
    (--method-set, after --set) or in the set's file (a method's `overrides`, before --set)."""
    from harness.compare import method_overrides

    t1 = load_comparison("paper-table1")
    own = method_overrides(["star:finetune.iterations=3"], t1.methods)
    cfgs = {method_key(s): resolve_method(s, t1, ["finetune.iterations=2"], None, own.get(method_key(s)))
            for s in t1.methods}
    assert cfgs["star"].finetune.iterations == 3
    assert cfgs["multiagent-ft"].finetune.iterations == cfgs["majority-ft"].finetune.iterations == 2
    assert cfgs["debate"].finetune.iterations == 0  # pinned: the baseline never finetunes

    path = tmp_path / "set.yaml"
    path.write_text("name: s\nmethods:\n  - preset: star\n    overrides: {finetune.iterations: 4}\n"
                    "  - preset: multiagent-ft\n")
    cs = load_comparison(str(path))
    star, ours = (resolve_method(s, cs, [], None) for s in cs.methods)
    assert (star.finetune.iterations, ours.finetune.iterations) == (4, 1)
    assert resolve_method(cs.methods[0], cs, ["finetune.iterations=2"], None).finetune.iterations == 2


@pytest.mark.parametrize("item, says", [("nosuch:finetune.iterations=3", "METHOD one of"),
                                        ("star:finetune.selection=vote", "star pins finetune.selection"),
                                        ("star-finetune.iterations=3", "METHOD:KEY=VALUE")])
def test_bad_method_override_fails_before_anything_runs(cli, tmp_path, item, says):
    proc = cli("--out", "out", "--method-set", item, "--no-report", module="harness.compare")
    assert proc.returncode == 2 and says in proc.stderr
    assert not (tmp_path / "out").exists()
