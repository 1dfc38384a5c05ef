"""Per-problem records of the real-model comparison: one row per (method, seed, iteration, test
problem), read from the run directories' iter-<k>/debate-test.jsonl (harness.records.DebateRecord)
and kept in benchmarks/results/real-model/records.csv, the only input of the analysis
(benchmarks/real_model_analysis.py).

Iteration 0 (debate without finetuning) is shared by every method of a seed, so it is written
once, as method `debate`; each finetuning method contributes its iterations 1, 2, ...
Writing one seed replaces that seed's rows and keeps the others, so seeds run at different
times accumulate in one file.

The paper's diversity measures are per (method, seed, iteration), not per problem: they come
from each run's iter-<k>/diversity.json (harness.diversity.DiversityMetrics, test split) and are
kept in diversity.csv beside records.csv, written the same way.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel, ConfigDict

from harness.errors import DataError
from harness.fileio import iter_jsonl, write_atomic
from harness.records import DebateRecord

BASELINE = "debate"  # iteration 0: the base society debating, no finetuning


class ProblemRow(BaseModel):
    """One line of records.csv."""

    model_config = ConfigDict(extra="forbid")

    method: str
    seed: int
    iteration: int
    problem_id: str
    correct: int  # final-round majority vote equals gold (an unparsed vote is wrong)
    first_round_correct: int  # the round-0 (generators') majority vote equals gold
    parsed: int  # the final vote had an answer (at least one agent's final answer parsed)
    first_round_parsed: int
    n_agents: int
    n_parsed: int  # agents whose final answer parsed
    agreement: int  # every agent's final answer in one class ("all agree")
    tie: int  # the final vote was tied between classes


COLUMNS = list(ProblemRow.model_fields)


def row_of(record: DebateRecord, method: str, seed: int) -> ProblemRow:
    first, final = record.round_votes[0], record.vote
    n = len(record.agents)
    first_correct = record.round_correct[0] if record.round_correct else record.correct
    return ProblemRow(
        method=method, seed=seed, iteration=record.iteration, problem_id=record.problem.id,
        correct=int(record.correct), first_round_correct=int(first_correct),
        parsed=int(final.answer is not None), first_round_parsed=int(first.answer is not None),
        n_agents=n, n_parsed=final.n_voters, agreement=int(any(len(c.agents) == n for c in final.classes)),
        tie=int(final.tie))


def rows_of_run(run_dir: Path, method: str, seed: int, *, iterations: Iterable[int]) -> list[ProblemRow]:
    rows: list[ProblemRow] = []
    for k in iterations:
        path = run_dir / f"iter-{k}" / "debate-test.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: missing; the run of {method} (seed {seed}) has not finished iteration {k}. "
                            f"Run the seed again to resume it.")
        rows += [row_of(DebateRecord.model_validate(r), BASELINE if k == 0 else method, seed)
                 for r in iter_jsonl(path)]
    return rows


def seed_rows(seed_dir: Path, methods: list[str], seed: int, iterations: int) -> list[ProblemRow]:
    """All rows of one seed: iteration 0 from the first method's run (every method shares it),
    then every method's finetuned iterations."""
    rows = rows_of_run(seed_dir / methods[0], methods[0], seed, iterations=[0])
    for m in methods:
        rows += rows_of_run(seed_dir / m, m, seed, iterations=range(1, iterations + 1))
    return rows


def _read_csv(path: Path, model: type[BaseModel]) -> list:
    """The rows of a CSV file as `model`s (an empty cell is None); [] when there is no file."""
    if not path.is_file():
        return []
    columns = list(model.model_fields)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(columns) - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: columns {sorted(missing)} missing; it must have {', '.join(columns)}")
        return [model.model_validate({c: (r[c] if r[c] != "" else None) for c in columns}) for r in reader]


def read_rows(path: Path) -> list[ProblemRow]:
    return _read_csv(path, ProblemRow)


def write_rows(path: Path, rows: list[ProblemRow]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in sorted(rows, key=lambda r: (r.seed, r.method != BASELINE, r.method, r.iteration, r.problem_id)):
        writer.writerow(r.model_dump())
    write_atomic(path, out.getvalue())


def replace_seed(path: Path, seed: int, rows: list[ProblemRow]) -> None:
    """records.csv with seed `seed`'s rows replaced by `rows` (other seeds kept)."""
    kept = [r for r in read_rows(path) if r.seed != seed]
    write_rows(path, kept + rows)


# ----------------------------------------------------------------------------- diversity.csv

class DiversityRow(BaseModel):
    """One line of diversity.csv: a run's diversity measures on the test split at one iteration
    (nats per token for the log-probability ones; empty where the run could not measure)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    seed: int
    iteration: int
    n: int  # test problems
    logprob_problems: int | None = None  # problems scored for the log-probability measures
    heldout_critic_nll: float | None = None
    kl_between_generators: float | None = None
    kl_between_critics: float | None = None
    kl_generators_vs_base: float | None = None
    kl_critics_vs_base: float | None = None
    embedding_dissimilarity: float | None = None
    pairwise_agreement: float | None = None


DIVERSITY_COLUMNS = list(DiversityRow.model_fields)
MEASURES = DIVERSITY_COLUMNS[5:]  # the measures, after the keys and counts


def diversity_of_run(run_dir: Path, method: str, seed: int, *, iterations: Iterable[int]) -> list[DiversityRow]:
    from harness.diversity import DiversityMetrics

    rows = []
    for k in iterations:
        path = run_dir / f"iter-{k}" / "diversity.json"
        if not path.is_file():
            raise DataError(f"{path}: missing; the run of {method} (seed {seed}) has not measured iteration {k}'s "
                            f"diversity. Run the seed again to resume it.")
        m = DiversityMetrics.model_validate_json(path.read_text(encoding="utf-8"))
        rows.append(DiversityRow(method=BASELINE if k == 0 else method, seed=seed, iteration=k, n=m.n,
                                 **{c: getattr(m, c) for c in DIVERSITY_COLUMNS[4:]}))
    return rows


def seed_diversity(seed_dir: Path, methods: list[str], seed: int, iterations: int) -> list[DiversityRow]:
    """As seed_rows: iteration 0 once (method `debate`), then each method's finetuned iterations."""
    rows = diversity_of_run(seed_dir / methods[0], methods[0], seed, iterations=[0])
    for m in methods:
        rows += diversity_of_run(seed_dir / m, m, seed, iterations=range(1, iterations + 1))
    return rows


def read_diversity(path: Path) -> list[DiversityRow]:
    return _read_csv(path, DiversityRow)


def replace_seed_diversity(path: Path, seed: int, rows: list[DiversityRow]) -> None:
    """diversity.csv with seed `seed`'s rows replaced by `rows` (other seeds kept)."""
    kept = [r for r in read_diversity(path) if r.seed != seed]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=DIVERSITY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in sorted(kept + rows, key=lambda r: (r.seed, r.method != BASELINE, r.method, r.iteration)):
        writer.writerow({k: ("" if v is None else v) for k, v in r.model_dump().items()})
    write_atomic(path, out.getvalue())
