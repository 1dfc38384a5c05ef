"""Final-answer extraction, mathematical equivalence with a hard timeout, and majority vote.

`equivalent` is called very often (every agent answer against every vote class and the gold
answer), from the asyncio event-loop thread and from worker threads, so it is built in layers:

1. a memo of earlier results (answers repeat a lot across agents and rounds);
2. a hand-written fast path for plain numbers, fractions and identical strings, which covers
   the common arithmetic / GSM8K case without any symbolic algebra;
3. math-verify (parse + verify) in a small pool of helper processes, with a hard timeout.

Why helper processes: math-verify's own timeout uses signal.alarm, which only works in the main
thread (it raises ValueError elsewhere), and a signal cannot interrupt a long computation inside
C code anyway (e.g. the big-integer power behind 10^{10^{10^{10}}}). A process can always be
killed, from any thread. A worker that overruns is killed and replaced on next use, and the
pair counts as not equivalent. Pool size: min(2, CPUs), or the HARNESS_GRADING_WORKERS
environment variable. Helpers exit when their parent does (their stdin closes).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from fractions import Fraction
from typing import Sequence

from harness.records import Vote, VoteClass

log = logging.getLogger(__name__)

TIE_RULE = "lowest-agent-index"  # among classes tied for the top count, the one whose earliest agent is lowest

# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_NUMBER_RE = re.compile(
    # a sign only when it is not a binary minus (not right after a digit, letter or bracket)
    r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w)\]}])-)?\.\d+"
)


def _strip_answer(s: str) -> str:
    s = s.strip()
    # Surrounding math delimiters: $...$, $$...$$, \(...\), \[...\]
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...} / `\\boxed 5`, in order; an unclosed box is skipped."""
    out = []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\":  # an escaped brace (\{ or \}) does not open or close a group
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        out.append(text[i + 1 : j])
                        break
                j += 1
        else:
            # "\boxed 5" (TeX's unbraced argument): the token up to whitespace or a closing $
            tok = re.match(r"[^\s${}]+", text[i:])
            if tok:
                out.append(tok.group(0))
    return out


def extract_answer(text: str, *, allow_plain_number: bool = False) -> str | None:
    """The content of the last \\boxed{} (or \\fbox{}); else, if allowed, the last number in the
    text; else None. Surrounding $...$ and whitespace are stripped."""
    if not text:
        return None
    for content in reversed(_boxed_contents(text)):
        s = _strip_answer(content)
        if s:
            return s
    if allow_plain_number:
        nums = _NUMBER_RE.findall(text.replace("\u2212", "-"))  # models often write U+2212 for minus
        if nums:
            return nums[-1].replace(",", "")
    return None


# ----------------------------------------------------------------------------- fast path

_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH_RE = re.compile(r"^(-?\d+)/(-?\d+)$")
_DEC_RE = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# A trailing percent sign: %, \% (also JSON-doubled \\%), "percent", \text{percent}.
_PERCENT_RE = re.compile(r"(?:\\*%|\\(?:text|mathrm)\{percent\}|percent)$")


# TeX spacing and sizing commands that carry no meaning: \left, \right, \, \! \; \: and "\ ".
# The row separator `\\` is matched first, as one token, and kept: otherwise its second
# backslash and a following space would read as "\ " and be dropped, turning
# `\begin{pmatrix} 1 \\ 2 \end{pmatrix}` into `...1\2...`, unequal to the same matrix written
# without spaces.
_TEX_NOISE_RE = re.compile(r"\\\\|\\left|\\right|\\[,!;:]|\\\s")


def _normalize(s: str) -> str:
    s = _strip_answer(s)
    s = _TEX_NOISE_RE.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else "", s)
    s = re.sub(r"\s+", "", s.replace("\\$", "").replace("−", "-"))
    # math-verify reads "10\%" as 10 or 0.1 by direction, making "10" ~ "10\%" ~ "0.1" (votes then
    # depend on agent order); dropping the sign keeps equivalence transitive and on the fast path.
    return _PERCENT_RE.sub("", s)


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, written as a decimal?) for a plain number, "1,000", "1/2" or "\\frac{1}{2}"."""
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _DEC_RE.match(s):
        return Fraction(s), "." in s
    m = _SLASH_RE.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2))), False
    m = _FRAC_RE.match(s)
    if m and int(m.group(3)) != 0:
        v = Fraction(int(m.group(2)), int(m.group(3)))
        return (-v if m.group(1) else v), False
    return None


def _enclosed(s: str, left: str, right: str) -> str | None:
    """The inside of `s` when `left` opens it and its matching `right` closes it at the very end
    (so "(1,2)" is enclosed, "(1)+(2)" is not); else None."""
    if not (s.startswith(left) and s.endswith(right)) or len(s) < len(left) + len(right):
        return None
    depth, i = 0, 0
    while i < len(s):
        if s.startswith(left, i):
            depth, i = depth + 1, i + len(left)
            continue
        if s.startswith(right, i):
            depth, i = depth - 1, i + len(right)
            if depth == 0:
                return s[len(left):-len(right)] if i == len(s) else None
            continue
        i += 1
    return None


def _top_level_comma(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            return True
    return False


def _shape(s: str) -> str | None:
    """"set" for \\{...\\} (or {x, y, ...}, as models write sets), "tuple" for (x, y, ...): a
    normalized answer's container, or None."""
    if _enclosed(s, "\\{", "\\}") is not None:
        return "set"
    braced = _enclosed(s, "{", "}")
    if braced is not None and _top_level_comma(braced):
        return "set"
    inner = _enclosed(s, "(", ")")
    return "tuple" if inner is not None and _top_level_comma(inner) else None


_OTHER_RELATION_RE = re.compile(r"\\(?:le|ge|leq|geq|neq|ne|lt|gt)(?![a-zA-Z])|[<>!,]")


def _names_a_quantity(lhs: str) -> bool:
    """Whether an equation's left side only names what its right side gives (x, f(x), |AB|,
    V_1:V_2, \\frac{NO}{BO}) rather than being an expression to solve (a+3z, 7): a sum or a
    number makes the equation a condition, not an answer."""
    return not re.search(r"[+-]", lhs) and _as_number(lhs) is None


def _equation_lhs(s: str) -> str | None:
    """The left side of `s` when it is one equation lhs=rhs (no other relation, no list)."""
    if s.count("=") != 1 or _OTHER_RELATION_RE.search(s):
        return None
    return s.split("=")[0]


def _fast(a: str, b: str) -> bool | None:
    """Decide cheaply when possible; None means: ask math-verify."""
    if a == b:
        return True
    # An ordered pair is not the set of its elements: math-verify accepts a tuple prediction for a
    # set gold ((3,1) for \{1,3\}) and reads (1,3) as the open interval, equal to \{1,3\} too;
    # as a symmetric equivalence that would make a pair equal to a set and so to its reversed pair.
    if {_shape(a), _shape(b)} == {"set", "tuple"}:
        return False
    # An equation is not one of its sides: math-verify compares a gold value with the right side of
    # a predicted equation, so asked both ways "a+3z=0" would equal "0". "x=5" or "f(x)=1" (a left
    # side that only names the answer) still goes to math-verify, which reads it as its value.
    la, lb = _equation_lhs(a), _equation_lhs(b)
    if (la is None) != (lb is None) and not _names_a_quantity(la if la is not None else lb):
        return False
    na, nb = _as_number(a), _as_number(b)
    if na is not None and nb is not None:
        if na[0] == nb[0]:
            return True
        # math-verify treats a rounded decimal as equal to the exact value (0.333333 == 1/3,
        # 6 decimal places); keep that rule so both paths agree.
        if na[1] or nb[1]:
            return round(na[0], 6) == round(nb[0], 6)
        return False
    # Two different single letters (multiple-choice answers) or a letter and a number.
    atom = re.compile(r"^(?:[A-Za-z]|-?\d+(?:\.\d+)?)$")
    if atom.match(a) and atom.match(b):
        return a.lower() == b.lower() if a.isalpha() and b.isalpha() else False
    return None


# ----------------------------------------------------------------------------- helper processes

_WORKER_CODE = "from harness.grading import _worker_main; _worker_main()"
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not counted against a call's timeout


def _worker_main() -> None:
    """Helper process: read {"a","b"} JSON lines on stdin, answer "1"/"0" (or "E" on error)."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing a library prints can corrupt the protocol channel
    logging.disable(logging.CRITICAL)  # math-verify warns that its own timeout is off: we kill instead
    from math_verify import parse, verify

    out.write("ready\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            pa = parse(f"${req['a']}$", parsing_timeout=None)
            pb = parse(f"${req['b']}$", parsing_timeout=None)
            # verify() is asymmetric (gold vs prediction); equivalence here is symmetric.
            ok = bool(pa and pb and (verify(pa, pb, timeout_seconds=None) or verify(pb, pa, timeout_seconds=None)))
            out.write("1\n" if ok else "0\n")
        except Exception:  # noqa: BLE001 - an unparseable answer is simply not equivalent
            out.write("E\n")


class _Worker:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def ensure_started(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        env = dict(os.environ)
        # the child must import this same `harness`, also when it is not installed
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
        )
        if self._readline(self.proc, _STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError(
                "the math-verify helper process did not start; check that math-verify is installed "
                f"(run: {sys.executable} -c 'import math_verify')"
            )

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout_s: float) -> str | None:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], timeout_s)[0]:
            return None
        line = proc.stdout.readline()  # one short reply line per request: never blocks here
        return line.strip() if line else None

    def ask(self, a: str, b: str, timeout_s: float) -> bool | None:
        """True/False, or None on timeout or a dead helper (which is then killed)."""
        proc = self.proc
        try:
            assert proc is not None and proc.stdin is not None
            proc.stdin.write(json.dumps({"a": a, "b": b}) + "\n")
            proc.stdin.flush()
            reply = self._readline(proc, timeout_s)
        except (AssertionError, OSError, ValueError):  # pipe closed under us (exit, crash)
            reply = None
        if reply is None:
            self.kill()
            return None
        return reply == "1"

    def kill(self) -> None:
        # take the handle first: shutdown at exit may race a background restart
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001
                pass


class _Pool:
    """A few persistent helpers; a caller takes an idle one, so any thread can use the pool."""

    def __init__(self, size: int) -> None:
        self.workers = [_Worker() for _ in range(size)]
        self.idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        for w in self.workers:
            self.idle.put(w)

    def ask(self, a: str, b: str, timeout_s: float) -> bool | None:
        w = self.idle.get()
        try:
            w.ensure_started()
            reply = w.ask(a, b, timeout_s)
        except BaseException:
            self.idle.put(w)
            raise
        if w.proc is None:
            # killed after a timeout: restart it in the background so that the next caller
            # does not pay the start-up time; the other helpers keep serving meanwhile
            threading.Thread(target=self._restart, args=(w,), daemon=True).start()
        else:
            self.idle.put(w)
        return reply

    def _restart(self, w: _Worker) -> None:
        try:
            w.ensure_started()
        except Exception:  # noqa: BLE001 - the next caller retries and sees the error
            pass
        finally:
            self.idle.put(w)

    def warm_up(self) -> None:
        for _ in range(len(self.workers)):
            try:
                w = self.idle.get_nowait()  # never blocks: busy helpers are already running
            except queue.Empty:
                return
            threading.Thread(target=self._restart, args=(w,), daemon=True).start()

    def close(self) -> None:
        for w in self.workers:
            w.kill()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None:
            size = int(os.environ.get("HARNESS_GRADING_WORKERS", "0")) or min(2, os.cpu_count() or 1)
            _pool = _Pool(max(1, size))
            atexit.register(_pool.close)
        return _pool


def warm_up() -> None:
    """Start the helper processes in the background (about a second each), so that the first
    symbolic comparison does not wait for them. Optional."""
    _get_pool().warm_up()


def shutdown() -> None:
    """Stop the helper processes (they also stop at interpreter exit)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


# ----------------------------------------------------------------------------- equivalence

_SPACED_LIST_RE = re.compile(r"\d,\s+\d")
_MEMO_MAX = 200_000
_memo: OrderedDict[tuple[str, str], tuple[bool, float | None]] = OrderedDict()
_memo_lock = threading.Lock()


def equivalent(a: str | None, b: str | None, *, timeout_s: float = 5.0) -> bool:
    """Whether two final answers are mathematically equivalent. None never equals anything.

    A comparison that runs past `timeout_s` counts as not equivalent. Blocking (up to the
    timeout) only for answers that need symbolic algebra; call it via asyncio.to_thread when
    the event loop must stay responsive."""
    na, nb = _normalize(a or ""), _normalize(b or "")  # None (unparseable) never equals anything
    if not na or not nb:
        return False
    # "32, 349" is a list of two numbers (math-verify reads it so), not 32,349 with a thousands
    # separator; normalizing drops the space, so tell them apart here.
    spaced_a, spaced_b = bool(_SPACED_LIST_RE.search(a or "")), bool(_SPACED_LIST_RE.search(b or ""))
    if spaced_a != spaced_b and _as_number(nb if spaced_a else na) is not None:
        return False
    fast = _fast(na, nb)
    if fast is not None:
        return fast
    key = (na, nb) if na <= nb else (nb, na)
    with _memo_lock:
        hit = _memo.get(key)
        if hit is not None:
            result, timed_out_at = hit
            # a timeout under a shorter limit is retried when the caller allows more time
            if timed_out_at is None or timed_out_at >= timeout_s:
                _memo.move_to_end(key)
                return result
    t0 = time.monotonic()
    reply = _get_pool().ask(key[0], key[1], timeout_s)
    if reply is None:
        log.warning("answer comparison timed out after %.1fs (counted as not equal): %.80r vs %.80r",
                    time.monotonic() - t0, key[0], key[1])
    with _memo_lock:
        _memo[key] = (bool(reply), timeout_s if reply is None else None)
        if len(_memo) > _MEMO_MAX:
            _memo.popitem(last=False)
    return bool(reply)


# ----------------------------------------------------------------------------- majority vote

def majority_vote(answers: Sequence[str | None], *, timeout_s: float = 5.0) -> Vote:
    """Majority of the agents' parsed answers, grouped by mathematical equivalence.

    An answer joins the first class whose representative (its first member's answer) it is
    equivalent to. Unparseable (None) answers do not vote. Ties go to the class whose earliest
    member has the lowest agent index; `tie` records whether that rule was needed."""
    classes: list[VoteClass] = []
    for agent, ans in enumerate(answers):
        if ans is None:
            continue
        for c in classes:
            if equivalent(c.answer, ans, timeout_s=timeout_s):
                c.agents.append(agent)
                break
        else:
            classes.append(VoteClass(answer=ans, agents=[agent]))
    if not classes:
        return Vote(answer=None, count=0, n_voters=0, classes=[], tie=False, tie_rule=TIE_RULE)
    n_voters = sum(len(c.agents) for c in classes)
    top = max(len(c.agents) for c in classes)
    leaders = [c for c in classes if len(c.agents) == top]
    # classes are created in order of their earliest agent, so the first leader wins the tie
    return Vote(answer=leaders[0].answer, count=top, n_voters=n_voters, classes=classes,
                tie=len(leaders) > 1, tie_rule=TIE_RULE)
