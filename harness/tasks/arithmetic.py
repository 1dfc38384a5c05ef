"""Arithmetic: integer expressions generated from the seed (no data set needed).

The default is the paper's `a+b*c+d-e*f` with integers 0..29; `task.arithmetic` sets the number
of terms, the operand range and the operators, so small models can be studied on a ladder of
difficulty (e.g. `a+b` over 0..9). Train and test are drawn from separate seeded streams and are
disjoint; the test split depends only on (seed, n_test, the expression form).

The question keeps the plain expression: the built-in simulator reads the paper's form back out
of the prompt to compute the answer (other forms it knows as given problems)."""

from __future__ import annotations

import logging
import random

from harness.config import ArithmeticConfig, TaskConfig
from harness.errors import ConfigError
from harness.grading import extract_answer
from harness.records import Problem
from harness.tasks._loader import Split

log = logging.getLogger("harness.tasks")

# One expression: its operands and the operators between them.
Expr = tuple[tuple[int, ...], str]


def expression(expr: Expr) -> str:
    numbers, ops = expr
    return "".join(f"{op}{n}" for op, n in zip(("", *ops), numbers))


def evaluate(expr: Expr) -> int:
    """Integer value with the usual precedence (* before + and -): a sum of signed products.
    Hand-written because it is five lines, where eval() or a parser library would be a risk or a
    dependency for nothing."""
    numbers, ops = expr
    total, sign, product = 0, 1, numbers[0]
    for op, n in zip(ops, numbers[1:]):
        if op == "*":
            product *= n
        else:
            total, sign, product = total + sign * product, (1 if op == "+" else -1), n
    return total + sign * product


def _space(cfg: ArithmeticConfig) -> int:
    """How many distinct expressions the form allows."""
    ops = len(set(cfg.operators)) ** (cfg.terms - 1) if cfg.random_operators else 1
    return (cfg.high - cfg.low + 1) ** cfg.terms * ops


def _draw(cfg: ArithmeticConfig, seed: int, salt: str, n: int, exclude: set[Expr]) -> list[Expr]:
    # A separate stream per split: the test set depends only on (seed, n_test, form), so runs that
    # differ only in n_train are evaluated on the same problems. For the paper's form the stream
    # is exactly the one earlier versions drew (same problems, same ids, same cached calls).
    rng = random.Random(f"arithmetic:{seed}:{salt}")
    out: list[Expr] = []
    seen = set(exclude)
    fixed_ops = None if cfg.random_operators else cfg.operators
    choices = list(cfg.operators)  # "++-" draws + twice as often as -
    while len(out) < n:
        numbers = tuple(rng.randint(cfg.low, cfg.high) for _ in range(cfg.terms))
        ops = fixed_ops or "".join(rng.choice(choices) for _ in range(cfg.terms - 1))
        expr = (numbers, ops)
        if expr not in seen:
            seen.add(expr)
            out.append(expr)
    return out


def problem_id(expr: Expr, cfg: ArithmeticConfig) -> str:
    numbers, ops = expr
    if cfg.is_paper_form:
        return "arithmetic-" + "_".join(map(str, numbers))  # the ids earlier runs recorded
    names = {"+": "p", "-": "m", "*": "t"}
    return "arithmetic-" + "".join(f"{names[op]}{n}" if op else str(n) for op, n in zip(("", *ops), numbers))


def to_problem(expr: Expr, cfg: ArithmeticConfig | None = None) -> Problem:
    cfg = cfg or ArithmeticConfig()
    text = expression(expr)
    return Problem(id=problem_id(expr, cfg), task="arithmetic", question=f"What is the result of {text}?",
                   gold=str(evaluate(expr)), meta={"expression": text})


class ArithmeticTask:
    name = "arithmetic"
    allow_plain_number = True

    def load(self, cfg: TaskConfig, split: Split) -> list[Problem]:
        if cfg.source or cfg.test_source:
            log.warning("arithmetic problems are generated from task.seed; task.source/test_source are ignored")
        form = cfg.arithmetic
        wanted = cfg.n_test + (cfg.n_train if split == "train" else 0)
        if wanted > _space(form):
            raise ConfigError(
                f"task.arithmetic: {form.terms} terms over {form.low}..{form.high} allow only {_space(form)} distinct "
                f"expressions, fewer than task.n_train + task.n_test = {cfg.n_train + cfg.n_test}; widen the range, "
                f"add terms or lower the split sizes")
        test = _draw(form, cfg.seed, "test", cfg.n_test, set())
        if split == "test":
            return [to_problem(t, form) for t in test]
        return [to_problem(t, form) for t in _draw(form, cfg.seed, "train", cfg.n_train, set(test))]

    def extract(self, text: str) -> str | None:
        return extract_answer(text, allow_plain_number=True)
