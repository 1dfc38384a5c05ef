"""Prompt templates: plain text files in `prompts/`, one per task and role, loaded by name.

Lookup order for role R of task T: the user's `task.prompts_dir/R.txt`, then
`prompts/T/R.txt`, then `prompts/default/R.txt`.

Placeholders are `{name}` and nothing else is special, so templates can contain LaTeX such as
`\\boxed{}` without escaping (which is why this is not `str.format`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from harness.errors import ConfigError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

# role -> the placeholders it must contain
ROLES: dict[str, tuple[str, ...]] = {
    "question": ("question",),  # round 0: the task prompt
    "debate": ("other_answers",),  # round m >= 1, concatenate mode
    "other_answer": ("agent", "answer"),  # one other agent's answer inside {other_answers}
    "summarize": ("question", "other_answers"),  # the summarizer's request
    "debate_summary": ("summary",),  # round m >= 1, summarize mode
    "star_hint": ("question", "answer"),  # STaR rationalization: the task prompt as sent, and the gold answer
}

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class Prompts:
    """The templates of one task, resolved once per run."""

    def __init__(self, task: str, user_dir: str | Path | None = None):
        self.task = task
        self.user_dir = Path(user_dir) if user_dir else None
        if self.user_dir is not None and not self.user_dir.is_dir():
            raise ConfigError(f"task.prompts_dir: {self.user_dir} is not a directory")
        self.templates = {role: self._load(role) for role in ROLES}

    def _load(self, role: str) -> str:
        candidates = []
        if self.user_dir is not None:
            candidates.append(self.user_dir / f"{role}.txt")
        candidates += [PROMPTS_DIR / self.task / f"{role}.txt", PROMPTS_DIR / "default" / f"{role}.txt"]
        for path in candidates:
            if path.is_file():
                return _read_checked(path, role)
        raise ConfigError(f"no prompt template for role '{role}' (looked in {', '.join(map(str, candidates))})")

    def render(self, role: str, **values: object) -> str:
        text = self.templates[role]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), text)

    def question(self, question: str) -> str:
        return self.render("question", question=question)

    def other_answers(self, answers: list[tuple[int, str]]) -> str:
        """Other agents' answers, numbered from 1 as a reader would."""
        return "\n\n".join(self.render("other_answer", agent=i + 1, answer=a.strip()) for i, a in answers)

    def debate(self, answers: list[tuple[int, str]]) -> str:
        return self.render("debate", other_answers=self.other_answers(answers))

    def summarize(self, question: str, answers: list[tuple[int, str]]) -> str:
        return self.render("summarize", question=question, other_answers=self.other_answers(answers))

    def debate_summary(self, summary: str) -> str:
        return self.render("debate_summary", summary=summary.strip())


@lru_cache(maxsize=64)
def _read_checked(path: Path, role: str) -> str:
    text = path.read_text(encoding="utf-8").strip() + "\n"
    missing = [name for name in ROLES[role] if "{" + name + "}" not in text]
    if missing:
        raise ConfigError(
            f"prompt template {path}: role '{role}' needs the placeholder(s) "
            + ", ".join("{" + m + "}" for m in missing)
        )
    return text.rstrip("\n")
