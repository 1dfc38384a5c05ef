import math

import pytest

from harness.evaluate import results_table, split_metrics
from records_factory import make_record


def records():
    return [
        # all agree, right in both rounds
        make_record("p1", "5", [["5", "5"], ["5", "5"], ["5", "5"]]),
        # wrong majority in round 0, corrected in round 1
        make_record("p2", "7", [["7", "7"], ["8", "7"], ["8", "7"]]),
        # nobody can be parsed in the final round: wrong, still counted in n
        make_record("p3", "1", [["1", None], [None, None], ["2", None]]),
        # split vote, wrong
        make_record("p4", "4", [["3", "3"], ["3", "3"], ["4", "4"]]),
    ]


def test_accuracy_counts_unparseable_votes_as_wrong_and_keeps_them_in_n():
    m = split_metrics(records(), iteration=0, split="test")
    assert m.n == 4
    assert m.accuracy == pytest.approx(0.5)
    assert m.stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 4))


def test_per_round_and_per_agent_accuracy():
    m = split_metrics(records(), iteration=0, split="test")
    assert m.per_round == pytest.approx([0.25 + 0.25, 0.5])  # p1 and p3 (agent 0 alone wins the tie) in round 0
    assert m.per_agent_round[0] == pytest.approx([3 / 4, 2 / 4])
    assert m.per_agent == pytest.approx([0.5, 0.5, 0.75])


def test_agreement_and_unparsed_rate():
    m = split_metrics(records(), iteration=0, split="test")
    assert m.agreement == pytest.approx(2 / 4)  # p1, p2
    # pairwise: p1 1, p2 1, p3 0 (no voters), p4 1/3
    assert m.pairwise_agreement == pytest.approx((1 + 1 + 0 + 1 / 3) / 4)
    assert m.unparsed_rate == pytest.approx(3 / 12)


def test_table_labels_simulated_numbers():
    m = split_metrics(records(), iteration=0, split="test", simulated=True)
    assert "SIMULATED" in str(results_table([m]).title)


def test_empty_split_is_not_an_error():
    assert split_metrics([], iteration=1, split="test").n == 0
