"""Check a chat-format training file against OpenAI's fine-tuning rules before it is uploaded.

A bad file found here costs nothing; the same file found bad by the provider costs an upload, a
queue wait and a failed job. Every error names the file and the line, so the user can open it.

Token counts use tiktoken when it is installed *and* its encoding loads (it downloads encodings
at run time, so offline it fails); otherwise they are estimated at 4 characters per token, and
one warning says so. The totals feed the loop's cost estimate (`--dry-run`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

ALLOWED_ROLES = ("system", "user", "assistant")
# Chat formatting adds a few tokens around every message and before the reply (OpenAI's own
# counting recipe uses 3 and 3); close enough for limits and cost estimates.
_PER_MESSAGE_TOKENS = 3
_PER_EXAMPLE_TOKENS = 3
_MAX_ERRORS = 50  # a wholly broken file should not produce a megabyte of messages


class ValidationReport(BaseModel):
    path: str
    n_examples: int = 0  # non-blank lines
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    total_tokens: int = 0  # all examples, one epoch; multiply by epochs for billed tokens
    max_tokens_seen: int = 0  # the longest example
    tokens_estimated: bool = False  # True: chars/4 estimate, tiktoken unavailable
    # Fewer examples than a job accepts. Not a bug in the data: the loop keeps the agent's previous
    # model for this role and says so. The same condition is also listed in `errors`.
    too_few: bool = False
    min_examples: int = 10

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        name = Path(self.path).name
        if self.ok:
            est = " (estimated)" if self.tokens_estimated else ""
            return f"{name}: {self.n_examples} examples, {self.total_tokens} tokens{est}: ok"
        return f"{name}: {len(self.errors)} problem(s): " + "; ".join(self.errors[:3])


# ----------------------------------------------------------------------------- token counting

class _Counter:
    def __init__(self, encoding: Any | None):
        self.encoding = encoding

    @property
    def estimated(self) -> bool:
        return self.encoding is None

    def count(self, text: str) -> int:
        if self.encoding is not None:
            return len(self.encoding.encode(text, disallowed_special=()))
        return math.ceil(len(text) / 4)


_counter: _Counter | None = None
_warned = False


def _load_tiktoken() -> Any | None:
    """The encoding of current OpenAI chat models, or None. tiktoken may be missing, or present
    but unable to fetch its encoding offline; any failure means: estimate instead."""
    try:
        import tiktoken  # type: ignore[import-not-found]

        return tiktoken.get_encoding("o200k_base")
    except Exception as e:  # noqa: BLE001 - import errors, network errors, cache errors alike
        log.debug("tiktoken unavailable: %s", e)
        return None


def _get_counter() -> _Counter:
    global _counter, _warned
    if _counter is None:
        _counter = _Counter(_load_tiktoken())
    if _counter.estimated and not _warned:
        # Once per process: the loop validates several files per iteration.
        log.warning("token counts are estimates (4 characters per token): tiktoken or its encoding "
                    "is unavailable; install tiktoken with network access for exact counts")
        _warned = True
    return _counter


def count_example_tokens(messages: list[dict], counter: _Counter | None = None) -> int:
    counter = counter or _get_counter()
    total = _PER_EXAMPLE_TOKENS
    for m in messages:
        total += _PER_MESSAGE_TOKENS
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += counter.count(content)
    return total


# ----------------------------------------------------------------------------- checks

def _check_example(obj: Any) -> list[str]:
    """Problems with one parsed line, as messages without the file:line prefix."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object with a 'messages' list, got {type(obj).__name__}"]
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return ["no 'messages' list" if messages is None else
                f"'messages' must be a list, got {type(messages).__name__}"]
    if not messages:
        return ["'messages' is empty"]
    problems: list[str] = []
    assistants = trained = 0
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            problems.append(f"message {i} is not an object")
            continue
        role = m.get("role")
        if role not in ALLOWED_ROLES:
            problems.append(f"message {i} has role {role!r}; allowed: {', '.join(ALLOWED_ROLES)}")
            continue
        content = m.get("content")
        if role == "assistant":
            assistants += 1
            if not isinstance(content, str) or not content.strip():
                problems.append(f"message {i} (assistant) has {'no' if content is None else 'empty'} content")
        elif not isinstance(content, str):
            problems.append(f"message {i} ({role}) content must be a string")
        if "weight" in m:
            w = m["weight"]
            if role != "assistant":
                problems.append(f"message {i} ({role}) has a 'weight'; only assistant messages may")
            elif isinstance(w, bool) or w not in (0, 1):
                problems.append(f"message {i} has weight {w!r}; allowed: 0 or 1")
            elif w == 1:
                trained += 1
        elif role == "assistant":
            trained += 1
    if assistants == 0:
        problems.append("no assistant message")
    elif trained == 0 and not problems:
        problems.append("every assistant message has weight 0: nothing to train on")
    return problems


def validate_training_file(path: Path, *, min_examples: int = 10,
                           max_example_tokens: int = 65536) -> ValidationReport:
    """Check every line of a chat JSONL training file; never raises for bad content."""
    path = Path(path)
    report = ValidationReport(path=str(path), min_examples=min_examples)
    name = path.name
    if not path.is_file():
        report.errors.append(f"{name}: file does not exist ({path})")
        return report
    counter = _get_counter()
    report.tokens_estimated = counter.estimated
    if counter.estimated:
        report.warnings.append("token counts are estimates (4 characters per token)")
    errors: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a trailing blank line is harmless
            report.n_examples += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{name}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            problems = _check_example(obj)
            errors.extend(f"{name}:{lineno}: {p}" for p in problems)
            if problems:
                continue
            n_tokens = count_example_tokens(obj["messages"], counter)
            report.total_tokens += n_tokens
            report.max_tokens_seen = max(report.max_tokens_seen, n_tokens)
            if n_tokens > max_example_tokens:
                approx = "about " if counter.estimated else ""
                errors.append(f"{name}:{lineno}: example has {approx}{n_tokens} tokens, over the "
                              f"limit of {max_example_tokens}; it would be rejected (shorten it or drop it)")
    if len(errors) > _MAX_ERRORS:
        errors = errors[:_MAX_ERRORS] + [f"{name}: ... and {len(errors) - _MAX_ERRORS} more problems"]
    report.errors.extend(errors)
    if report.n_examples < min_examples:
        report.too_few = True
        report.errors.append(
            f"{name}: {report.n_examples} example(s), fewer than the {min_examples} a fine-tuning job "
            f"needs; this agent keeps its previous model for this role")
    return report
