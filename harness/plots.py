"""The report's plots, as matplotlib Figure objects (harness.report saves them; a notebook
displays them): accuracy vs iteration with ±1 s.e. per method, every diversity measure vs
iteration (one line per method, so multiagent FT and single-agent FT runs compare as in the
paper's Figs. 6-9), per-agent accuracy, tokens and cost per iteration."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
# Figure objects, not pyplot: no global figure state and no backend choice, so the same functions
# draw in a headless CI job (saved as PNG) and inline in a notebook (display(fig)).
from matplotlib.figure import Figure

from harness.analysis import Frames
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


# (column of harness.analysis.diversity_frame, panel title); definitions in harness.diversity.
DIVERSITY_PANELS = [
    ("consensus", "consensus (authors': answers = majority)"),
    ("agreement", "all agents agree"),
    ("pairwise_agreement", "pairwise agreement"),
    ("embedding_dissimilarity", "embedding dissimilarity"),
    ("heldout_critic_nll", "held-out-critic NLL (nats/token)"),
    ("kl_between_generators", "KL between generators (nats/token)"),
    ("kl_between_critics", "KL between critics (nats/token)"),
    ("kl_generators_vs_base", "KL generators vs base (nats/token)"),
    ("kl_critics_vs_base", "KL critics vs base (nats/token)"),
]


def plot_diversity(diversity: pd.DataFrame, split: str = "test", colors: dict[str, str] | None = None):
    """One panel per diversity measure vs iteration, a line per method: given a multiagent-FT run
    and a single-agent-FT run, the paper's comparison (its Figs. 6-9). A measure no run has says
    so in its panel instead of drawing zeros."""
    fig, axes = _subplots(3, 3, figsize=(13, 10))
    data = diversity[diversity["split"] == split] if not diversity.empty else diversity
    colors = colors or method_colors(data["method"])
    last = _last_iteration(data)
    for ax, (col, label) in zip(axes.flat, DIVERSITY_PANELS):
        sub = data.dropna(subset=[col]) if not data.empty and col in data else data.iloc[0:0]
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
