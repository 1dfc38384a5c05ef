"""What a tracker receives, read from the run's own records: flat name -> number dicts per
iteration, the metrics table, loss-curve keys. Pure functions; the tracker sends the results.

Names are grouped by their first path part, which trackers use as panel sections:
`test/…` and `train/…` (SplitMetrics of each split), `diversity/…`, `seconds/…` (stage wall
times), `usage/…` (the run's calls, tokens and cost so far), `finetune/…` (jobs and loss curves).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from harness.diversity import DiversityMetrics
from harness.fileio import iter_jsonl
from harness.records import IterationMetrics, SplitMetrics, StageTiming

log = logging.getLogger(__name__)

# SplitMetrics fields sent as they are (the lists are spread into one number per round / agent).
_SPLIT_SCALARS = ("accuracy", "stderr", "n", "agreement", "pairwise_agreement", "consensus", "unparsed_rate",
                  "truncated_rate")
_USAGE = ("calls", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd", "unknown_cost_calls",
          "unanswered_calls", "unanswered_cost_usd")
TABLE_COLUMNS = ["method", "iteration", "split", "n", "accuracy", "stderr", "agreement", "consensus",
                 "unparsed_rate", "truncated_rate"]  # then accuracy after each round: round_0, round_1, ...


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def split_numbers(m: SplitMetrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in _SPLIT_SCALARS:
        value = _number(getattr(m, name))
        if value is not None:
            out[f"{m.split}/{name}"] = value
    for r, acc in enumerate(m.per_round):
        out[f"{m.split}/accuracy_round_{r}"] = acc
    for a, acc in enumerate(m.per_agent):
        out[f"{m.split}/accuracy_agent_{a}"] = acc
    return out


def diversity_numbers(div: DiversityMetrics | None) -> dict[str, float]:
    if div is None:
        return {}
    out = {}
    for name, value in div.model_dump(exclude={"schema_version", "iteration", "split"}).items():
        number = _number(value)
        if number is not None:
            out[f"diversity/{name}"] = number
    return out


def stage_seconds(stages: Iterable[StageTiming], iteration: int) -> dict[str, float]:
    """Wall seconds per stage of one iteration, summed over sessions (a resumed stage has a line
    per session)."""
    total: dict[str, float] = defaultdict(float)
    for s in stages:
        if s.iteration == iteration:
            total[f"seconds/{s.stage}" + (f"_{s.split}" if s.split else "")] += s.seconds
    return {k: round(v, 3) for k, v in total.items()}


def iteration_end(stages: Iterable[StageTiming], iteration: int) -> float | None:
    """When iteration k's last recorded stage ended (unix time): the same in every session."""
    ends = [s.started_at + s.seconds for s in stages if s.iteration == iteration]
    return max(ends) if ends else None


def usage_numbers(usage: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name in _USAGE:
        number = _number(usage.get(name))
        if number is not None:
            out[f"usage/{name}"] = number
    return out


def read_diversity(path: Path) -> DiversityMetrics | None:
    try:
        return DiversityMetrics.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def read_stages(path: Path) -> list[StageTiming]:
    try:
        return list(iter_jsonl(path, StageTiming))
    except (OSError, ValueError) as e:
        log.debug("stage times unreadable: %s", e)
        return []


def iteration_numbers(run_dir: Path, metrics: IterationMetrics, usage: dict[str, Any]) -> dict[str, float]:
    """Everything sent at step k: each split's metrics, the test split's diversity, the stage
    times of iteration k, and the usage totals so far."""
    k = metrics.iteration
    out: dict[str, float] = {"iteration": float(k)}
    for m in metrics.splits.values():
        out.update(split_numbers(m))
    out.update(diversity_numbers(read_diversity(run_dir / f"iter-{k}" / "diversity.json")))
    out.update(stage_seconds(read_stages(run_dir / "stages.jsonl"), k))
    out.update(usage_numbers(usage))
    return out


def metrics_table(method: str, iterations: list[IterationMetrics]) -> tuple[list[str], list[list[Any]]]:
    """One row per iteration and split: the run's Table-1 numbers as a tracker table."""
    rounds = max((len(m.per_round) for it in iterations for m in it.splits.values()), default=0)
    columns = TABLE_COLUMNS + [f"round_{r}" for r in range(rounds)]
    rows = []
    for it in iterations:
        for split in sorted(it.splits):
            m = it.splits[split]
            rows.append([method, it.iteration, split, m.n, m.accuracy, m.stderr, m.agreement, m.consensus,
                         m.unparsed_rate, m.truncated_rate,
                         *(m.per_round[r] if r < len(m.per_round) else None for r in range(rounds))])
    return columns, rows


def loss_key(iteration: int, role: str, agent: int) -> str:
    """The prefix of one job's curve: `<prefix>/loss` against `<prefix>/step`."""
    return f"finetune/iter-{iteration}/{role}-{agent}"
