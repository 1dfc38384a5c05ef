"""GSM8K: grade-school word problems; the gold answer follows `####` in the `answer` field."""

from __future__ import annotations

from harness.config import TaskConfig
from harness.errors import DataError
from harness.grading import extract_answer
from harness.records import Problem
from harness.tasks._loader import HubDefault, Located, Split, load_problems, problem_id, require

DEFAULT = HubDefault(repo="openai/gsm8k", configs=("main",), splits={"train": "train", "test": "test"})
_HINT = "GSM8K records need 'question' and 'answer', the answer ending in '#### <number>'"


def gold_of(answer: str) -> str | None:
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    return gold.rstrip(".").strip() or None


def to_problem(located: Located) -> Problem:
    where, rec = located
    question = str(require(rec, "question", where, _HINT)).strip()
    answer = str(require(rec, "answer", where, _HINT))
    gold = gold_of(answer)
    if gold is None:
        raise DataError(f"{where}: field 'answer' has no final answer after '####' ({_HINT})")
    return Problem(id=problem_id("gsm8k", question), task="gsm8k", question=question, gold=gold,
                   meta={"solution": answer})


class GSM8KTask:
    name = "gsm8k"
    allow_plain_number = True

    def load(self, cfg: TaskConfig, split: Split) -> list[Problem]:
        return load_problems(self.name, cfg, split, DEFAULT, to_problem)

    def extract(self, text: str) -> str | None:
        return extract_answer(text, allow_plain_number=True)
