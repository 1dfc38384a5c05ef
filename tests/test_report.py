"""The loader and `python -m harness.report` on a small run made on the simulator."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from harness.analysis import load_run, load_runs
from harness.diversity import DiversityMetrics
from harness.fileio import write_model
from harness.records import IterationMetrics
from harness.report import PLOTS, plot_accuracy, plot_diversity, plot_per_agent, plot_usage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    """One small simulated run with a finetuning iteration, shared by this module's tests."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("report")
    proc = run_cli("harness.loop", "--run-dir", "run", "--set", "task.n_test=20", "--set", "task.n_train=30",
                   "--set", "finetune.iterations=1", "--set", "name=tiny-maft", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "run"


def assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 10, f"{path} is (nearly) a single flat colour"


def test_loader_matches_the_run_files(sim_run):
    run = load_run(sim_run)
    assert run.method == "tiny-maft" and run.simulated and run.finished
    metrics = [IterationMetrics.model_validate_json((sim_run / f"iter-{k}" / "metrics.json").read_text())
               for k in (0, 1)]
    frames = load_runs([sim_run])
    test = frames.metrics[frames.metrics["split"] == "test"].sort_values("iteration")
    assert list(test["accuracy"]) == [m.splits["test"].accuracy for m in metrics]
    assert list(test["n"]) == [20, 20]
    row = frames.runs.iloc[0]
    assert row["accuracy"] == metrics[-1].splits["test"].accuracy and row["iterations"] == 1
    summary = json.loads((sim_run / "summary.json").read_text())
    # Inference calls per iteration add up to the run's total; finetuning tokens land on iteration 0.
    assert frames.usage["calls"].sum() == summary["usage"]["calls"]
    usage = frames.usage.set_index("iteration")
    assert usage.loc[0, "trained_tokens"] > 0 and usage.loc[1, "trained_tokens"] == 0
    assert usage["cost_usd"].notna().all()  # simulated prices are all known
    per_agent = frames.per_agent[(frames.per_agent["iteration"] == 0) & frames.per_agent["final_round"]
                                 & (frames.per_agent["split"] == "test")]
    assert list(per_agent["accuracy"]) == metrics[0].splits["test"].per_agent


def test_report_writes_markdown_and_real_plots(sim_run, cli, tmp_path):
    # A run made before the loop wrote diversity.json: the report computes it on demand.
    old_run = tmp_path / "old-run"
    shutil.copytree(sim_run, old_run)
    for f in old_run.glob("iter-*/diversity.json"):
        f.unlink()
    sim_run = old_run
    proc = cli("--out", str(tmp_path / "rep"), str(sim_run), module="harness.report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "rep"
    for name in PLOTS:
        assert_real_png(out / name)
    md = (out / "report.md").read_text()
    assert "SIMULATED" in md and "tiny-maft" in md
    for name in PLOTS:
        assert f"({name})" in md
    # Diversity was computed on demand (the run has no diversity.json): embeddings on the simulator.
    div = (out / "diversity.csv").read_text().splitlines()
    assert len(div) == 1 + 2 and "sim-embed" in div[1]
    # The report does not write into the run it reports on.
    assert not list(sim_run.glob("iter-*/diversity.json"))


def test_report_prefers_the_loops_diversity_json(sim_run, tmp_path):
    import shutil

    from harness.report import build_report

    run = tmp_path / "copy"
    shutil.copytree(sim_run, run)
    for k in (0, 1):
        write_model(run / f"iter-{k}" / "diversity.json",
                    DiversityMetrics(iteration=k, split="test", n=20, agreement=0.5, pairwise_agreement=0.6,
                                     embedding_dissimilarity=0.25, heldout_critic_nll=0.125 * (k + 1)))
    build_report([run], tmp_path / "rep", compute_missing=True)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "0.125" in md and "0.250" in md
    assert "computed by harness.report" not in md


def test_plots_of_empty_frames_say_so_instead_of_failing(sim_run):
    frames = load_runs([sim_run])
    empty = [plot_accuracy(frames.metrics.iloc[0:0]), plot_diversity(frames.diversity),
             plot_per_agent(frames.per_agent.iloc[0:0]), plot_usage(frames.usage.iloc[0:0])]
    assert all(fig.axes for fig in empty)
