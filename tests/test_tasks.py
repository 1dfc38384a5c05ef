"""Task loading: seeded disjoint splits, local JSONL / Parquet files, filters and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import TaskConfig
from harness.errors import DataError
from harness.tasks import bundled_problems, get_task, load_split

GSM_ROWS = [
    {"question": f"Ada has {i} apples and buys {i + 3} more. How many apples does she have?",
     "answer": f"She has {i} + {i + 3} = {2 * i + 3} apples.\n#### {2 * i + 3:,}"}
    for i in range(1, 41)
]
MATH_ROWS = [
    {"problem": f"Compute ${i} \\cdot 3$.", "solution": f"We get $\\boxed{{{3 * i}}}$.",
     "level": f"Level {1 + i % 5}", "type": "Prealgebra"}
    for i in range(1, 41)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cfg(**kw) -> TaskConfig:
    return TaskConfig(**kw)


def both(c: TaskConfig):
    return load_split(c, "train"), load_split(c, "test")


# ----------------------------------------------------------------------------- arithmetic

def test_arithmetic_gold_and_question_form():
    probs = load_split(cfg(n_train=50, n_test=50), "test")
    assert len(probs) == 50
    for p in probs:
        expr = p.question.removeprefix("What is the result of ").removesuffix("?")
        a, b, c, d, e, f = map(int, expr.replace("+", " ").replace("*", " ").replace("-", " ").split())
        assert expr == f"{a}+{b}*{c}+{d}-{e}*{f}"
        assert all(0 <= x <= 29 for x in (a, b, c, d, e, f))
        assert int(p.gold) == a + b * c + d - e * f


def test_arithmetic_disjoint_and_deterministic():
    c = cfg(n_train=300, n_test=300, seed=3)
    train, test = both(c)
    assert len(train) == 300 and len(test) == 300
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.id for p in train}) == 300 and len({p.id for p in test}) == 300
    assert both(c) == (train, test)
    other_train, other_test = both(cfg(n_train=300, n_test=300, seed=4))
    assert [p.id for p in other_test] != [p.id for p in test]


def test_arithmetic_ladder_of_difficulty():
    """Fewer terms, a smaller range, other operators: still seeded, disjoint and correctly graded."""
    from harness.config import ArithmeticConfig

    easy = ArithmeticConfig(terms=2, low=0, high=9, operators="+")
    c = cfg(n_train=40, n_test=40, seed=5, arithmetic=easy)
    train, test = both(c)
    assert not {p.question for p in train} & {p.question for p in test}
    for p in train + test:
        a, b = map(int, p.question.removeprefix("What is the result of ").removesuffix("?").split("+"))
        assert 0 <= a <= 9 and 0 <= b <= 9 and int(p.gold) == a + b
    assert both(c) == (train, test)

    mixed = ArithmeticConfig(terms=4, low=1, high=20, operators="+-*", random_operators=True)
    probs = load_split(cfg(n_train=0, n_test=200, arithmetic=mixed), "test")
    ops = {ch for p in probs for ch in p.meta["expression"] if ch in "+-*"}
    assert ops == {"+", "-", "*"}
    for p in probs:
        assert int(p.gold) == eval(p.meta["expression"])  # noqa: S307 - the test's reference evaluator
    assert len({p.id for p in probs}) == 200


def test_arithmetic_form_errors_name_the_field():
    from harness.config import load_config
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="task.arithmetic.*need 2"):
        load_config("demo", ["task.arithmetic.terms=3", "task.arithmetic.operators=+"])
    with pytest.raises(ConfigError, match="only 100 distinct"):
        load_split(cfg(n_train=80, n_test=80, arithmetic={"terms": 2, "high": 9, "operators": "+"}), "train")


def test_arithmetic_extracts_plain_numbers():
    task = get_task("arithmetic")
    assert task.allow_plain_number
    assert task.extract("12+5*3+7-2*9 = 34-18 = 16") == "16"
    assert task.extract(r"so \boxed{16}") == "16"


# ----------------------------------------------------------------------------- local files

@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_gsm8k_local_train_and_test_files(tmp_path, fmt):
    write = write_jsonl if fmt == "jsonl" else write_parquet
    train_file = write(tmp_path / f"train.{fmt}", GSM_ROWS[:30])
    test_file = write(tmp_path / f"test.{fmt}", GSM_ROWS[25:])  # 5 questions overlap
    c = cfg(name="gsm8k", source=str(train_file), test_source=str(test_file), n_train=100, n_test=10)
    train, test = both(c)
    assert len(test) == 10
    assert len(train) == 25  # the overlapping questions are held out of training
    assert not {p.question for p in train} & {p.question for p in test}
    first = next(p for p in train + test if p.question == GSM_ROWS[0]["question"])
    assert first.gold == "5"
    assert {p.gold for p in test} <= {str(2 * i + 3) for i in range(26, 41)}
    assert both(c) == (train, test)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_one_file_is_split_disjointly_by_seed(tmp_path, fmt):
    write = write_jsonl if fmt == "jsonl" else write_parquet
    path = write(tmp_path / f"all.{fmt}", GSM_ROWS)
    c = cfg(name="gsm8k", source=str(path), n_train=20, n_test=15, seed=1)
    train, test = both(c)
    assert len(train) == 20 and len(test) == 15
    assert not {p.id for p in train} & {p.id for p in test}
    assert both(c) == (train, test)
    _, other_test = both(cfg(name="gsm8k", source=str(path), n_train=20, n_test=15, seed=2))
    assert {p.id for p in other_test} != {p.id for p in test}


def test_too_few_problems_takes_all_and_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "all.jsonl", GSM_ROWS[:10])
    train, test = both(cfg(name="gsm8k", source=str(path), n_train=500, n_test=500))
    assert len(train) + len(test) == 10 and train and test
    assert not {p.id for p in train} & {p.id for p in test}
    assert "fewer" in caplog.text


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_math_local_file_gold_and_level_filter(tmp_path, fmt):
    write = write_jsonl if fmt == "jsonl" else write_parquet
    path = write(tmp_path / f"math.{fmt}", MATH_ROWS)
    train, test = both(cfg(name="math", source=str(path), n_train=100, n_test=5, levels=[1, 2]))
    kept = train + test
    assert len(kept) == 16  # i % 5 in (0, 1)
    assert {p.meta["level"] for p in kept} == {1, 2}
    for p in kept:
        i = int(p.question.split("$")[1].split()[0])
        assert p.gold == str(3 * i)


def test_math500_style_answer_field_and_int_levels(tmp_path):
    rows = [
        {"problem": "Find $x$ if $x + 1 = 3$.", "solution": "Clearly $x=2$.", "answer": "2",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Find $y$ if $2y = 10$.", "solution": "So $y = \\boxed{5}$.", "answer": "5",
         "subject": "Algebra", "level": 4, "unique_id": "test/algebra/2.json"},
    ]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    probs = load_split(cfg(name="math", source=str(path), n_train=0, n_test=10), "test")
    assert [(p.gold, p.meta["level"]) for p in probs] == [("2", 1)]


def test_math_extract_needs_a_box():
    task = get_task("math")
    assert not task.allow_plain_number
    assert task.extract("The answer is 5") is None
    assert task.extract(r"thus \boxed{\frac{5}{6}}") == r"\frac{5}{6}"


def test_mmlu_local_file_and_letter_extraction(tmp_path):
    rows = [{"question": f"Pick option {k}", "choices": ["w", "x", "y", "z"], "answer": k, "subject": "s"}
            for k in range(4)] + [{"question": "Which?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "c"}]
    path = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    probs = load_split(cfg(name="mmlu", source=str(path), test_source=str(path), n_train=0, n_test=10), "test")
    assert sorted(p.gold for p in probs) == ["A", "B", "C", "C", "D"]
    which = next(p for p in probs if p.question.startswith("Which?"))
    assert "A) 1" in which.question and "D) 4" in which.question
    task = get_task("mmlu")
    assert task.extract(r"so the answer is \boxed{B}") == "B"
    assert task.extract(r"\boxed{(c)}") == "C"
    assert task.extract("The answer is (D).") == "D"
    assert task.extract("no idea") is None


@pytest.mark.parametrize("text, letter", [
    (r"so \boxed{\textbf{B}}", "B"),
    (r"$\boxed{\mathrm{C}}$", "C"),
    (r"\boxed{\text{(D)}}", "D"),
    (r"\boxed{\text{\textbf{A.}}}", "A"),
    (r"\boxed{B.}", "B"),
    (r"\boxed{A and B}", None),  # two letters in the box: not one answer
    (r"\boxed{\text{A and B}}", None),
    ("Answer: C", "C"),
    ("After checking, the answer is (B).", "B"),
    ("Final answer: **D**", "D"),
    ("the answer is a number I cannot find", None),  # "a" the article, not option A
    # a box without a single letter falls back to the text
    (r"The answer is (C), i.e. \boxed{\text{the third option}}", "C"),
    (r"Answer: A. \boxed{A and B}", "A"),
    # a valid box wins over the text
    (r"The answer is (C). On reflection \boxed{D}", "D"),
])
def test_mmlu_extraction_needs_one_letter(text, letter):
    assert get_task("mmlu").extract(text) == letter


# ----------------------------------------------------------------------------- errors

def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl"):
        load_split(cfg(name="gsm8k", source=str(missing)), "train")


def test_missing_field_names_file_line_and_field(tmp_path):
    rows = GSM_ROWS[:3] + [{"question": "What is 2 + 2?"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_split(cfg(name="gsm8k", source=str(path)), "train")
    msg = str(e.value)
    assert "bad.jsonl" in msg and "line 4" in msg and "'answer'" in msg


def test_missing_field_in_parquet_names_row(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [{"problem": "Compute $1+1$.", "level": "Level 1"}])
    with pytest.raises(DataError) as e:
        load_split(cfg(name="math", source=str(path)), "test")
    msg = str(e.value)
    assert "bad.parquet" in msg and "row 0" in msg and "'solution'" in msg


def test_gsm8k_gold_strips_thousands_separators(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "Lots.\n#### 1,234"}])
    assert load_split(cfg(name="gsm8k", source=str(path), test_source=str(path)), "test")[0].gold == "1234"


def test_gsm8k_answer_without_final_number(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "answer": "It is 4."}])
    with pytest.raises(DataError, match="####"):
        load_split(cfg(name="gsm8k", source=str(path)), "test")


def test_unreachable_hub_fails_fast_and_says_how_to_use_local_files(monkeypatch):
    # nothing listens on port 9 of this machine: the hub is unreachable, as on an offline machine
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DataError) as e:
        load_split(cfg(name="gsm8k", source="no-such-org/no-such-dataset"), "train")
    # Refused by the quick connection check, not after `datasets`' own retries (~25 s offline).
    assert "cannot connect to 127.0.0.1:9" in str(e.value)
    assert "task.source" in str(e.value) and "task.test_source" in str(e.value)


def test_source_that_is_neither_file_nor_hub_id():
    with pytest.raises(DataError, match="task.source"):
        load_split(cfg(name="gsm8k", source="not a dataset"), "train")


# ----------------------------------------------------------------------------- fixtures

def test_bundled_fixtures_load_with_correct_answers():
    probs = bundled_problems()
    by_task = {t: [p for p in probs if p.task == t] for t in ("gsm8k", "math", "mmlu")}
    assert len(by_task["gsm8k"]) >= 25 and len(by_task["math"]) >= 25 and len(by_task["mmlu"]) >= 10
    assert len({p.id for p in probs}) == len(probs)
    for p in by_task["gsm8k"]:
        assert p.gold.lstrip("-").isdigit()
    for p in by_task["mmlu"]:
        assert p.gold in "ABCD" and "\nA) " in p.question
    # ids match what loading the same fixture as a task source gives
    fixture = Path(__file__).resolve().parents[1] / "harness" / "resources" / "data" / "gsm8k-sample.jsonl"
    gsm = load_split(cfg(name="gsm8k", source=str(fixture), n_train=0, n_test=100), "test")
    assert {p.id for p in gsm} == {p.id for p in by_task["gsm8k"]}


def test_get_task_names():
    for name in ("arithmetic", "gsm8k", "math", "mmlu"):
        assert get_task(name).name == name
    with pytest.raises(Exception, match="known tasks"):
        get_task("chess")
