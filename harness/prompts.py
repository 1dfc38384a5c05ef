"""Prompt templates: plain text files in `harness/resources/prompts/` (`prompts/` below), one per
task and role, loaded by name. They live inside the package, read through importlib.resources,
so an installed wheel has them too (a top-level `prompts/` folder was left out of the wheel).

Two prompt sets ship with the harness (`task.prompt_set`):
- `harness` (default): `prompts/<task>/<role>.txt`, falling back to `prompts/default/<role>.txt`;
  other agents are shown in order, numbered ("Agent 2 wrote: ...").
- `authors`: the authors' own prompts, word for word (prompts/authors/README.md says where each
  comes from): `prompts/authors/<task>/<role>.txt`, falling back to `prompts/authors/default/`
  and then to the harness's `prompts/default/` for a role the authors never wrote. Other agents
  are anonymous, shuffled and at most 5 for MATH, as in the authors' code (harness.debate does
  that); for GSM8K and arithmetic their code shows every other agent in agent order, and so
  does this set.
A user's `task.prompts_dir/<role>.txt` overrides either set.

A template is the file's exact text less its final line break (leading and trailing spaces
count: the authors' strings have some). Placeholders are `{name}` with a lowercase name; each
role accepts the ones in ROLES and must contain those in REQUIRED. Any other `{name}` is an
error naming the file (a typo such as `{agnet}` is never sent to the model); write `{{name}}`
for a literal `{name}` (as in `\\boxed{{answer}}`, which renders `\\boxed{answer}`). All other
braces are literal, so LaTeX such as `\\boxed{}` or `\\frac{1}{2}` needs no escaping (which is
why this is not `str.format`). Values are inserted once: a `{question}` inside a model's answer
stays as the model wrote it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from harness.errors import ConfigError

# An installed wheel is unpacked, so this is a real folder; Traversable keeps zip imports working too.
PROMPTS_DIR: Traversable = resources.files("harness") / "resources" / "prompts"

# role -> the placeholders it may use
ROLES: dict[str, tuple[str, ...]] = {
    "question": ("question",),  # round 0: the task prompt
    "debate": ("other_answers", "question"),  # round m >= 1, concatenate mode
    "other_answer": ("answer", "agent"),  # one other agent's answer inside {other_answers}; agent numbered from 1
    "summarize": ("other_answers", "question"),  # the summarizer's request
    # one answer inside the summarizer's {other_answers}; a set without this file uses other_answer
    "summarize_answer": ("answer", "agent"),
    "debate_summary": ("summary", "question"),  # round m >= 1, summarize mode
    "star_hint": ("question", "answer"),  # STaR rationalization: the task prompt as sent, and the gold answer
}
# role -> the placeholders it must contain: without them the role cannot do its job
REQUIRED: dict[str, tuple[str, ...]] = {
    "question": ("question",),
    "debate": ("other_answers",),
    "other_answer": ("answer",),
    "summarize": ("other_answers",),
    "summarize_answer": ("answer",),
    "debate_summary": ("summary",),
    "star_hint": ("question", "answer"),
}
# roles a set may leave out, and the role used instead
OPTIONAL: dict[str, str] = {"summarize_answer": "other_answer"}


@dataclass(frozen=True)
class PromptSet:
    """A named set of templates and how it shows the other agents' answers."""

    name: str
    folders: tuple[str, ...]  # under prompts/, searched in order; "{task}" is the task's name
    tasks: tuple[str, ...] | None  # the tasks it has prompts for; None: every task
    joiner: str  # between two answers inside {other_answers}
    strip: bool  # strip surrounding whitespace from answers and summaries before inserting them
    shuffle_others: bool  # others in a seeded random order (per problem, agent and round)
    max_others: int | None  # show at most this many others
    # Tasks whose others are shown all and in agent order whatever shuffle_others/max_others say.
    ordered_tasks: tuple[str, ...] = ()


PROMPT_SETS: dict[str, PromptSet] = {
    "harness": PromptSet("harness", ("{task}", "default"), None, "\n\n", True, False, None),
    # The authors' MATH code (multiagent-ft original_gen.py) shuffles the other agents, shows at
    # most 5 and inserts their responses as they are; each response template starts with its own
    # "\n\n", hence no joiner. Their GSM8K and arithmetic code (llm_multiagent_debate gen_gsm.py,
    # gen_math.py) neither shuffles nor caps: every other agent, in agent order.
    "authors": PromptSet("authors", ("authors/{task}", "authors/default", "default"),
                         ("arithmetic", "gsm8k", "math"), "", False, True, 5, ("arithmetic", "gsm8k")),
}

# `{{name}}` (a literal `{name}`) or `{name}` (a placeholder).
_TOKEN = re.compile(r"\{\{([a-z_][a-z0-9_]*)\}\}|\{([a-z_][a-z0-9_]*)\}")


class Prompts:
    """The templates of one task and prompt set, resolved once per run."""

    def __init__(self, task: str, user_dir: str | Path | None = None, prompt_set: str = "harness"):
        self.task = task
        self.user_dir = Path(user_dir) if user_dir else None
        if prompt_set not in PROMPT_SETS:
            raise ConfigError(f"task.prompt_set: unknown prompt set {prompt_set!r}; known: {', '.join(PROMPT_SETS)}")
        self.set = PROMPT_SETS[prompt_set]
        if task in self.set.ordered_tasks:
            self.set = replace(self.set, shuffle_others=False, max_others=None)
        if self.set.tasks is not None and task not in self.set.tasks:
            raise ConfigError(f"task.prompt_set: the {prompt_set!r} prompts exist for {', '.join(self.set.tasks)} "
                              f"only, not {task!r}; use task.prompt_set=harness (or task.prompts_dir) for {task}")
        if self.user_dir is not None and not self.user_dir.is_dir():
            raise ConfigError(f"task.prompts_dir: {self.user_dir} is not a directory")
        self.templates: dict[str, str] = {}
        self.paths: dict[str, Path | Traversable] = {}  # where each role's template came from
        for role in ROLES:
            found = self._find(role)
            if found is None and role in OPTIONAL:
                continue
            if found is None:
                raise ConfigError(f"no prompt template for role '{role}' (looked in "
                                  f"{', '.join(map(str, self._candidates(role)))})")
            self.paths[role], self.templates[role] = found, read_template(found, role)
        for role, instead in OPTIONAL.items():
            if role not in self.templates:
                self.templates[role], self.paths[role] = self.templates[instead], self.paths[instead]

    def _candidates(self, role: str) -> list[Path | Traversable]:
        out: list[Path | Traversable] = [self.user_dir / f"{role}.txt"] if self.user_dir is not None else []
        return out + [PROMPTS_DIR.joinpath(*folder.format(task=self.task).split("/"), f"{role}.txt")
                      for folder in self.set.folders]

    def _find(self, role: str) -> Path | Traversable | None:
        return next((p for p in self._candidates(role) if p.is_file()), None)

    def render(self, role: str, **values: object) -> str:
        def sub(m: re.Match) -> str:
            if m.group(1) is not None:
                return "{" + m.group(1) + "}"
            return str(values[m.group(2)])  # read_template allowed only this role's names

        missing = sorted({m.group(2) for m in _TOKEN.finditer(self.templates[role])
                          if m.group(2) is not None and m.group(2) not in values})
        if missing:  # a caller bug, never a user's: the loader checked the names
            raise ValueError(f"prompt role '{role}' needs values for {', '.join(missing)}")
        return _TOKEN.sub(sub, self.templates[role])

    def _text(self, s: str) -> str:
        return s.strip() if self.set.strip else s

    def _answers(self, role: str, answers: list[tuple[int, str]]) -> str:
        """Other agents' answers, numbered from 1 as a reader would (for templates with {agent})."""
        return self.set.joiner.join(self.render(role, agent=i + 1, answer=self._text(a)) for i, a in answers)

    def question(self, question: str) -> str:
        return self.render("question", question=question)

    def other_answers(self, answers: list[tuple[int, str]]) -> str:
        return self._answers("other_answer", answers)

    def debate(self, answers: list[tuple[int, str]], *, question: str) -> str:
        return self.render("debate", other_answers=self.other_answers(answers), question=question)

    def summarize(self, question: str, answers: list[tuple[int, str]]) -> str:
        return self.render("summarize", question=question, other_answers=self._answers("summarize_answer", answers))

    def debate_summary(self, summary: str, *, question: str) -> str:
        return self.render("debate_summary", summary=self._text(summary), question=question)


def read_template(path: Path | Traversable | str, role: str) -> str:
    """The template in `path` for `role`, checked (see the module docstring)."""
    return _read_checked(Path(path) if isinstance(path, str) else path, role)


@lru_cache(maxsize=128)
def _read_checked(path: Path | Traversable, role: str) -> str:
    text = path.read_text(encoding="utf-8")
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    used = {m.group(2) for m in _TOKEN.finditer(text) if m.group(2) is not None}
    unknown = sorted(used - set(ROLES[role]))
    if unknown:
        raise ConfigError(
            f"prompt template {path}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} for role "
            f"'{role}'; it may use {', '.join('{' + n + '}' for n in ROLES[role])}. A typo? For a literal "
            f"brace-enclosed word write it doubled, e.g. {{{{{unknown[0]}}}}}")
    missing = [n for n in REQUIRED.get(role, ()) if n not in used]
    if missing:
        raise ConfigError(f"prompt template {path}: role '{role}' needs the placeholder(s) "
                          + ", ".join("{" + m + "}" for m in missing))
    return text
