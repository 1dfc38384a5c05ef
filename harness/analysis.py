"""Load run directories (DESIGN §5) into pandas DataFrames for reports and notebooks.

All parsing of a run directory lives here, through the persisted pydantic records, so a
notebook never re-implements it:

    from harness.analysis import load_runs
    frames = load_runs(["runs/debate", "runs/multiagent-ft"])
    frames.metrics      # one row per run x iteration x split: accuracy, stderr, n, agreement, ...
    frames.per_agent    # one row per run x iteration x split x agent x round: accuracy
    frames.usage        # one row per run x iteration: calls, tokens, cost (inference + training)
    frames.diversity    # one row per run x iteration x split: consensus, agreement, embedding, NLL, KL
    frames.runs         # one row per run: method, final accuracy ± se, n, iterations, cost

The method of a run is its config name (the comparison presets name themselves after the method).
"""

from __future__ import annotations

import glob
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import yaml

from harness.diversity import DiversityMetrics
from harness.errors import DataError
from harness.fileio import read_jsonl
from harness.llm.pricing import training_price_for
from harness.llm.usage import is_local
from harness.records import DebateRecord, IterationMetrics, RunSummary, UsageRecord
from harness.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """One run directory, parsed. Files a run has not written yet are simply absent."""

    dir: Path
    config: dict  # the resolved config.yaml (a dict: older runs may predate newer fields)
    summary: RunSummary | None
    iterations: list[IterationMetrics]  # from iter-<k>/metrics.json, by iteration
    usage: list[UsageRecord]
    registry: Registry | None
    diversity: list[DiversityMetrics] = field(default_factory=list)  # from iter-<k>/diversity.json

    @property
    def method(self) -> str:
        return str(self.config.get("name") or (self.summary.run if self.summary else self.dir.name))

    @property
    def simulated(self) -> bool:
        if self.summary is not None:
            return self.summary.simulated
        return (self.config.get("endpoint") or {}).get("kind", "simulator") == "simulator"

    @property
    def finished(self) -> bool:
        return bool(self.summary and self.summary.finished)

    def iter_dirs(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.glob("iter-*"):
            suffix = p.name.removeprefix("iter-")
            if p.is_dir() and suffix.isdigit():
                out.append((int(suffix), p))
        return sorted(out)

    def debate_records(self, iteration: int, split: str = "test") -> list[DebateRecord]:
        return read_jsonl(self.dir / f"iter-{iteration}" / f"debate-{split}.jsonl", DebateRecord)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by `paths`: a run directory itself, a glob pattern, or a directory
    holding runs (e.g. a comparison's output directory), in that order, without duplicates."""
    out: list[Path] = []
    for raw in paths:
        matches = sorted(glob.glob(str(raw))) or [str(raw)]
        for m in map(Path, matches):
            found = [m] if is_run_dir(m) else sorted(p for p in m.glob("*") if is_run_dir(p)) if m.is_dir() else []
            out.extend(p for p in found if p not in out)
    return out


def _read_model(path: Path, model):
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not a valid {model.__name__}: {e}") from e


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise DataError(f"{run_dir}: no config.yaml; is this a run directory (python -m harness.loop --run-dir ...)?")
    config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    summary_path = run_dir / "summary.json"
    summary = _read_model(summary_path, RunSummary) if summary_path.is_file() else None
    registry_path = run_dir / "registry.json"
    registry = _read_model(registry_path, Registry) if registry_path.is_file() else None
    run = RunData(dir=run_dir, config=config, summary=summary, iterations=[],
                  usage=read_jsonl(run_dir / "usage.jsonl", UsageRecord), registry=registry)
    for _, d in run.iter_dirs():
        if (d / "metrics.json").is_file():
            run.iterations.append(_read_model(d / "metrics.json", IterationMetrics))
        if (d / "diversity.json").is_file():
            try:
                run.diversity.extend(_diversity_file(d / "diversity.json"))
            except DataError as e:  # damaged: the report goes on without it; the loop rebuilds it
                log.warning("%s; left out (python -m harness.loop --resume %s computes it again)", e, run_dir)
    if not run.iterations and summary is not None:  # metrics files lost, summary still there
        run.iterations = list(summary.iterations)
    return run


def _diversity_file(path: Path) -> list[DiversityMetrics]:
    """diversity.json holds one DiversityMetrics or a list of them (one per split)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged, not valid JSON ({e})") from e
    if not isinstance(data, (dict, list)):
        raise DataError(f"{path}: damaged, not a diversity record")
    items = data if isinstance(data, list) else list(data.values()) if "iteration" not in data else [data]
    try:
        return [DiversityMetrics.model_validate(x) for x in items]
    except ValueError as e:
        raise DataError(f"{path}: not valid diversity metrics: {e}") from e


# ----------------------------------------------------------------------------- frames

def metrics_frame(runs: Sequence[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for it in run.iterations:
            for split, m in it.splits.items():
                rows.append({"method": run.method, "run": str(run.dir), "simulated": run.simulated,
                             "iteration": it.iteration, "split": split, "n": m.n, "accuracy": m.accuracy,
                             "stderr": m.stderr, "agents": len(m.per_agent), "rounds": len(m.per_round),
                             "first_round_accuracy": m.per_round[0] if m.per_round else math.nan,
                             "agreement": m.agreement, "pairwise_agreement": m.pairwise_agreement,
                             "consensus": m.consensus, "unparsed_rate": m.unparsed_rate,
                             "truncated_rate": m.truncated_rate})
    return pd.DataFrame(rows, columns=["method", "run", "simulated", "iteration", "split", "n", "accuracy",
                                       "stderr", "agents", "rounds", "first_round_accuracy", "agreement",
                                       "pairwise_agreement", "consensus", "unparsed_rate", "truncated_rate"]
                        ).astype({"consensus": float})


def per_agent_frame(runs: Sequence[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for it in run.iterations:
            for split, m in it.splits.items():
                for agent, per_round in enumerate(m.per_agent_round):
                    for rnd, acc in enumerate(per_round):
                        rows.append({"method": run.method, "run": str(run.dir), "simulated": run.simulated,
                                     "iteration": it.iteration, "split": split, "agent": agent, "round": rnd, "accuracy": acc,
                                     "final_round": rnd == len(per_round) - 1})
    return pd.DataFrame(rows, columns=["method", "run", "simulated", "iteration", "split", "agent", "round",
                                       "accuracy", "final_round"])


def usage_frame(runs: Sequence[RunData]) -> pd.DataFrame:
    """Usage per run x iteration. Inference: usage.jsonl grouped by the call's sample.iteration
    (calls with no sample identity, e.g. embeddings for diversity, go to iteration -1).
    Training: the registry's succeeded jobs, attributed to the iteration whose debate data they
    trained on (entry k trained on iteration k-1's data), priced per training token
    (trained_tokens as the provider reports them, epochs included).
    `*_known_usd` sum the parts of known price; `unknown_*` count the rest; `cost_usd` is the
    total only when nothing is unknown, else NaN: a partial sum is never shown as the whole."""
    cols = ["method", "run", "simulated", "iteration", "calls", "cache_hits", "prompt_tokens",
            "completion_tokens", "tokens", "inference_known_usd", "unknown_cost_calls", "trained_tokens",
            "training_known_usd", "unknown_training_jobs", "cost_known_usd", "cost_usd"]
    rows = []
    for run in runs:
        per: dict[int, dict] = {}

        def bucket(k: int) -> dict:
            return per.setdefault(k, dict.fromkeys(["calls", "cache_hits", "prompt_tokens", "completion_tokens",
                                                    "unknown_cost_calls", "trained_tokens",
                                                    "unknown_training_jobs"], 0)
                                  | {"inference_known_usd": 0.0, "training_known_usd": 0.0})

        for rec in run.usage:
            b = bucket(rec.sample.iteration if rec.sample is not None else -1)
            if rec.cached:
                b["cache_hits"] += 1
                continue
            b["calls"] += 1
            b["prompt_tokens"] += rec.prompt_tokens or 0
            b["completion_tokens"] += rec.completion_tokens or 0
            if rec.cost_usd is None:
                b["unknown_cost_calls"] += 1
            else:
                b["inference_known_usd"] += rec.cost_usd
        prices = run.config.get("prices") or {}
        seen_jobs: set[str] = set()
        for e in (run.registry.entries if run.registry else []):
            # With finetune.single_model every agent's entry points at the same shared job:
            # count its tokens and cost once.
            if e.status != "succeeded" or e.iteration < 1 or (e.job_id is not None and e.job_id in seen_jobs):
                continue
            if e.job_id is not None:
                seen_jobs.add(e.job_id)
            b = bucket(e.iteration - 1)
            # Local LoRA jobs run on the user's own hardware: no per-token charge (as --dry-run says).
            rate = 0.0 if e.provider == "local" else training_price_for(e.parent_model or run.registry.base_model, prices)
            if e.provider == "azure":  # parents are deployment names; every job trains the base model's family
                from harness.llm.azure_pricing import azure_training_price

                rate = azure_training_price(run.registry.base_model, prices)
            if rate == 0.0 and e.trained_tokens is None:
                continue
            if e.trained_tokens is None or rate is None:
                b["unknown_training_jobs"] += 1
                continue
            b["trained_tokens"] += e.trained_tokens
            b["training_known_usd"] += e.trained_tokens * rate / 1e6
        for k, b in sorted(per.items()):
            known = b["inference_known_usd"] + b["training_known_usd"]
            complete = not (b["unknown_cost_calls"] or b["unknown_training_jobs"])
            rows.append({"method": run.method, "run": str(run.dir), "simulated": run.simulated, "iteration": k,
                         **b, "tokens": b["prompt_tokens"] + b["completion_tokens"],
                         "cost_known_usd": known, "cost_usd": known if complete else math.nan})
    return pd.DataFrame(rows, columns=cols)


DIVERSITY_MEASURES = ("consensus", "agreement", "pairwise_agreement", "embedding_dissimilarity",
                      "heldout_critic_nll", "kl_between_generators", "kl_between_critics", "kl_generators_vs_base",
                      "kl_critics_vs_base")


def diversity_frame(runs: Sequence[RunData], computed: Sequence[DiversityMetrics] | None = None,
                    computed_runs: Sequence[RunData] | None = None) -> pd.DataFrame:
    """Diversity per run x iteration x split from diversity.json files; `computed` adds measures
    computed on demand (harness.report) for `computed_runs[i]` in the same order. A measure a
    file lacks (older runs) is NaN."""
    rows = []
    pairs = [(run, d) for run in runs for d in run.diversity]
    pairs += list(zip(computed_runs or [], computed or []))
    for run, d in pairs:
        rows.append({"method": run.method, "run": str(run.dir), "simulated": run.simulated,
                     "iteration": d.iteration, "split": d.split, "n": d.n,
                     **{col: getattr(d, col) for col in DIVERSITY_MEASURES},
                     "embedding_model": d.embedding_model, "logprob_problems": d.logprob_problems,
                     "notes": "; ".join(d.notes)})
    cols = ["method", "run", "simulated", "iteration", "split", "n", *DIVERSITY_MEASURES, "embedding_model",
            "logprob_problems", "notes"]
    return pd.DataFrame(rows, columns=cols).astype({c: float for c in DIVERSITY_MEASURES})


def runs_frame(runs: Sequence[RunData], usage: pd.DataFrame | None = None, split: str = "test") -> pd.DataFrame:
    """One row per run, as in the paper's Table 1: the last iteration's accuracy ± stderr on
    `split` with its n, and the whole run's calls, tokens and cost (inference and finetuning;
    cost_usd NaN when any part is of unknown price, cost_known_usd the part that is known)."""
    usage = usage_frame(runs) if usage is None else usage
    rows = []
    for run in runs:
        last = next((it.splits[split] for it in reversed(run.iterations) if split in it.splits), None)
        u = usage[usage["run"] == str(run.dir)]
        unknown = int(u["unknown_cost_calls"].sum() + u["unknown_training_jobs"].sum())
        known = float(u["cost_known_usd"].sum())
        rows.append({
            "method": run.method, "run": str(run.dir), "simulated": run.simulated, "finished": run.finished,
            "local": is_local(run.config),  # vLLM-served models: no API price
            "accuracy": last.accuracy if last else math.nan, "stderr": last.stderr if last else math.nan,
            "n": last.n if last else 0, "truncated_rate": last.truncated_rate if last else math.nan,
            "iterations": max((it.iteration for it in run.iterations), default=0),
            # The society that answered the test split (`evaluation` overrides `debate`).
            "agents": (run.config.get("evaluation") or {}).get("agents") or (run.config.get("debate") or {}).get("agents"),
            "rounds": (run.config.get("evaluation") or {}).get("rounds") or (run.config.get("debate") or {}).get("rounds"),
            "truncated_rate": last.truncated_rate if last else math.nan,
            "calls": int(u["calls"].sum()), "cache_hits": int(u["cache_hits"].sum()),
            "tokens": int(u["tokens"].sum()), "trained_tokens": int(u["trained_tokens"].sum()),
            "cost_known_usd": known, "unknown_cost_items": unknown,
            "cost_usd": known if not unknown else math.nan})
    return pd.DataFrame(rows)


@dataclass
class Frames:
    runs: pd.DataFrame
    metrics: pd.DataFrame
    per_agent: pd.DataFrame
    usage: pd.DataFrame
    diversity: pd.DataFrame
    data: list[RunData]


def load_runs(dirs: Iterable[str | Path]) -> Frames:
    """Every run under `dirs` (see expand_run_dirs) as DataFrames."""
    dirs = list(dirs)
    paths = expand_run_dirs(dirs)
    if not paths:
        raise DataError(f"no run directories (with config.yaml) found in {list(map(str, dirs))}")
    runs = [load_run(p) for p in paths]
    usage = usage_frame(runs)
    return Frames(runs=runs_frame(runs, usage), metrics=metrics_frame(runs), per_agent=per_agent_frame(runs),
                  usage=usage, diversity=diversity_frame(runs), data=runs)


__all__ = ["DIVERSITY_MEASURES", "Frames", "RunData", "diversity_frame", "expand_run_dirs", "is_run_dir", "load_run", "load_runs",
           "metrics_frame", "per_agent_frame", "runs_frame", "usage_frame"]
