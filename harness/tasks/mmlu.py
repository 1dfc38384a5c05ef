"""MMLU: four-choice questions; the question text lists the lettered choices, gold is A-D."""

from __future__ import annotations

import re

from harness.config import TaskConfig
from harness.errors import DataError
from harness.grading import extract_answer
from harness.records import Problem
from harness.tasks._loader import HubDefault, Located, Split, load_problems, problem_id, require

# cais/mmlu has no train split of the same questions: its validation split serves as train.
DEFAULT = HubDefault(repo="cais/mmlu", configs=("all",), splits={"train": "validation", "test": "test"})
LETTERS = "ABCD"
_HINT = "MMLU records need 'question', 'choices' (4 strings) and 'answer' (0-3 or A-D)"


def to_problem(located: Located) -> Problem:
    where, rec = located
    question = str(require(rec, "question", where, _HINT)).strip()
    if "choices" in rec:
        choices = list(require(rec, "choices", where, _HINT))
    else:
        choices = [require(rec, letter, where, _HINT) for letter in LETTERS]
    if len(choices) != 4:
        raise DataError(f"{where}: field 'choices' must hold 4 options, got {len(choices)} ({_HINT})")
    answer = require(rec, "answer", where, _HINT)
    if isinstance(answer, int) and 0 <= answer < 4:
        gold = LETTERS[answer]
    elif str(answer).strip().upper() in LETTERS:
        gold = str(answer).strip().upper()
    else:
        raise DataError(f"{where}: field 'answer' must be 0-3 or A-D, got {answer!r}")
    text = question + "\n\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return Problem(id=problem_id("mmlu", text), task="mmlu", question=text, gold=gold,
                   meta={"subject": rec.get("subject")})


_LETTER_IN_BOX = re.compile(r"^(?:\\text\{\s*)?\(?([A-Da-d])\)?(?:[\s.:)}]|$)")
_LETTER_IN_TEXT = re.compile(r"answer is\s*:?\s*\$?\(?([A-D])\b")


class MMLUTask:
    name = "mmlu"
    allow_plain_number = False

    def load(self, cfg: TaskConfig, split: Split) -> list[Problem]:
        return load_problems(self.name, cfg, split, DEFAULT, to_problem)

    def extract(self, text: str) -> str | None:
        boxed = extract_answer(text)
        if boxed is not None:
            m = _LETTER_IN_BOX.match(boxed)
            return m.group(1).upper() if m else None
        found = _LETTER_IN_TEXT.findall(text or "")
        return found[-1] if found else None
