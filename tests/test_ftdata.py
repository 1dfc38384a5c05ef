"""Finetuning-data selection (DESIGN §2) on hand-built debates, and the pre-upload validator."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from harness import ftvalidate
from harness.config import FinetuneConfig
from harness.errors import DataError
from harness.ftdata import FtDataStats, build_ftdata, critic_mix
from harness.ftvalidate import validate_training_file
from harness.records import AgentTranscript, DebateRecord, Message, Problem, Vote, VoteClass


def transcript(agent: int, pid: str, answers: list[str | None], *, system: bool = False) -> AgentTranscript:
    """A conversation whose every turn carries the agent's own marker, so leaks are visible."""
    msgs = [Message(role="system", content=f"you are agent {agent}")] if system else []
    for m, ans in enumerate(answers):
        user = f"Solve problem {pid}." if m == 0 else f"[to agent {agent}] others' answers for {pid}, round {m}"
        msgs.append(Message(role="user", content=user))
        said = f"\\boxed{{{ans}}}" if ans is not None else "I cannot tell"
        msgs.append(Message(role="assistant", content=f"AGENT-{agent}-TEXT {pid} r{m}: {said}"))
    # `correct` is deliberately garbage: selection must never read it.
    return AgentTranscript(agent=agent, models=["m"] * len(answers), messages=msgs, answers=answers,
                           correct=[True] * len(answers))


def record(pid: str, answers: dict[int, list[str | None]], vote: str | None, *, gold: str = "999",
           order: list[int] | None = None, system: bool = False) -> DebateRecord:
    order = order if order is not None else sorted(answers)
    agents = [transcript(a, pid, answers[a], system=system) for a in order]
    v = Vote(answer=vote, count=1 if vote else 0, n_voters=len(answers),
             classes=[VoteClass(answer=vote, agents=[0])] if vote else [], tie=False, tie_rule="lowest-agent-index")
    return DebateRecord(iteration=0, split="train", problem=Problem(id=pid, task="arithmetic", question=pid, gold=gold),
                        agents=agents, round_votes=[v, v], correct=True)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"min_examples": 1, **kw})


# ----------------------------------------------------------------------------- selection

def test_generator_and_critic_selection_follow_the_vote(tmp_path):
    recs = [
        # agent 0: right-right (C+, gen); agent 1: wrong-right (C-); agent 2: right-wrong (gen only)
        record("p1", {0: ["7", "7"], 1: ["3", "7"], 2: ["7", "4"]}, "7"),
        # no vote: nothing from this debate
        record("p2", {0: [None, None], 1: [None, None], 2: [None, None]}, None),
    ]
    stats = build_ftdata(recs, n_agents=3, cfg=cfg(), out_dir=tmp_path, seed=0)
    assert [a.generator_examples for a in stats.agents] == [1, 0, 1]
    assert [(a.critic_minus_available, a.critic_plus_available) for a in stats.agents] == [(0, 1), (1, 0), (0, 0)]
    assert stats.n_records == 2 and stats.n_records_with_vote == 1

    gen0 = rows(tmp_path / "generator-0.jsonl")
    assert [m["role"] for m in gen0[0]["messages"]] == ["user", "assistant"]
    assert gen0[0]["messages"][0]["content"] == "Solve problem p1."
    assert "r0" in gen0[0]["messages"][1]["content"]
    crit1 = rows(tmp_path / "critic-1.jsonl")
    assert [m["role"] for m in crit1[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rows(tmp_path / "generator-1.jsonl") == [] and rows(tmp_path / "critic-2.jsonl") == []


def test_system_message_kept_in_generator_example(tmp_path):
    build_ftdata([record("p", {0: ["1", "1"]}, "1", system=True)], n_agents=1, cfg=cfg(), out_dir=tmp_path, seed=0)
    assert [m["role"] for m in rows(tmp_path / "generator-0.jsonl")[0]["messages"]] == ["system", "user", "assistant"]


def test_agents_never_share_data(tmp_path):
    """Each agent's files hold only its own turns, even when the transcripts are listed out of
    agent order (a bug keyed on list position, or pooling agents, would show here)."""
    recs = [record(f"p{i}", {0: ["5", "5"], 1: ["2", "5"], 2: ["5", "5"]}, "5", order=[2, 0, 1]) for i in range(6)]
    stats = build_ftdata(recs, n_agents=3, cfg=cfg(critic_weight=0.5), out_dir=tmp_path, seed=1)
    for n in range(3):
        for role in ("generator", "critic"):
            text = (tmp_path / f"{role}-{n}.jsonl").read_text()
            for other in set(range(3)) - {n}:
                assert f"AGENT-{other}-TEXT" not in text and f"[to agent {other}]" not in text
    assert [a.generator_examples for a in stats.agents] == [6, 0, 6]
    assert stats.agents[1].critic_minus_available == 6 and stats.agents[1].critic_plus_available == 0
    assert stats.agents[0].critic_minus_available == 0


def test_gold_is_never_used_to_select(tmp_path):
    # The debate settled on 7 while the gold answer is 8: data agrees with the vote, not gold.
    rec = record("p", {0: ["7", "7"], 1: ["8", "7"], 2: ["8", "8"]}, "7", gold="8")
    stats = build_ftdata([rec], n_agents=3, cfg=cfg(), out_dir=tmp_path, seed=0)
    assert stats.agents[0].generator_examples == 1 and stats.agents[2].generator_examples == 0
    assert stats.agents[1].critic_minus_available == 1  # 8 (the gold!) counts as wrong here
    assert "\\boxed{7}" in rows(tmp_path / "generator-0.jsonl")[0]["messages"][1]["content"]


def test_equivalence_not_string_equality(tmp_path):
    stats = build_ftdata([record("p", {0: ["1/2", "0.5"]}, "0.5")], n_agents=1, cfg=cfg(), out_dir=tmp_path, seed=0)
    assert stats.agents[0].generator_examples == 1 and stats.agents[0].critic_plus_available == 1


def test_first_critic_turn_weight(tmp_path):
    rec = record("p", {0: ["3", "7"]}, "7")
    build_ftdata([rec], n_agents=1, cfg=cfg(), out_dir=tmp_path / "a", seed=0)
    msgs = rows(tmp_path / "a" / "critic-0.jsonl")[0]["messages"]
    assert msgs[1] == {**msgs[1], "role": "assistant", "weight": 0}
    assert "weight" not in msgs[3] and all("weight" not in m for m in msgs if m["role"] != "assistant")
    build_ftdata([rec], n_agents=1, cfg=cfg(critic_first_turn_loss=True), out_dir=tmp_path / "b", seed=0)
    assert all("weight" not in m for m in rows(tmp_path / "b" / "critic-0.jsonl")[0]["messages"])


def test_one_round_debate_gives_no_critic_data(tmp_path):
    rec = record("p", {0: ["7"]}, "7")
    rec.round_votes = rec.round_votes[:1]
    stats = build_ftdata([rec], n_agents=1, cfg=cfg(), out_dir=tmp_path, seed=0)
    assert stats.agents[0].generator_examples == 1 and stats.agents[0].critic_examples == 0


def test_critic_weight_respected(tmp_path):
    # agent 0: 6 wrong-then-right (C-) and 20 right-right (C+)
    recs = [record(f"m{i}", {0: ["1", "2"]}, "2") for i in range(6)]
    recs += [record(f"p{i}", {0: ["2", "2"]}, "2") for i in range(20)]
    stats = build_ftdata(recs, n_agents=1, cfg=cfg(critic_weight=2 / 3), out_dir=tmp_path, seed=3)
    a = stats.agents[0]
    assert (a.critic_minus_kept, a.critic_plus_kept) == (6, 3)
    assert a.critic_minus_share == pytest.approx(2 / 3)
    crit = rows(tmp_path / "critic-0.jsonl")
    assert sum("m" in r["messages"][0]["content"].split()[-1] for r in crit) == 6
    assert stats.file("critic", 0).examples == 9


def test_critic_mix_rule():
    assert critic_mix(6, 20, 2 / 3, 1) == (6, 3)
    assert critic_mix(1, 20, 2 / 3, 1) == (1, 1)  # half rounds up, not to even
    assert critic_mix(6, 1, 2 / 3, 1) == (6, 1)  # capped by what exists
    assert critic_mix(6, 20, 2 / 3, 10) == (6, 4)  # topped up to the minimum a job accepts
    assert critic_mix(0, 20, 2 / 3, 10) == (0, 10)  # no C- at all: the critic still trains
    assert critic_mix(0, 3, 2 / 3, 10) == (0, 3)
    assert critic_mix(5, 7, 0.0, 10) == (0, 7) and critic_mix(5, 7, 1.0, 10) == (5, 0)


def test_sampling_is_seeded_and_stats_hash_the_files(tmp_path):
    recs = [record(f"m{i}", {0: ["1", "2"]}, "2") for i in range(4)]
    recs += [record(f"p{i}", {0: ["2", "2"]}, "2") for i in range(30)]
    s1 = build_ftdata(recs, n_agents=1, cfg=cfg(), out_dir=tmp_path / "a", seed=5)
    s2 = build_ftdata(recs, n_agents=1, cfg=cfg(), out_dir=tmp_path / "b", seed=5)
    assert (tmp_path / "a" / "critic-0.jsonl").read_bytes() == (tmp_path / "b" / "critic-0.jsonl").read_bytes()
    for f in s1.files:
        assert f.sha256 == hashlib.sha256((tmp_path / "a" / f.path).read_bytes()).hexdigest()
    assert FtDataStats.model_validate_json((tmp_path / "a" / "stats.json").read_text()) == s1 == s2
    assert {f.path for f in s1.files} == {"generator-0.jsonl", "critic-0.jsonl"}


def test_agent_index_outside_society_is_an_error(tmp_path):
    with pytest.raises(DataError, match="outside 0..1"):
        build_ftdata([record("p", {0: ["1", "1"], 2: ["1", "1"]}, "1")], n_agents=2, cfg=cfg(), out_dir=tmp_path, seed=0)


def test_written_files_pass_validation(tmp_path):
    recs = [record(f"p{i}", {0: ["3", "7"], 1: ["7", "7"]}, "7") for i in range(12)]
    build_ftdata(recs, n_agents=2, cfg=cfg(), out_dir=tmp_path, seed=0)
    for name in ("generator-1.jsonl", "critic-0.jsonl", "critic-1.jsonl"):
        report = validate_training_file(tmp_path / name, min_examples=1)
        assert report.ok, report.errors
        assert report.total_tokens > 0


# ----------------------------------------------------------------------------- validation

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


BAD_EXAMPLES = [
    ("{not json", "not valid JSON"),
    (json.dumps({"prompt": "x"}), "no 'messages' list"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}),
     "message 1 has role 'bot'; allowed: system, user, assistant"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
     "message 2 (assistant) has empty content"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}),
     "message 2 (assistant) has no content"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "no assistant message"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}),
     "weight 0.5; allowed: 0 or 1"),
    (json.dumps({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}),
     "message 1 (user) has a 'weight'"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}),
     "nothing to train on"),
]


@pytest.mark.parametrize("bad,expected", BAD_EXAMPLES, ids=[e for _, e in BAD_EXAMPLES])
def test_bad_example_rejected_naming_the_line(tmp_path, bad, expected):
    lines = [json.dumps(GOOD)] * 11
    lines.insert(6, bad)  # line 7
    report = validate_training_file(write_lines(tmp_path / "generator-1.jsonl", lines))
    assert not report.ok and not report.too_few
    assert len(report.errors) == 1
    assert report.errors[0].startswith("generator-1.jsonl:7: ") and expected in report.errors[0]


def test_good_file_ok_with_token_totals(tmp_path):
    report = validate_training_file(write_lines(tmp_path / "g.jsonl", [json.dumps(GOOD)] * 10 + [""]))
    assert report.ok and report.n_examples == 10
    assert report.total_tokens >= 10 * 2 and report.max_tokens_seen > 0


def test_too_few_examples_flagged_not_raised(tmp_path):
    report = validate_training_file(write_lines(tmp_path / "critic-2.jsonl", [json.dumps(GOOD)] * 4), min_examples=10)
    assert report.too_few and not report.ok
    assert "critic-2.jsonl: 4 example(s), fewer than the 10" in report.errors[0]
    assert "keeps its previous model" in report.errors[0]
    empty = validate_training_file(write_lines(tmp_path / "critic-3.jsonl", []))
    assert empty.too_few and empty.n_examples == 0


def test_example_over_token_limit(tmp_path):
    long = {"messages": [{"role": "user", "content": "x" * 4000}, {"role": "assistant", "content": "a"}]}
    lines = [json.dumps(GOOD)] * 10 + [json.dumps(long)]
    report = validate_training_file(write_lines(tmp_path / "g.jsonl", lines), max_example_tokens=500)
    assert len(report.errors) == 1 and report.errors[0].startswith("g.jsonl:11: ") and "over the limit of 500" in report.errors[0]


def test_token_estimate_fallback_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ftvalidate, "_load_tiktoken", lambda: None)
    monkeypatch.setattr(ftvalidate, "_counter", None)
    monkeypatch.setattr(ftvalidate, "_warned", False)
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"messages": [
        {"role": "user", "content": "a" * 40}, {"role": "assistant", "content": "b" * 9}]})] * 10)
    with caplog.at_level(logging.WARNING, logger="harness.ftvalidate"):
        r1 = validate_training_file(path)
        r2 = validate_training_file(path)
    warnings = [r for r in caplog.records if "estimate" in r.getMessage()]
    assert len(warnings) == 1
    assert r1.tokens_estimated and r2.tokens_estimated and r1.warnings
    # 3 per example + 3 per message + ceil(chars / 4)
    assert r1.total_tokens == 10 * (3 + 3 + 10 + 3 + 3)


def test_missing_file_is_reported(tmp_path):
    report = validate_training_file(tmp_path / "nope.jsonl")
    assert not report.ok and "does not exist" in report.errors[0]


def test_a_tied_vote_gives_no_data_unless_asked(tmp_path):
    """Three different final answers: the tie rule would pick agent 0's, handing it data that no
    other agent supports. By default such a debate trains nobody, and stats say how many."""
    rec = record("p", {0: ["1", "1"], 1: ["2", "2"], 2: ["3", "3"]}, "1")
    rec.round_votes = [v.model_copy(update={"tie": True}) for v in rec.round_votes]
    stats = build_ftdata([rec], n_agents=3, cfg=cfg(), out_dir=tmp_path / "skip", seed=0)
    assert stats.n_records_with_vote == 1 and stats.n_records_tied_skipped == 1
    assert all(a.generator_examples == 0 and a.critic_examples == 0 for a in stats.agents)
    stats = build_ftdata([rec], n_agents=3, cfg=cfg(use_tied_votes=True), out_dir=tmp_path / "use", seed=0)
    assert [a.generator_examples for a in stats.agents] == [1, 0, 0]


def test_min_voters_keeps_a_lone_parsed_answer_from_selecting_data(tmp_path):
    """One parsed final answer out of three is the authors' "majority" (min_voters 1, the
    default) and trains its agent; with finetune.min_voters=2 that debate trains nobody, and
    stats.json says how many debates were left out and under which setting."""
    from harness.grading import majority_vote

    answers = {0: ["5", "5"], 1: [None, None], 2: ["6", None]}
    rec = record("p", answers, "5")
    rec.round_votes = [majority_vote([answers[a][m] for a in range(3)]) for m in range(2)]
    assert rec.vote.answer == "5" and rec.vote.n_voters == 1 and not rec.vote.tie
    authors = build_ftdata([rec], n_agents=3, cfg=cfg(), out_dir=tmp_path / "authors", seed=0)
    assert [a.generator_examples for a in authors.agents] == [1, 0, 0]
    assert [a.critic_examples for a in authors.agents] == [1, 0, 0]
    assert authors.min_voters == 1 and authors.n_records_few_voters_skipped == 0
    strict = build_ftdata([rec], n_agents=3, cfg=cfg(min_voters=2), out_dir=tmp_path / "strict", seed=0)
    assert all(a.generator_examples == 0 and a.critic_examples == 0 for a in strict.agents)
    saved = FtDataStats.model_validate_json((tmp_path / "strict" / "stats.json").read_text())
    assert saved.min_voters == 2 and saved.n_records_few_voters_skipped == 1
