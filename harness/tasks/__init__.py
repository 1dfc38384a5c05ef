"""Tasks: where problems come from, and how a final answer is read from a model's text.

Each task loads a seeded, deterministic train/test split (disjoint) and extracts answers with
`harness.grading.extract_answer`. Data sets come from the Hugging Face Hub by default or from
local JSONL / Parquet files (`task.source`, `task.test_source`)."""

from __future__ import annotations

import logging
from typing import Literal, Protocol

from harness.config import TaskConfig
from harness.errors import ConfigError
from harness.records import Problem
from harness.tasks import gsm8k, math_task, mmlu
from harness.tasks._loader import data_dir, read_local
from harness.tasks.arithmetic import ArithmeticTask
from harness.tasks.gsm8k import GSM8KTask
from harness.tasks.math_task import MathTask
from harness.tasks.mmlu import MMLUTask

log = logging.getLogger("harness.tasks")

__all__ = ["Task", "get_task", "load_split", "bundled_problems", "TASKS"]


class Task(Protocol):
    name: str
    allow_plain_number: bool  # a bare number at the end of the text counts as the answer

    def load(self, cfg: TaskConfig, split: Literal["train", "test"]) -> list[Problem]: ...

    def extract(self, text: str) -> str | None: ...


TASKS: dict[str, Task] = {t.name: t for t in (ArithmeticTask(), GSM8KTask(), MathTask(), MMLUTask())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"task.name: unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def load_split(cfg: TaskConfig, split: Literal["train", "test"]) -> list[Problem]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return get_task(cfg.name).load(cfg, split)


# The fixtures in data/ and how to read them; every level is kept (no filter).
_BUNDLED = (
    ("gsm8k-sample.jsonl", gsm8k.to_problem),
    ("math-sample.jsonl", lambda loc: math_task.convert(loc, None)),
    ("mmlu-sample.jsonl", mmlu.to_problem),
)


def bundled_problems() -> list[Problem]:
    """Every problem of the small fixtures in data/ (the simulator looks up gold answers here)."""
    out: list[Problem] = []
    for fname, convert in _BUNDLED:
        path = data_dir() / fname
        if not path.is_file():
            log.warning("bundled fixture %s not found", path)
            continue
        out += [p for p in map(convert, read_local(path)) if p is not None]
    return out
