"""Hand-built debate records with known answers, for metric and data-selection tests."""

from __future__ import annotations

from harness.records import AgentTranscript, DebateRecord, Message, Problem, Vote, VoteClass


def make_record(pid: str, gold: str, answers: list[list[str | None]], *, vote_rounds: list[str | None] | None = None,
                split: str = "test", iteration: int = 0) -> DebateRecord:
    """answers[agent][round]; votes and correctness are computed by plain string equality, which
    is what these hand-built numbers need."""
    n_agents, rounds = len(answers), len(answers[0])
    agents = []
    for a, per_round in enumerate(answers):
        messages = []
        for m, ans in enumerate(per_round):
            messages.append(Message(role="user", content=f"problem {pid}" if m == 0 else f"others said, round {m}"))
            messages.append(Message(role="assistant", content=f"agent {a} round {m}: \\boxed{{{ans}}}" if ans else "no idea"))
        agents.append(AgentTranscript(agent=a, models=["m"] * rounds, messages=messages, answers=per_round,
                                      correct=[ans == gold for ans in per_round]))
    round_votes = []
    for m in range(rounds):
        classes: dict[str, list[int]] = {}
        for a in range(n_agents):
            if answers[a][m] is not None:
                classes.setdefault(answers[a][m], []).append(a)
        ordered = sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
        top = ordered[0] if ordered else None
        tie = len(ordered) > 1 and len(ordered[1][1]) == len(ordered[0][1])
        round_votes.append(Vote(answer=top[0] if top else None, count=len(top[1]) if top else 0,
                                n_voters=sum(len(v) for v in classes.values()),
                                classes=[VoteClass(answer=k, agents=v) for k, v in ordered], tie=tie,
                                tie_rule="lowest-agent-index"))
    round_correct = [v.answer == gold for v in round_votes]
    return DebateRecord(iteration=iteration, split=split, problem=Problem(id=pid, task="arithmetic", question=f"problem {pid}", gold=gold),
                        agents=agents, round_votes=round_votes, round_correct=round_correct, correct=round_correct[-1])
