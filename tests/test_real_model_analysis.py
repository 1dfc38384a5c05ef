"""The real-model result is recomputed from its per-problem records: every number of the committed
README's tables from benchmarks/results/real-model/records.csv; the statistics against values
computed by hand; the protocol's dev split kept away from every test split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.ftdata import FileStats, FtDataStats
from harness.finetune import mean_agent_job_steps
from harness.config import FinetuneConfig
from harness.tasks import load_split

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from real_model_analysis import (DIVERSITY_TITLE, NOT_RUN, disagreements, holm, render, stratified_exact,  # noqa: E402
                                 tables)
from real_model_protocol import load_protocol  # noqa: E402
from real_model_records import (DiversityRow, ProblemRow, read_diversity, read_rows, replace_seed,  # noqa: E402
                                replace_seed_diversity, row_of)
from records_factory import make_record  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "real-model"


@pytest.fixture(scope="module")
def protocol():
    return load_protocol(RESULT / "protocol.yaml")


def rows_for(method: str, seed: int, k: int, outcomes: list[int], first: list[int] | None = None) -> list[ProblemRow]:
    first = outcomes if first is None else first
    return [ProblemRow(method=method, seed=seed, iteration=k, problem_id=f"p{i}", correct=c, first_round_correct=f,
                       parsed=1, first_round_parsed=1, n_agents=3, n_parsed=3, agreement=c, tie=0)
            for i, (c, f) in enumerate(zip(outcomes, first))]


def synthetic(protocol) -> list[ProblemRow]:
    """Two seeds of 16 problems. multiagent-ft it2 vs single-agent-ft-steps it2: seed 0 has 3 / 0
    discordant pairs (A only / B only), seed 1 has 2 / 1."""
    rows = []
    a0, b0 = [1] * 10 + [1, 1, 1] + [0] * 3, [1] * 10 + [0, 0, 0] + [0] * 3
    a1, b1 = [1] * 8 + [1, 1, 0] + [0] * 5, [1] * 8 + [0, 0, 1] + [0] * 5
    for seed, (a, b) in enumerate(((a0, b0), (a1, b1))):
        rows += rows_for("debate", seed, 0, [0] * 8 + [1] * 8, first=[1] * 16)
        for m in protocol.methods:
            for k in (1, 2):
                rows += rows_for(m, seed, k, a if m == "multiagent-ft" else b)
    return rows


def test_committed_readme_is_what_records_csv_gives(protocol):
    rows = read_rows(RESULT / "records.csv")
    diversity = read_diversity(RESULT / "diversity.csv")
    readme = (RESULT / "README.md").read_text(encoding="utf-8")
    assert disagreements(readme, rows, protocol, diversity) == []
    # Every seed with per-problem records has its diversity measures, and no other seed does.
    assert {d.seed for d in diversity} == {r.seed for r in rows}
    if not rows:
        assert NOT_RUN in readme


def test_tooling_round_trip_on_synthetic_records(protocol, tmp_path):
    csv = tmp_path / "records.csv"
    rows = synthetic(protocol)
    for seed in (0, 1):
        replace_seed(csv, seed, [r for r in rows if r.seed == seed])
    replace_seed(csv, 1, [r for r in rows if r.seed == 1])  # a re-run seed replaces its rows
    back = read_rows(csv)
    assert len(back) == len(rows)
    readme = render(back, protocol)
    assert disagreements(readme, back, protocol) == []
    assert "not yet run: [2]" in readme
    # A number changed by hand, or a changed record, is caught.
    tampered = readme.replace("| +12.5 |", "| +13.5 |", 1)
    assert tampered != readme and disagreements(tampered, back, protocol)
    flipped = [r.model_copy(update={"correct": 1 - r.correct}) if i == 0 else r for i, r in enumerate(back)]
    assert disagreements(readme, flipped, protocol)


def test_pooled_comparison_by_hand(protocol):
    header, body = tables(synthetic(protocol), protocol)["Pre-registered comparisons (paired by seed and problem)"]
    primary = dict(zip(header, body[0]))
    # 32 pairs, 5 favour A and 1 favours B: d = 4/32; p = 2 * P(X <= 1 | n=6) = 2 * 7/64 = 0.21875.
    assert primary["pairs"] == "32"
    assert primary["difference (pp)"] == "+12.5"
    assert primary["discordant a only / b only, per seed"] == "s0: 3/0; s1: 2/1"
    assert primary["p (exact, seed-stratified)"] == "0.2188"
    assert primary["acc a %"] == "71.9" and primary["acc b %"] == "59.4"  # (13 + 10) / 32, (10 + 9) / 32
    # First-round comparison of multiagent it2 vs debate: debate's first round is all right.
    first = dict(zip(header, body[-1]))
    assert first["vote"] == "first_round" and first["acc b %"] == "100.0"


def test_diversity_is_averaged_over_seeds_with_its_standard_error_by_hand(protocol, tmp_path):
    """Two seeds' held-out-critic NLL 0.2 and 0.4 at multiagent-ft iteration 1: mean 0.3, SE
    sd/sqrt(2) = 0.1414/1.414 = 0.1; one seed alone prints its value; a measure the run could not
    take stays empty in the CSV and prints as a dash."""
    path = tmp_path / "diversity.csv"
    for seed, nll in ((0, 0.2), (1, 0.4)):
        replace_seed_diversity(path, seed, [
            DiversityRow(method="debate", seed=seed, iteration=0, n=48, heldout_critic_nll=0.7),
            DiversityRow(method="multiagent-ft", seed=seed, iteration=1, n=48, heldout_critic_nll=nll)])
    diversity = read_diversity(path)
    assert len(diversity) == 4 and diversity[0].kl_between_generators is None
    rows = synthetic(protocol)
    header, body = tables(rows, protocol, diversity)[DIVERSITY_TITLE]
    got = {(r[0], r[1]): dict(zip(header, r)) for r in body}
    assert got[("multiagent-ft", "1")]["held-out-critic NLL"] == "0.3000 ± 0.1000"
    assert got[("debate", "0")]["held-out-critic NLL"] == "0.7000 ± 0.0000"
    assert got[("debate", "0")]["KL gen ↔ gen"] == "—" and got[("debate", "0")]["seeds"] == "2"
    readme = render(rows, protocol, diversity)
    assert disagreements(readme, rows, protocol, diversity) == []
    assert disagreements(readme, rows, protocol, diversity[:3]) != []  # a changed measure is caught


def test_stratified_exact_test_by_hand():
    assert stratified_exact([(3, 0)]) == pytest.approx(0.25)  # 2 * (1/2)^3
    assert stratified_exact([(3, 0), (2, 1)]) == pytest.approx(14 / 64)  # 5 of 6 discordant favour A
    assert stratified_exact([(0, 0), (0, 0)]) == 1.0
    assert stratified_exact([(1, 1), (0, 2)]) == pytest.approx(2 * 5 / 16)  # 1 of 4 favours A: 2 * (1 + 4) / 16


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # The previous single-seed result's six p-values: only 0.002 survives (0.013 x 5 = 0.065).
    assert holm([0.375, 0.454, 0.118, 0.25, 0.002, 0.013]) == pytest.approx([0.75, 0.75, 0.472, 0.75, 0.012, 0.065])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_dev_split_never_holds_a_test_problem(protocol):
    from real_model_protocol import dev_problems

    tuned = {k: t.candidates[0] for k, t in protocol.tuned.items()}
    tests = {p.id for s in protocol.seeds for p in load_split(protocol.config(s, tuned=tuned).task, "test")}
    for s in protocol.seeds:
        dev = {p.id for p in dev_problems(protocol, s)}
        train = {p.id for p in load_split(protocol.config(s, tuned=tuned).task, "train")}
        assert len(dev) == protocol.sizes.n_dev
        assert not dev & tests and not dev & train


def test_a_seed_is_refused_before_tuning(protocol):
    from real_model_run import check_tuned

    if all(t.chosen is not None for t in protocol.tuned.values()):
        pytest.skip("the committed protocol has been tuned")
    with pytest.raises(ConfigError, match="--tune"):
        check_tuned(protocol, RESULT / "protocol.yaml")


def test_records_read_the_debate_record():
    # Agents 0, 1 right in round 0; in round 1 one agent's answer does not parse and the vote is wrong.
    rec = make_record("p1", "7", [["7", "5"], ["7", None], ["3", "5"]])
    row = row_of(rec, "multiagent-ft", 2)
    assert (row.correct, row.first_round_correct, row.parsed, row.n_parsed, row.agreement) == (0, 1, 1, 2, 0)


def test_pooled_job_steps_match_the_mean_agent_job():
    ft = FinetuneConfig(min_examples=5, hyperparameters={"n_epochs": 2, "batch_size": 4})
    files = [FileStats(path=f"{r}{a}", role=r, agent=a, examples=n, sha256="x")
             for (r, a), n in {("generator", 0): 12, ("generator", 1): 13, ("critic", 0): 4, ("critic", 1): 29}.items()]
    stats = FtDataStats(n_records=1, n_records_with_vote=1, n_agents=2, seed=0, critic_weight=0.5,
                        critic_first_turn_loss=False, files=files)
    # 2 * ceil(12/4) = 6, 2 * ceil(13/4) = 8, 2 * ceil(29/4) = 16 (the 4-example critic does not train)
    assert mean_agent_job_steps(stats, ("generator", "critic"), ft) == 10
    assert mean_agent_job_steps(stats, ("generator",), ft) == 7


@pytest.mark.slow
def test_tiny_simulated_protocol_end_to_end(tmp_path):
    """--tune, then a seed, with the simulator: records.csv and the README come out and agree."""
    text = (RESULT / "protocol.yaml").read_text(encoding="utf-8")
    import yaml

    p = yaml.safe_load(text)
    p.update(name="tiny", preset="demo", seeds=[0, 1], sizes={"n_train": 8, "n_dev": 4, "n_test": 48},
             settings={"debate.rounds": 2, "endpoint.simulator.job_seconds": 0.05, "finetune.poll_interval_s": 0.05})
    p["tuned"]["sampling.temperature"]["candidates"] = [0.5, 1.0]
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(p, allow_unicode=True), encoding="utf-8")
    script = [sys.executable, str(REPO / "benchmarks" / "real_model.py"), "--protocol", str(path),
              "--runs-dir", str(tmp_path / "runs")]
    refused = subprocess.run([*script, "--seed-index", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--tune" in refused.stdout
    tuned = subprocess.run([*script, "--tune"], capture_output=True, text=True)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert (tmp_path / "dev-results.json").is_file()
    # Tuning debated dev problems only: none of them is a test problem of either seed.
    tuned_ids = {json.loads(line)["problem"]["id"] for f in (tmp_path / "runs").rglob("debate-test.jsonl")
                 for line in f.read_text().splitlines()}
    proto = load_protocol(path)
    test_ids = {q.id for s in proto.seeds
                for q in load_split(proto.config(s, tuned={"sampling.temperature": 1.0}).task, "test")}
    assert len(tuned_ids) == 2 * 4 and not tuned_ids & test_ids
    chosen = json.loads((tmp_path / "dev-results.json").read_text())["chosen_by_rule"]["sampling.temperature"]
    p["tuned"]["sampling.temperature"].update(chosen=chosen, dev_results="dev-results.json", dev_accuracy={"0.5": 0.1})
    path.write_text(yaml.safe_dump(p, allow_unicode=True), encoding="utf-8")
    wrong = subprocess.run([*script, "--seed-index", "1"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "dev_accuracy" in wrong.stdout  # numbers that are not the dev results'
    p["tuned"]["sampling.temperature"]["dev_accuracy"] = json.loads(
        tuned.stdout.split("dev_accuracy: ")[1].splitlines()[0])
    path.write_text(yaml.safe_dump(p, allow_unicode=True), encoding="utf-8")
    for k in ("1",):  # one seed of two: the synthetic round trip covers seeds added one at a time
        done = subprocess.run([*script, "--seed-index", k], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    rows = read_rows(tmp_path / "records.csv")
    assert {r.seed for r in rows} == {1} and len(rows) == 48 * (1 + 3 * 2)
    diversity = read_diversity(tmp_path / "diversity.csv")
    assert sorted((d.method, d.iteration) for d in diversity) == sorted(
        [("debate", 0)] + [(m, k) for m in proto.methods for k in (1, 2)])
    assert disagreements((tmp_path / "README.md").read_text(), rows, load_protocol(path), diversity) == []


@pytest.mark.slow
async def test_max_steps_caps_a_local_training_job(tmp_path):
    """The pooled job's step cap reaches the trainer: 20 examples, batch 2, 2 epochs would be 20 steps."""
    pytest.importorskip("trl", reason="the `local` extra is not installed")
    from harness.config import Hyperparameters, LocalFinetuneConfig
    from harness.providers.base import FinetuneRequest, JobStatus
    from harness.providers.local import LocalProvider
    from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl

    model = build_tiny_model(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "pooled.jsonl", n=20, first_turn_weight=0)
    p = LocalProvider(tmp_path / "run", LocalFinetuneConfig(threads=1), base_model_path=str(model), max_lora_rank=8,
                      base_names={"base"})
    try:
        state = await p.submit(FinetuneRequest(training_file=data, base_model="base", max_steps=3,
                                               metadata={"run": "t", "iteration": "1", "role": "generator", "agent": "0"},
                                               hyperparameters=Hyperparameters(n_epochs=2, batch_size=2)))
        done = await p.wait(state.job_id, poll_interval_s=0.2, max_interval_s=1.0)
    finally:
        await p.close()
    assert done.status == JobStatus.SUCCEEDED, done.error
    status = json.loads((Path(done.artifact_path).parent / "status.json").read_text())
    assert (status["step"], status["total_steps"]) == (3, 3)


@pytest.mark.slow
async def test_single_model_steps_reach_the_pooled_job(tmp_path):
    """finetune.local.single_model_steps=mean_agent_job: the one pooled job runs as many steps as
    the mean per-agent job of the same debates would have, and its registry entry says so."""
    pytest.importorskip("trl", reason="the `local` extra is not installed")
    from rich.console import Console

    from harness.config import load_config
    from harness.finetune import FinetuneStage
    from harness.ftdata import build_ftdata
    from harness.providers.local import LocalProvider
    from harness.registry import Registry
    from harness.testing.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    cfg = load_config(None, ["finetune.provider=local", "finetune.iterations=1", "finetune.single_model=true",
                             "finetune.local.single_model_steps=mean_agent_job", "finetune.min_examples=1",
                             "finetune.hyperparameters.n_epochs=1", "finetune.hyperparameters.batch_size=2",
                             "finetune.local.threads=1", f"serve.model={model}"])
    # Six debates where all three agents agree on the right answer in both rounds.
    records = [make_record(f"p{i}", str(i), [[str(i), str(i)]] * 3, split="train") for i in range(6)]
    run_dir = tmp_path / "run"
    stats = build_ftdata(records, n_agents=3, cfg=cfg.finetune, out_dir=run_dir / "ftdata", seed=0)
    per_agent = [f.examples for f in stats.files]
    expected = round(sum(-(-n // 2) for n in per_agent) / len(per_agent))
    provider = LocalProvider(run_dir, cfg.finetune.local, base_model_path=str(model), max_lora_rank=8,
                             base_names={"base", cfg.models.base})
    registry = Registry(run="t", base_model=cfg.models.base)
    try:
        entries = await FinetuneStage(cfg, provider, registry, run_dir / "registry.json", run_dir,
                                      Console(quiet=True)).run(stats, run_dir / "ftdata", target=1)
    finally:
        await provider.close()
    trained = entries[0]
    assert trained.status == "succeeded", trained.error
    assert trained.n_examples == sum(per_agent) > expected
    assert f"capped at {expected} optimizer steps" in trained.note
    status = json.loads((next((run_dir / "local-jobs").iterdir()) / "status.json").read_text())
    assert status["total_steps"] == expected
