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


def test_consensus_as_the_authors_compute_it_beside_all_agree():
    # Final-round parsed answers: p1 3 of 3 with the majority, p2 3 of 3, p3 none parsed (adds
    # nothing), p4 2 of 3. Pooled over answers as the authors' list is: 8 of 9.
    m = split_metrics(records(), iteration=0, split="test")
    assert m.consensus == pytest.approx(8 / 9)
    assert m.agreement == pytest.approx(2 / 4)  # "all agree" keeps its own name and value
    # Unequal numbers of parsed answers: pooled (the authors' list), not a mean of per-problem shares.
    uneven = [make_record("a", "1", [["1"], ["1"], ["2"], ["3"]]),  # 2 of 4 with the majority
              make_record("b", "1", [["5"], [None], [None], [None]])]  # 1 of 1
    assert split_metrics(uneven, iteration=0, split="test").consensus == pytest.approx(3 / 5)
    nothing = [make_record("c", "1", [[None], [None]])]
    assert split_metrics(nothing, iteration=0, split="test").consensus is None


def test_results_table_shows_the_truncation_rate_next_to_accuracy():
    from rich.console import Console
    import io

    recs = records()
    for r in recs:
        for t in r.agents:
            t.truncated = [False, False]
    recs[0].agents[0].truncated = [True, False]
    recs[0].agents[1].truncated = [False, True]
    m = split_metrics(recs, iteration=0, split="test")
    assert m.truncated_rate == pytest.approx(2 / 24)
    out = io.StringIO()
    Console(file=out, width=80).print(results_table([m]))
    header, row = [line for line in out.getvalue().splitlines() if line.strip()][1::2][:2]
    assert header.split()[3:7] == ["acc", "±", "se", "cut"]
    assert row.split()[3:7] == ["50.0", "±", "25.0", "8.3"]
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80
