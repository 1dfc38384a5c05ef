"""Arithmetic: `a+b*c+d-e*f` with integers 0..29, generated from the seed (no data set needed).

The question keeps that exact expression form: the built-in simulator parses it back out of
the prompt to compute the answer."""

from __future__ import annotations

import logging
import random

from harness.config import TaskConfig
from harness.grading import extract_answer
from harness.records import Problem
from harness.tasks._loader import Split

log = logging.getLogger("harness.tasks")

Terms = tuple[int, int, int, int, int, int]


def expression(t: Terms) -> str:
    a, b, c, d, e, f = t
    return f"{a}+{b}*{c}+{d}-{e}*{f}"


def evaluate(t: Terms) -> int:
    a, b, c, d, e, f = t
    return a + b * c + d - e * f


def _draw(seed: int, salt: str, n: int, exclude: set[Terms]) -> list[Terms]:
    # A separate stream per split: the test set depends only on (seed, n_test), so runs that
    # differ only in n_train are evaluated on the same problems.
    rng = random.Random(f"arithmetic:{seed}:{salt}")
    out: list[Terms] = []
    seen = set(exclude)
    while len(out) < n:  # 30**6 expressions: never exhausted at realistic sizes
        t = tuple(rng.randint(0, 29) for _ in range(6))
        if t not in seen:
            seen.add(t)
            out.append(t)  # type: ignore[arg-type]
    return out


def to_problem(t: Terms) -> Problem:
    expr = expression(t)
    return Problem(
        id="arithmetic-" + "_".join(map(str, t)),
        task="arithmetic",
        question=f"What is the result of {expr}?",
        gold=str(evaluate(t)),
        meta={"expression": expr},
    )


class ArithmeticTask:
    name = "arithmetic"
    allow_plain_number = True

    def load(self, cfg: TaskConfig, split: Split) -> list[Problem]:
        if cfg.source or cfg.test_source:
            log.warning("arithmetic problems are generated from task.seed; task.source/test_source are ignored")
        test = _draw(cfg.seed, "test", cfg.n_test, set())
        if split == "test":
            return [to_problem(t) for t in test]
        return [to_problem(t) for t in _draw(cfg.seed, "train", cfg.n_train, set(test))]

    def extract(self, text: str) -> str | None:
        return extract_answer(text, allow_plain_number=True)
