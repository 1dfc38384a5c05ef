"""Math-Verify's own regression cases, run against this harness's grader as a peer suite.

tests/fixtures/math_verify_cases.json holds the (gold, prediction, expected) triples of
Math-Verify's parametrized tests, as data (its "source" field names the repository and commit).
Math-Verify grades a gold against a prediction, one way, often from free text; the harness
grades two extracted final answers, symmetrically (the vote groups answers, neither is the gold),
after pulling each out of its `\\boxed{}`. So the suite runs the cases this grader can see:
- with Math-Verify's default options (6-decimal precision, strict, no set-vs-relation rule);
- each side taken as the harness would take it: a `\\boxed{}` answer's content, else the string
  with its `$...$` stripped;
- "answer-shaped" sides only: a side with an English word of four letters or more is a model's
  prose, whose answer the harness would have taken from a `\\boxed{}` (Math-Verify's own
  extraction from prose is not what is compared here; those cases are counted, not asserted).
Agreement on the rest must stay at least AGREEMENT, and every disagreement is one listed in
KNOWN with why; one that is no longer a disagreement must be taken off the list.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness.grading import _strip_answer, equivalent, extract_answer

CASES = json.loads((Path(__file__).parent / "fixtures" / "math_verify_cases.json").read_text(encoding="utf-8"))

_LIST = "one answer of a list or set counts for the whole in Math-Verify (its gold may list several " \
        "solutions); two answers that are equivalent to each other must not be a list and one of its items"
KNOWN = {
    # Decimal commas: "1000,99" is 1000.99 to Math-Verify; here a comma between digits is a
    # thousands separator or a list, as in the answers models write in English.
    "test_number_extraction[5]": "decimal comma",
    "test_number_extraction[6]": "decimal comma",
    "test_number_extraction[17]": "decimal comma",
    "test_number_extraction[16]": "prose with units around the number (short words): an extraction test",
    "test_percent_notation[1]": "'pct' as a percent sign",
    "test_percent_notation[6]": "'pct' as a percent sign",
    # Deliberate: an ordered pair (or open interval) is not a set (issue 16).
    "test_math_extraction_additional_cases[7]": "(1,3) vs {1,3}: a pair is not a set",
    "test_math_extraction_additional_cases[17]": "prose: Math-Verify takes 'The final answer is 10,455', "
                                                 "the harness the last \\boxed{} (255)",
    "test_numina_cases[24]": "the gold's \\boxed{ is never closed: no answer to extract",
    # Math-Verify's set-vs-relation rule is one-way (gold x in [-2,7] vs predicted -2 <= x <= 7 is
    # not equal, the reverse is); a symmetric grader gives both orders one verdict.
    "test_set_rel_assymetry[3]": "one-way rule; symmetric here",
    **{case: _LIST for case in [
        "test_math_extraction_additional_cases[27]", "test_math_extraction_additional_cases[28]", "test_boxed[0]",
        "test_numina_cases[12]", "test_numina_cases[13]", "test_open_thoughts[0]", "test_open_thoughts[12]",
        "test_open_thoughts[13]", "test_open_thoughts[14]", "test_open_thoughts[16]", "test_open_thoughts[18]",
        "test_open_thoughts[19]", "test_open_thoughts[23]", "test_open_thoughts[24]", "test_open_thoughts[25]",
        "test_open_thoughts[26]", "test_open_thoughts[27]"]},
}
AGREEMENT = 175 / 202  # reached here with math-verify 0.9.0 (170 / 202 before the fixes of issue 16)

_PROSE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{4,}")


def default_options(case: dict) -> bool:
    s = case.get("settings", {})
    return s.get("precision", 6) == 6 and s.get("strict", True) and not s.get("allow_set_relation_comp", False)


def as_answer(text: str) -> str | None:
    return extract_answer(text) if ("\\boxed" in text or "\\fbox" in text) else _strip_answer(text)


def prose(answer: str | None) -> bool:
    return bool(_PROSE.search(re.sub(r"\\(?:text|mathrm)\{[^}]*\}", "", answer or "")))


def test_the_grader_agrees_with_math_verify_on_its_own_regression_cases():
    answer_shaped, disagree, prose_agree, prose_n = 0, {}, 0, 0
    for case in filter(default_options, CASES["cases"]):
        gold, pred = as_answer(case["gold"]), as_answer(case["pred"])
        ours = equivalent(gold, pred, timeout_s=10)
        if prose(gold) or prose(pred):
            prose_n, prose_agree = prose_n + 1, prose_agree + (ours == case["expected"])
            continue
        answer_shaped += 1
        if ours != case["expected"]:
            disagree[case["id"]] = f"ours {ours}, Math-Verify {case['expected']}: {gold!r} vs {pred!r}"
    print(f"agreement with Math-Verify: {answer_shaped - len(disagree)}/{answer_shaped} answer-shaped cases; "
          f"prose (not asserted) {prose_agree}/{prose_n}")
    new = {k: v for k, v in disagree.items() if k not in KNOWN}
    assert not new, f"new disagreements with Math-Verify: {new}"
    assert not set(KNOWN) - set(disagree), f"no longer disagreements, take them off KNOWN: {set(KNOWN) - set(disagree)}"
    assert answer_shaped == 202 and (answer_shaped - len(disagree)) / answer_shaped >= AGREEMENT


def test_the_false_equals_it_found_stay_fixed():
    """Pairs Math-Verify's cases showed this grader called equal (asked both ways, Math-Verify's
    one-way rules made them so): an equation and one of its sides, a list and a number, a pair
    and a set written with bare braces."""
    for a, b in [("7 = 11a+c", "11a+c"), ("a +3z = 0", "0"), ("2x + z = 1", "1"), ("a^2 + b = 0", "0"),
                 ("32349", "32, 349"), ("(3,1)", "{1,3}")]:
        assert not equivalent(a, b) and not equivalent(b, a), (a, b)
    # ... while an equation that only names its answer still equals it, and a thousands separator stays one.
    for a, b in [("x = 5", "5"), ("f(x)=1", "1"), ("|AB|=1", "1"), ("32,349", "32349"), ("1, 2", "1,2")]:
        assert equivalent(a, b) and equivalent(b, a), (a, b)
