"""What the simulator "knows": which problem a prompt is about, its gold answer, and how to
read and compare final answers. Used both to answer chat requests and to grade training files.

The answer reading here is deliberately simple and self-contained (the harness's own grading
lives elsewhere): the simulator only has to recognise the answers it wrote itself and the
answers a debate shows it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
from dataclasses import dataclass
from typing import Sequence

from harness.records import Problem

log = logging.getLogger(__name__)

# The arithmetic task's expression a+b*c+d-e*f with non-negative integers.
_ARITH = re.compile(r"(\d+)\s*\+\s*(\d+)\s*\*\s*(\d+)\s*\+\s*(\d+)\s*-\s*(\d+)\s*\*\s*(\d+)")
_TRAILING_NUMBER = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)[\s.)*$]*$")
_INT = re.compile(r"^-?\d+$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
_LETTER = re.compile(r"^[A-J]$")


def rng_for(*parts: object) -> random.Random:
    """A private random generator for one decision, seeded from its full identity, so results
    never depend on the order in which concurrent requests arrive."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))


# ----------------------------------------------------------------------------- answer reading

def boxed_all(text: str) -> list[str]:
    """Contents of every \\boxed{...} in `text`, braces balanced, empty ones skipped."""
    out: list[str] = []
    start = 0
    while (i := text.find("\\boxed{", start)) != -1:
        j = i + len("\\boxed{")
        depth = 1
        k = j
        while k < len(text) and depth:
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
            k += 1
        if depth:  # unbalanced: nothing more to read
            break
        content = text[j : k - 1].strip()
        if content:
            out.append(content)
        start = k
    return out


def final_answer(text: str) -> str | None:
    """The last \\boxed{} answer, else a trailing number, else None (unparseable)."""
    boxes = boxed_all(text)
    if boxes:
        return boxes[-1]
    m = _TRAILING_NUMBER.search(text.strip())
    return m.group(1).replace(",", "") if m else None


def normalize(answer: str) -> str:
    """A canonical spelling, good enough to compare the simulator's own answers."""
    a = answer.strip().strip("$").strip()
    a = re.sub(r"\\text\{([^}]*)\}", r"\1", a)
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    a = a.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    a = re.sub(r"\s+", "", a).rstrip(".")
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", a):
        a = a.replace(",", "")
    if _NUMBER.match(a):
        value = float(a)
        a = str(int(value)) if value == int(value) else repr(value)
    return a


def same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalize(a) == normalize(b)


# ----------------------------------------------------------------------------- wrong answers

def wrong_answers(gold: str, key: str) -> list[str]:
    """Three distinct plausible wrong answers for `gold`, fixed by `key` (model and problem):
    a model's characteristic mistakes on a problem."""
    rng = rng_for("wrong", key)
    g = gold.strip()
    out: list[str] = []

    def add(candidate: str) -> None:
        if candidate not in out and not same(candidate, g):
            out.append(candidate)

    if _LETTER.match(g):  # multiple choice: the other options
        letters = [c for c in "ABCD" if c != g] if g in "ABCD" else [c for c in "ABCDEFGHIJ" if c != g]
        rng.shuffle(letters)
        return letters[:3]
    number = re.fullmatch(r"-?[\d,]+(\.\d+)?", g)
    digit_run = list(re.finditer(r"\d+", g))
    while len(out) < 3:
        offset = rng.choice([-10, -9, -8, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 20])
        if number and _INT.match(g.replace(",", "")):
            add(str(int(g.replace(",", "")) + offset))
        elif number:
            add(f"{float(g.replace(',', '')) + offset:g}")
        elif digit_run:  # e.g. \frac{3}{4}: change the last number in it
            m = digit_run[-1]
            add(g[: m.start()] + str(max(0, int(m.group()) + offset)) + g[m.end() :])
        else:
            add(f"{g}+{abs(offset)}")
    return out


def plausible_number(key: str) -> str:
    """The answer to a question the simulator does not know: a fixed number per key."""
    return str(rng_for("unknown", key).randint(2, 999))


# ----------------------------------------------------------------------------- problems

@dataclass(frozen=True)
class Fact:
    """What the simulator knows about the problem in a prompt."""

    key: str  # identity of the problem (for model-specific mistakes)
    gold: str | None  # None: an unknown question
    kind: str  # "known", "arithmetic" or "unknown"
    detail: str = ""  # for arithmetic: the intermediate products, used in the reasoning text


class Knowledge:
    """Finds the problem a prompt is about. Known problems are the ones passed in plus the
    tasks' bundled problems (loaded on first use, so the simulator works without them)."""

    _CACHE_MAX = 50_000

    def __init__(self, known_problems: Sequence[Problem] = ()):
        self._given = list(known_problems)
        self._problems: list[tuple[str, Problem]] | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, Fact] = {}

    def add(self, problems: Sequence[Problem]) -> None:
        with self._lock:
            self._given.extend(problems)
            self._problems = None
            self._cache.clear()

    def _index(self) -> list[tuple[str, Problem]]:
        with self._lock:
            if self._problems is None:
                problems = list(self._given) + _bundled()
                # Longest question first, so a question that contains another one wins.
                pairs = [(p.question.strip(), p) for p in problems if p.question.strip()]
                pairs.sort(key=lambda qp: -len(qp[0]))
                self._problems = pairs
            return self._problems

    def lookup(self, prompt: str) -> Fact:
        fact = self._cache.get(prompt)
        if fact is None:
            fact = self._find(prompt)
            if len(self._cache) >= self._CACHE_MAX:  # crude bound; recomputing is cheap
                self._cache.clear()
            self._cache[prompt] = fact
        return fact

    def _find(self, prompt: str) -> Fact:
        for question, problem in self._index():
            if question in prompt:
                return Fact(key=f"{problem.task}:{problem.id}", gold=problem.gold.strip(), kind="known")
        m = _ARITH.search(prompt)
        if m:
            a, b, c, d, e, f = (int(x) for x in m.groups())
            return Fact(
                key=f"arithmetic:{m.group(0)}",
                gold=str(a + b * c + d - e * f),
                kind="arithmetic",
                detail=f"{b}*{c} = {b * c} and {e}*{f} = {e * f}",
            )
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        return Fact(key=f"unknown:{digest}", gold=None, kind="unknown")


def _bundled() -> list[Problem]:
    """The tasks' bundled problems, if that module is available; tolerated when absent or broken
    so the simulator never fails because a task package is missing."""
    try:
        from harness.tasks import bundled_problems  # imported late: optional, and may be slow
    except ImportError:
        return []
    try:
        return list(bundled_problems())
    except Exception as e:  # a broken fixture must not take the simulator down
        log.warning("simulator: could not load bundled problems (%s); only arithmetic and given problems are known", e)
        return []
