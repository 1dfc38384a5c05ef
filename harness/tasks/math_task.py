"""MATH (Hendrycks et al.): competition problems; gold = the last \\boxed{} of the solution, or
the `answer` field where a file has one (as MATH-500 does). Kept levels: `task.levels`.

(Named math_task, not math, so that it never shadows the standard library's `math`.)"""

from __future__ import annotations

import logging
import re

from harness.config import TaskConfig
from harness.errors import DataError
from harness.grading import extract_answer
from harness.records import Problem
from harness.tasks._loader import HubDefault, Located, Split, load_problems, problem_id, require

log = logging.getLogger("harness.tasks")

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
            "number_theory", "prealgebra", "precalculus")
DEFAULT = HubDefault(repo="EleutherAI/hendrycks_math", configs=SUBJECTS, splits={"train": "train", "test": "test"})
_HINT = "MATH records need 'problem' and a 'solution' with a \\boxed{} answer (or an 'answer' field)"


def parse_level(value: object) -> int | None:
    """3 from 3, "3" or "Level 3"; None for "Level ?" and other unknowns."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value), flags=re.IGNORECASE)
    return int(m.group(1)) if m else None


def convert(located: Located, levels: set[int] | None) -> Problem | None:
    where, rec = located
    question = str(require(rec, "problem", where, _HINT)).strip()
    answer = rec.get("answer")
    if answer is not None and str(answer).strip():
        gold = str(answer).strip()
    else:
        solution = str(require(rec, "solution", where, _HINT))
        gold = extract_answer(solution)
        if gold is None:
            raise DataError(f"{where}: field 'solution' has no \\boxed{{}} final answer ({_HINT})")
    raw_level = rec.get("level")
    level = None if raw_level is None else parse_level(raw_level)
    # A record without a level is kept (the filter cannot apply); "Level ?" is an unknown level
    # and is dropped when a filter is set.
    if levels is not None and raw_level is not None and level not in levels:
        return None
    meta = {"level": level, "subject": rec.get("type") or rec.get("subject")}
    if rec.get("unique_id"):
        meta["unique_id"] = rec["unique_id"]
    return Problem(id=problem_id("math", question), task="math", question=question, gold=gold, meta=meta)


class MathTask:
    name = "math"
    allow_plain_number = False

    def load(self, cfg: TaskConfig, split: Split) -> list[Problem]:
        levels = set(cfg.levels) if cfg.levels else None
        return load_problems(self.name, cfg, split, DEFAULT, lambda loc: convert(loc, levels))

    def extract(self, text: str) -> str | None:
        return extract_answer(text)
