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


# A box counts only when it holds one option letter, maybe "(B)" or "B.", once font wrappers
# (\text{...}, \textbf{...}, \mathrm{...}) are peeled off: "\boxed{A and B}" is not an answer.
_FONT_WRAPPER = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{(.*)\}$", re.DOTALL)
_LETTER_IN_BOX = re.compile(r"^\(?([A-Da-d])\)?\.?$")
# "Answer: C", "the answer is (B)", "Final answer: **D**". Only a capital letter: in "the answer
# is a number" the "a" is an article.
_LETTER_IN_TEXT = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*[*$(\s]*([A-D])\b")


def _box_letter(boxed: str) -> str | None:
    s = boxed.strip()
    while (m := _FONT_WRAPPER.match(s)) is not None:
        s = m.group(1).strip()
    m = _LETTER_IN_BOX.match(s)
    return m.group(1).upper() if m else None


class MMLUTask:
    name = "mmlu"
    allow_plain_number = False

    def load(self, cfg: TaskConfig, split: Split) -> list[Problem]:
        return load_problems(self.name, cfg, split, DEFAULT, to_problem)

    def extract(self, text: str) -> str | None:
        boxed = extract_answer(text)
        letter = _box_letter(boxed) if boxed is not None else None
        if letter is not None:
            return letter
        # no box, or one without a single letter: the last "answer is X" in the text decides
        found = _LETTER_IN_TEXT.findall(text or "")
        return found[-1] if found else None
