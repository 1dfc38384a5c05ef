"""Metrics of a set of debate records (DESIGN §2, evaluation).

Accuracy is the final-round majority vote's; n counts every problem (an unparseable vote is
wrong, never dropped), stderr = sqrt(p(1-p)/n). Agreement ("all agree"), pairwise agreement and
the authors' consensus use the vote's equivalence classes, so they cost no extra equivalence
checks.

Consensus, as the authors' eval_math.py computes it: over the final round's parsed answers of all
problems together (one pooled list, as their code appends to), the share equal to their
problem's majority answer; problems where nothing parsed add nothing. With the same number of
parsed answers per problem it is the mean over problems of count/voters. Two differences, both
deliberate: "equal" is mathematical equivalence (membership of the vote's winning class) where
their code compares strings, and ties need no rule (any winner of a tie has the same count).
"""

from __future__ import annotations

import math
from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from harness.records import DebateRecord, SplitMetrics


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def split_metrics(records: Sequence[DebateRecord], *, iteration: int, split: str,
                  simulated: bool = False) -> SplitMetrics:
    n = len(records)
    if n == 0:
        return SplitMetrics(iteration=iteration, split=split, n=0, accuracy=0.0, stderr=0.0, per_round=[],
                            per_agent=[], per_agent_round=[], agreement=0.0, pairwise_agreement=0.0,
                            unparsed_rate=0.0, simulated=simulated)
    n_agents = len(records[0].agents)
    rounds = len(records[0].round_votes)
    accuracy = _mean([float(r.correct) for r in records])
    per_round = [_mean([float(r.round_correct[m]) for r in records]) for m in range(rounds)]
    per_agent_round = [[_mean([float(r.agents[a].correct[m]) for r in records]) for m in range(rounds)]
                       for a in range(n_agents)]
    agreement, pairwise, unparsed = [], [], []
    in_majority = voters = 0
    pairs = n_agents * (n_agents - 1) / 2
    for r in records:
        vote = r.vote
        in_majority, voters = in_majority + vote.count, voters + vote.n_voters
        agreement.append(float(any(len(c.agents) == n_agents for c in vote.classes)))
        if pairs:
            pairwise.append(sum(len(c.agents) * (len(c.agents) - 1) / 2 for c in vote.classes) / pairs)
        unparsed.append(sum(t.answers[-1] is None for t in r.agents) / n_agents)
    replies = [cut for r in records for t in r.agents for cut in t.truncated]
    return SplitMetrics(
        iteration=iteration, split=split, n=n, accuracy=accuracy, stderr=stderr(accuracy, n),
        per_round=per_round, per_agent=[row[-1] for row in per_agent_round], per_agent_round=per_agent_round,
        agreement=_mean(agreement), pairwise_agreement=_mean(pairwise) if pairs else 1.0,
        consensus=in_majority / voters if voters else None,
        unparsed_rate=_mean(unparsed), truncated_rate=_mean([float(c) for c in replies]), simulated=simulated)


def results_table(metrics: Sequence[SplitMetrics], title: str = "Results") -> Table:
    """Fits an 80-column terminal (3 agents, 2 rounds); `it` is the iteration; rates in %. `cut` is the share of replies
    that max_tokens cut off (they do not vote), next to the accuracy it lowers; `per round` is the
    majority vote after each round; `agree` the share of problems where all agents agree."""
    simulated = any(m.simulated for m in metrics)
    table = Table(title=title + (" (SIMULATED models: a test double, not real accuracy)" if simulated else ""),
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for col in ("it", "split", "n", "acc ± se", "cut", "per round", "per agent", "agree", "unparsed"):
        table.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for m in metrics:
        table.add_row(
            str(m.iteration), m.split, str(m.n), f"{100 * m.accuracy:.1f} ± {100 * m.stderr:.1f}",
            f"{100 * m.truncated_rate:.1f}", "→".join(f"{100 * x:.1f}" for x in m.per_round),
            " ".join(f"{100 * x:.1f}" for x in m.per_agent),
            f"{100 * m.agreement:.1f}", f"{100 * m.unparsed_rate:.1f}")
    return table


def print_results(metrics: Sequence[SplitMetrics], console: Console | None = None, title: str = "Results") -> None:
    (console or Console()).print(results_table(metrics, title))
