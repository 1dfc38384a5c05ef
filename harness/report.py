"""`python -m harness.report RUN_DIR [RUN_DIR ...] [--out DIR]`: a markdown report and PNG plots.

Writes report.md with the Table-1-style comparison (accuracy ± standard error, n, cost per
method), per-iteration metrics and diversity, and the plots: accuracy vs iteration with error
bars per method, diversity vs iteration, per-agent accuracy, tokens and cost per iteration.
RUN_DIR may also be a directory holding runs (a comparison's --out) or a glob.

Diversity comes from iter-<k>/diversity.json where the loop wrote it; otherwise it is computed
here: agreement from the debate records (no calls), embedding dissimilarity on a simulator run
through a private simulator (or through --embed-base-url for real runs), never likelihood
(the agents' models must still be served; the loop measures it while they are).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd
# Figure objects, not pyplot: no global figure state and no backend choice, so the same functions
# draw in a headless CI job (saved as PNG) and inline in a notebook (display(fig)).
from matplotlib.figure import Figure

from harness.analysis import Frames, RunData, diversity_frame, load_runs
from harness.diversity import DiversityMetrics, compute_diversity
from harness.errors import HarnessError
from harness.fileio import write_atomic

SIM_LABEL = " (SIMULATED: a test double, not real accuracy)"


def _title(text: str, frame: pd.DataFrame) -> str:
    return text + (SIM_LABEL if "simulated" in frame and frame["simulated"].any() else "")


def _subplots(*args, figsize: tuple[float, float], **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------- plots

def method_colors(methods) -> dict[str, str]:
    """One colour per method, by order of first appearance, shared by every plot of a report so
    a method keeps its colour when a panel lacks some methods."""
    return {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(methods))}


def _level(ax, y: float, color: str, label: str, band: float | None = None) -> None:
    """A one-iteration method in a plot spanning several iterations: a dashed level (with its
    ±1 s.e. band when given), the way the paper draws baselines, so it is not hidden at x=0."""
    ax.axhline(y, color=color, linestyle="--", label=label)
    if band:
        ax.axhspan(y - band, y + band, color=color, alpha=0.08)


def _iteration_axis(ax, last: int) -> None:
    """Integer iteration ticks, with room either side so a one-iteration run is not squeezed."""
    ax.set_xticks(range(last + 1))
    ax.set_xlim(-0.4, last + 0.4)
    ax.set_xlabel("iteration")


def _last_iteration(frame: pd.DataFrame) -> int:
    return int(frame["iteration"].max()) if not frame.empty and frame["iteration"].max() >= 0 else 0


def plot_accuracy(metrics: pd.DataFrame, split: str = "test", colors: dict[str, str] | None = None):
    """Majority-vote accuracy per method vs iteration, error bars ±1 standard error. A method
    without finetuning (iteration 0 only) is a dashed level with its ±1 s.e. band."""
    fig, ax = _subplots(figsize=(7.5, 4.5))
    data = metrics[metrics["split"] == split]
    colors = colors or method_colors(data["method"])
    last = _last_iteration(data)
    if data.empty:
        _empty(ax, f"no {split} metrics yet")
    groups = list(data.groupby(["method", "run"], sort=False))
    one_label_per_method = data["run"].nunique() == data["method"].nunique()
    for i, ((method, run), g) in enumerate(groups):
        g = g.sort_values("iteration")
        label = method if one_label_per_method else f"{method} ({Path(run).name})"
        acc, se = 100 * g["accuracy"].to_numpy(), 100 * g["stderr"].to_numpy()
        color = colors.get(method, "C0")
        if len(g) == 1 and last > 0:
            _level(ax, acc[0], color, f"{label} ({acc[0]:.1f} ± {se[0]:.1f})", band=se[0])
            continue
        # A small horizontal offset per method keeps overlapping error bars readable.
        offset = (i - (len(groups) - 1) / 2) * 0.03
        ax.errorbar(g["iteration"] + offset, acc, yerr=se, marker="o", capsize=4, color=color, label=label)
    ax.set_ylabel(f"{split} accuracy (%) ± s.e.")
    _iteration_axis(ax, last)
    ax.grid(alpha=0.3)
    if not data.empty:
        ax.legend(fontsize=7)
    ax.set_title(_title(f"Accuracy vs iteration ({split})", metrics), fontsize=9)
    fig.tight_layout()
    return fig


DIVERSITY_PANELS = [
    ("pairwise_agreement", "pairwise agreement"),
    ("agreement", "consensus (all agents agree)"),
    ("embedding_dissimilarity", "embedding dissimilarity"),
    ("likelihood_diversity", "likelihood diversity (nats/token)"),
]


def plot_diversity(diversity: pd.DataFrame, split: str = "test", colors: dict[str, str] | None = None):
    """One panel per diversity measure vs iteration, a line per method; a measure no run has
    says so in its panel instead of drawing zeros."""
    fig, axes = _subplots(2, 2, figsize=(10, 7))
    data = diversity[diversity["split"] == split] if not diversity.empty else diversity
    colors = colors or method_colors(data["method"])
    last = _last_iteration(data)
    for ax, (col, label) in zip(axes.flat, DIVERSITY_PANELS):
        sub = data.dropna(subset=[col]) if not data.empty else data
        if sub.empty:
            _empty(ax, f"{label}:\nnot available for these runs")
            ax.set_title(label, fontsize=9)
            continue
        for method, g in sub.groupby("method", sort=False):
            g = g.sort_values("iteration")
            if len(g) == 1 and last > 0:
                _level(ax, float(g[col].iloc[0]), colors.get(method, "C0"), method)
            else:
                ax.plot(g["iteration"], g[col], marker="o", color=colors.get(method, "C0"), label=method)
        ax.set_title(label, fontsize=9)
        _iteration_axis(ax, last)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(f"Diversity vs iteration ({split})", diversity), fontsize=10)
    fig.tight_layout()
    return fig


def plot_per_agent(per_agent: pd.DataFrame, split: str = "test"):
    """Each agent's final-round accuracy vs iteration, one panel per method."""
    data = per_agent[(per_agent["split"] == split) & per_agent["final_round"]] if not per_agent.empty else per_agent
    methods = list(dict.fromkeys(data["method"])) if not data.empty else []
    fig, axes = _subplots(1, max(1, len(methods)), figsize=(max(5, 3.2 * len(methods)), 3.8), squeeze=False,
                             sharey=True)
    if not methods:
        _empty(axes[0, 0], "no per-agent metrics yet")
    for ax, method in zip(axes[0], methods):
        g = data[data["method"] == method]
        for agent, ga in g.groupby("agent"):
            ga = ga.sort_values("iteration")
            ax.plot(ga["iteration"], 100 * ga["accuracy"], marker="o", label=f"agent {agent}")
        ax.set_title(method, fontsize=9)
        _iteration_axis(ax, _last_iteration(data))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("final-round accuracy (%)")
    fig.suptitle(_title(f"Per-agent accuracy ({split})", per_agent), fontsize=10)
    fig.tight_layout()
    return fig


def plot_usage(usage: pd.DataFrame, colors: dict[str, str] | None = None):
    """Tokens (inference) and cost (inference + finetuning, known part) per iteration per method."""
    fig, (ax_t, ax_c) = _subplots(1, 2, figsize=(11, 4))
    data = usage[usage["iteration"] >= 0] if not usage.empty else usage
    if data.empty:
        _empty(ax_t, "no usage recorded")
        _empty(ax_c, "no usage recorded")
    methods = list(dict.fromkeys(data["method"])) if not data.empty else []
    colors = colors or method_colors(methods)
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        g = data[data["method"] == method].groupby("iteration")[["tokens", "cost_known_usd", "unknown_cost_calls",
                                                                 "unknown_training_jobs"]].sum()
        x = g.index.to_numpy() + (i - (len(methods) - 1) / 2) * width
        ax_t.bar(x, g["tokens"], width=width, label=method, color=colors.get(method, "C0"))
        bars = ax_c.bar(x, g["cost_known_usd"], width=width, label=method, color=colors.get(method, "C0"))
        for bar, unknown in zip(bars, g["unknown_cost_calls"] + g["unknown_training_jobs"]):
            if unknown:  # a known-part cost is a lower bound: mark it on the bar
                ax_c.annotate(f"≥ (+{int(unknown)} unpriced)", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=6)
    for ax, label in ((ax_t, "tokens (prompt + completion)"), (ax_c, "cost (USD, inference + finetuning)")):
        ax.set_ylabel(label)
        _iteration_axis(ax, _last_iteration(data))
        ax.grid(alpha=0.3, axis="y")
        if methods:
            ax.legend(fontsize=7)
    simulated = not usage.empty and bool(usage["simulated"].any())
    fig.suptitle("Tokens and cost per iteration" + (" (SIMULATED runs: simulated prices)" if simulated else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


PLOTS = {"accuracy.png": lambda f, c: plot_accuracy(f.metrics, colors=c),
         "diversity.png": lambda f, c: plot_diversity(f.diversity, colors=c),
         "per_agent.png": lambda f, c: plot_per_agent(f.per_agent),
         "usage.png": lambda f, c: plot_usage(f.usage, colors=c)}


def save_plots(frames: Frames, out: Path) -> list[Path]:
    colors = method_colors(frames.runs["method"])
    paths = []
    for name, draw in PLOTS.items():
        fig = draw(frames, colors)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        write_atomic(out / name, png.getvalue())
        paths.append(out / name)
    return paths


# ----------------------------------------------------------------------------- diversity on demand

async def diversity_on_demand(runs: Sequence[RunData], cache_dir: Path, *, embed_base_url: str | None = None,
                              embed_model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                              ) -> tuple[list[RunData], list[DiversityMetrics]]:
    """Diversity for each run iteration that has test debate records but no diversity.json.
    Embedding calls go through an LLMClient whose cache and usage log live in `cache_dir`, never
    in the run directory: a report must not change the run it reports on."""
    from harness.config import EndpointConfig, SamplingConfig
    from harness.llm import LLMClient
    from harness.sim import SimServer

    todo = [(run, k) for run in runs for k, _ in run.iter_dirs()
            if not any(d.iteration == k and d.split == "test" for d in run.diversity)
            and (run.dir / f"iter-{k}" / "debate-test.jsonl").is_file()]
    out_runs, out = [], []
    sim = None
    try:
        for run, k in todo:
            records = run.debate_records(k, "test")
            if not records:
                continue
            base_url, model, key, kind = embed_base_url, embed_model, os.environ.get(api_key_env, "EMPTY"), "openai"
            note = None
            if base_url is None and run.simulated:
                if sim is None:
                    sim = SimServer().start()
                base_url, model, key, kind = sim.base_url, "sim-embed", "simulated-key", "simulator"
            elif base_url is None:
                note = ("embedding dissimilarity: computed by the report without an embeddings endpoint; "
                        "pass --embed-base-url/--embed-model (or let the loop write diversity.json)")
            client = None
            if base_url is not None and model:
                client = LLMClient(base_url=base_url, api_key=key, run_dir=cache_dir / run.dir.name,
                                   endpoint=EndpointConfig(kind=kind, api_key_env=None), sampling=SamplingConfig())
            try:
                d = await compute_diversity(records, iteration=k, split="test", client=client,
                                            embedding_model=model if client else None, logprob_base_url=None)
            finally:
                if client is not None:
                    await client.aclose()
            d.notes = [n for n in d.notes if not (note and n.startswith("embedding dissimilarity"))]
            d.notes += [note] if note else []
            d.notes.append("computed by harness.report after the run (likelihood needs the run's served models)")
            out_runs.append(run)
            out.append(d)
    finally:
        if sim is not None:
            sim.stop()
    return out_runs, out


# ----------------------------------------------------------------------------- markdown

def fmt_cost(known: float, unknown_items: int, simulated: bool) -> str:
    sim = " (simulated)" if simulated else ""
    if unknown_items and not known:
        return "unknown"
    if unknown_items:
        return f"≥ ${known:.4f} + {unknown_items} unpriced{sim}"
    return f"${known:.4f}{sim}"


def _fmt(x, pct: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}f}"


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 shape, formatted: one row per run."""
    return pd.DataFrame({
        "method": runs["method"],
        "accuracy ± s.e. (%)": [f"{100 * a:.1f} ± {100 * s:.1f}" if not math.isnan(a) else "n/a"
                                for a, s in zip(runs["accuracy"], runs["stderr"])],
        "n": runs["n"], "iterations": runs["iterations"], "agents × rounds": [
            f"{a} × {r}" for a, r in zip(runs["agents"], runs["rounds"])],
        "calls": runs["calls"], "tokens": runs["tokens"],
        "cost": [fmt_cost(k, u, s) for k, u, s in zip(runs["cost_known_usd"], runs["unknown_cost_items"],
                                                     runs["simulated"])],
        "finished": ["yes" if f else "no" for f in runs["finished"]]})


DEFINITIONS = """\
- **accuracy**: majority vote of the final round vs gold; n counts every test problem (an
  unparseable vote is wrong); s.e. = sqrt(p(1-p)/n). Table rows use each run's last iteration.
- **consensus**: share of problems where every agent's final answer is equivalent.
- **pairwise agreement**: mean over problems of the share of agent pairs with equivalent final answers.
- **embedding dissimilarity**: per problem, 1 − mean pairwise cosine similarity of the embeddings
  of the agents' final responses; mean over problems (0 = identical responses).
- **likelihood diversity**: mean over problems and ordered agent pairs (i, j) of l_i(r_i) − l_i(r_j),
  where l_i(r) is the mean per-token log-likelihood of round-0 response r under agent i's generator
  (vLLM prompt logprobs); n/a where the endpoint gives no logprobs.
- **cost**: inference (usage.jsonl) + finetuning (registry trained tokens × training price);
  "≥" marks a lower bound when some calls or jobs are of unknown price.
"""


def write_report(frames: Frames, out: Path) -> Path:
    simulated = bool(frames.runs["simulated"].any())
    m = frames.metrics[frames.metrics["split"] == "test"]
    per_iter = pd.DataFrame({"method": m["method"], "iteration": m["iteration"], "n": m["n"],
                             "accuracy ± s.e. (%)": [f"{100 * a:.1f} ± {100 * s:.1f}" for a, s in
                                                     zip(m["accuracy"], m["stderr"])],
                             "round-0 vote (%)": [_fmt(x, pct=True) for x in m["first_round_accuracy"]],
                             "consensus (%)": [_fmt(x, pct=True) for x in m["agreement"]],
                             "unparsed (%)": [_fmt(x, pct=True) for x in m["unparsed_rate"]]})
    d = frames.diversity[frames.diversity["split"] == "test"] if not frames.diversity.empty else frames.diversity
    div = pd.DataFrame({"method": d["method"], "iteration": d["iteration"],
                        "pairwise agreement": [_fmt(x) for x in d["pairwise_agreement"]],
                        "embedding dissimilarity": [_fmt(x) for x in d["embedding_dissimilarity"]],
                        "likelihood diversity": [_fmt(x) for x in d["likelihood_diversity"]],
                        "notes": d["notes"].str.replace("|", "/")})
    parts = ["# Multiagent finetuning report", ""]
    if simulated:
        parts += ["> **SIMULATED**: some runs used the built-in simulator, a test double. Their accuracies, "
                  "diversities and prices describe the simulator's rules, not any real model.", ""]
    parts += ["## Comparison (last iteration, test split)", "", md_table(table1(frames.runs)), "",
              "![accuracy](accuracy.png)", "", "## Per iteration", "", md_table(per_iter), "",
              "![per-agent accuracy](per_agent.png)", "", "## Diversity", "",
              md_table(div) if not div.empty else "No diversity measures for these runs.", "",
              "![diversity](diversity.png)", "", "## Tokens and cost", "", "![usage](usage.png)", "",
              "## Definitions", "", DEFINITIONS, "## Runs", ""]
    parts += [f"- `{r.dir}`: method `{r.method}`{' (simulated)' if r.simulated else ''}"
              f"{'' if r.finished else ' — not finished'}" for r in frames.data]
    path = out / "report.md"
    write_atomic(path, "\n".join(parts) + "\n")
    return path


def build_report(run_dirs: Sequence[str | Path], out: Path, *, compute_missing: bool = True,
                 embed_base_url: str | None = None, embed_model: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    frames = load_runs(run_dirs)
    if compute_missing:
        with tempfile.TemporaryDirectory(prefix="report-embed-") as tmp:
            extra_runs, extra = asyncio.run(diversity_on_demand(frames.data, Path(tmp), embed_base_url=embed_base_url,
                                                                embed_model=embed_model))
        if extra:
            frames.diversity = diversity_frame(frames.data, extra, extra_runs)
    write_atomic(out / "diversity.csv", frames.diversity.to_csv(index=False))
    save_plots(frames, out)
    return write_report(frames, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory (default: ./report)")
    p.add_argument("--no-compute", action="store_true",
                   help="use diversity.json files only; compute nothing for runs that lack them")
    p.add_argument("--embed-base-url", help="OpenAI-compatible endpoint for embeddings of non-simulated runs "
                                            "(key from OPENAI_API_KEY)")
    p.add_argument("--embed-model", default="text-embedding-3-small")
    args = p.parse_args(argv)
    try:
        path = build_report(args.run_dirs, args.out, compute_missing=not args.no_compute,
                            embed_base_url=args.embed_base_url,
                            embed_model=args.embed_model if args.embed_base_url else None)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {path} (plots: {', '.join(PLOTS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
