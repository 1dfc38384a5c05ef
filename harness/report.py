"""`python -m harness.report RUN_DIR [RUN_DIR ...] [--out DIR]`: a markdown report and PNG plots.

Writes report.md with the Table-1-style comparison (accuracy ± standard error, n, cost per
method), per-iteration metrics and diversity, and the plots: accuracy vs iteration with error
bars per method, diversity vs iteration, per-agent accuracy, tokens and cost per iteration.
RUN_DIR may also be a directory holding runs (a comparison's --out) or a glob.

Diversity comes from iter-<k>/diversity.json where the loop wrote it; otherwise it is computed
here: agreement and consensus from the debate records (no calls), embedding dissimilarity with
each run's embedding model (a private simulator serves sim-embed for simulated runs; the local
model needs nothing; an endpoint's model needs --embed-base-url), never the log-probability
measures (the agents' models must still be served; the loop measures them while they are).
Plots are drawn by harness.plots.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

from harness.analysis import Frames, RunData, diversity_frame, load_runs
from harness.diversity import DEFAULT_LOCAL, DiversityMetrics, compute_diversity
from harness.diversity.embeddings import LOCAL_PREFIX
from harness.errors import HarnessError
from harness.fileio import write_atomic
from harness.llm.usage import LOCAL
# The plots live in harness.plots; re-exported because notebooks import them from here.
from harness.plots import (DIVERSITY_PANELS, PLOTS, method_colors, plot_accuracy, plot_diversity,
                           plot_per_agent, plot_usage, save_plots)

# ----------------------------------------------------------------------------- diversity on demand

async def diversity_on_demand(runs: Sequence[RunData], cache_dir: Path, *, embed_base_url: str | None = None,
                              embed_model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                              ) -> tuple[list[RunData], list[DiversityMetrics]]:
    """Diversity for each run iteration that has test debate records but no diversity.json.

    The embedding model is `embed_model` if given, else the run's own `analysis.embedding_model`
    ("auto": sim-embed for a simulated run, served by a private simulator; the local
    all-MiniLM-L6-v2 otherwise). An endpoint model of a real run needs `embed_base_url`. Calls go
    through an LLMClient whose cache and usage log live in `cache_dir`, never in the run
    directory: a report must not change the run it reports on."""
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
            model = embed_model or (run.config.get("analysis") or {}).get("embedding_model", "auto")
            if model == "auto":
                model = "sim-embed" if run.simulated else DEFAULT_LOCAL
            client, note = None, None
            if model is not None and not model.startswith(LOCAL_PREFIX):
                if embed_base_url is not None:
                    client = LLMClient(base_url=embed_base_url, api_key=os.environ.get(api_key_env, "EMPTY"),
                                       run_dir=cache_dir / run.dir.name, sampling=SamplingConfig(),
                                       endpoint=EndpointConfig(kind="openai", api_key_env=None))
                elif run.simulated:
                    sim = sim or SimServer().start()
                    client = LLMClient(base_url=sim.base_url, api_key="simulated-key", run_dir=cache_dir / run.dir.name,
                                       endpoint=EndpointConfig(kind="simulator", api_key_env=None),
                                       sampling=SamplingConfig())
                else:
                    note = (f"embedding dissimilarity: {model} is an endpoint's model; pass --embed-base-url, or "
                            f"--embed-model {DEFAULT_LOCAL}")
                    model = None
            try:
                d = await compute_diversity(records, iteration=k, split="test", client=client, embedding_model=model)
            finally:
                if client is not None:
                    await client.aclose()
            d.notes = [n for n in d.notes if not (note and n.startswith("embedding dissimilarity"))]
            d.notes += [note] if note else []
            d.notes.append("computed by harness.report after the run; the log-probability measures are the run's "
                           "own (analysis.likelihood), in its iter-<k>/diversity.json")
            out_runs.append(run)
            out.append(d)
    finally:
        if sim is not None:
            sim.stop()
    return out_runs, out


# ----------------------------------------------------------------------------- markdown

def fmt_cost(known: float, unknown_items: int, simulated: bool, local: bool = False) -> str:
    """`local`: the run's models are served by vLLM, so what has no price costs no API money."""
    sim = " (simulated)" if simulated else ""
    if unknown_items and local:
        return f"${known:.4f} + {LOCAL}" if known else LOCAL
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
        "truncated (%)": [_fmt(x, pct=True) for x in runs["truncated_rate"]],
        "n": runs["n"], "iterations": runs["iterations"], "agents × rounds": [
            f"{a} × {r}" for a, r in zip(runs["agents"], runs["rounds"])],
        "calls": runs["calls"], "tokens": runs["tokens"],
        "cost": [fmt_cost(k, u, s, loc) for k, u, s, loc in zip(runs["cost_known_usd"], runs["unknown_cost_items"],
                                                                runs["simulated"], runs["local"])],
        "finished": ["yes" if f else "no" for f in runs["finished"]]})


DEFINITIONS = """\
- **accuracy**: majority vote of the final round vs gold; n counts every test problem (an
  unparseable vote is wrong); s.e. = sqrt(p(1-p)/n). Table rows use each run's last iteration.
- **truncated**: share of all agent replies cut off by `sampling.max_tokens` (they do not vote).
- **consensus** (the authors' measure): share of all parsed final answers equal to their
  problem's majority answer, pooled over problems.
- **all agree**: share of problems where every agent's final answer is equivalent.
- **pairwise agreement**: mean over problems of the share of agent pairs with equivalent final answers.
- **embedding dissimilarity**: per problem, 1 − mean pairwise cosine similarity of the embeddings
  of the agents' final responses; mean over problems (0 = identical responses). Model in
  `embedding_model` of diversity.csv (the paper used a T5-3B encoder).
- **held-out-critic NLL**: mean over problems and ordered pairs (i, j), i ≠ j, of −log p of critic
  j's final reply (per token, in its own conversation) under critic i (vLLM prompt logprobs).
- **KL between agents** (generators: round 0; critics: final round) and **KL vs base**: Monte-Carlo
  estimates from the replies themselves, per token: for y sampled from agent j, log p_j(y) −
  log p_i(y) (resp. − log p_base(y)); mean over pairs and problems; 0 when the models are the same.
  Log-probability measures are n/a where the endpoint gives no logprobs (the simulator, OpenAI).
- **cost**: inference (usage.jsonl) + finetuning (registry trained tokens × training price);
  "≥" marks a lower bound when some calls or jobs are of unknown price; "local (no API price)"
  marks models served by vLLM (their calls and local LoRA jobs cost compute, not an API bill).
"""

DIVERSITY_COLUMNS = {"consensus": "consensus", "agreement": "all agree", "embedding_dissimilarity": "embedding dissim.",
                     "heldout_critic_nll": "held-out critic NLL", "kl_between_generators": "KL gen↔gen",
                     "kl_between_critics": "KL critic↔critic", "kl_generators_vs_base": "KL gen‖base",
                     "kl_critics_vs_base": "KL critic‖base"}


def write_report(frames: Frames, out: Path) -> Path:
    simulated = bool(frames.runs["simulated"].any())
    m = frames.metrics[frames.metrics["split"] == "test"]
    per_iter = pd.DataFrame({"method": m["method"], "iteration": m["iteration"], "n": m["n"],
                             "accuracy ± s.e. (%)": [f"{100 * a:.1f} ± {100 * s:.1f}" for a, s in
                                                     zip(m["accuracy"], m["stderr"])],
                             "truncated (%)": [_fmt(x, pct=True) for x in m["truncated_rate"]],
                             "round-0 vote (%)": [_fmt(x, pct=True) for x in m["first_round_accuracy"]],
                             "consensus (%)": [_fmt(x, pct=True) for x in m["consensus"]],
                             "all agree (%)": [_fmt(x, pct=True) for x in m["agreement"]],
                             "unparsed (%)": [_fmt(x, pct=True) for x in m["unparsed_rate"]]})
    d = frames.diversity[frames.diversity["split"] == "test"] if not frames.diversity.empty else frames.diversity
    div = pd.DataFrame({"method": d["method"], "iteration": d["iteration"],
                        **{title: [_fmt(x) for x in d[col]] for col, title in DIVERSITY_COLUMNS.items()},
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
    p.add_argument("--embed-base-url", help="OpenAI-compatible endpoint for an --embed-model that is an endpoint's "
                                            "model, for runs not made on the simulator (key from OPENAI_API_KEY)")
    p.add_argument("--embed-model", help="embeddings model for runs without diversity.json (default: each run's "
                                         f"analysis.embedding_model; e.g. {DEFAULT_LOCAL} or text-embedding-3-small)")
    args = p.parse_args(argv)
    try:
        path = build_report(args.run_dirs, args.out, compute_missing=not args.no_compute,
                            embed_base_url=args.embed_base_url, embed_model=args.embed_model)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as e:  # --out or a run's cache cannot be written (full, read-only, a file)
        from harness.ioerrors import explain

        print(f"error: {explain(e, args.out, option='--out')}", file=sys.stderr)
        return 1
    print(f"report: {path} (plots: {', '.join(PLOTS)})")
    return 0


__all__ = ["DIVERSITY_PANELS", "PLOTS", "build_report", "diversity_on_demand", "md_table", "method_colors",
           "plot_accuracy", "plot_diversity", "plot_per_agent", "plot_usage", "save_plots", "table1", "write_report"]


if __name__ == "__main__":
    sys.exit(main())
