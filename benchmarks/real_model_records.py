"""Per-problem records of the real-model comparison: one row per (method, seed, iteration, test
problem), read from the run directories' iter-<k>/debate-test.jsonl (harness.records.DebateRecord)
and kept in benchmarks/results/real-model/records.csv, the only input of the analysis
(benchmarks/real_model_analysis.py).

Iteration 0 (debate without finetuning) is shared by every method of a seed, so it is written
once, as method `debate`; each finetuning method contributes its iterations 1, 2, ...
Writing one seed replaces that seed's rows and keeps the others, so seeds run at different
times accumulate in one file.
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


def read_rows(path: Path) -> list[ProblemRow]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: columns {sorted(missing)} missing; it must have {', '.join(COLUMNS)}")
        return [ProblemRow.model_validate({c: r[c] for c in COLUMNS}) for r in reader]


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
