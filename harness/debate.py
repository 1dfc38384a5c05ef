"""The debate protocol (DESIGN §2) over many problems at once.

Round 0: each agent's generator answers the task prompt. Round m >= 1: each agent's critic gets
one new user message holding the *other* agents' round m-1 answers (concatenated, or condensed
by a summarizer call) and answers again in its own multi-turn conversation.

Problems run concurrently (the LLM client bounds calls in flight); each finished problem is
appended to the split's JSONL at once, and a restarted run skips the problems already there.
Nothing here knows about iterations beyond stamping them on records and sample identities.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from harness.errors import BudgetExceeded
from harness.fileio import JsonlAppender, iter_jsonl
from harness.grading import equivalent, majority_vote
from harness.prompts import Prompts
from harness.records import AgentTranscript, DebateRecord, Message, Problem, SampleId

log = logging.getLogger(__name__)


class ChatClient(Protocol):
    async def chat(self, model: str, messages: list[Message], sample: SampleId, *, purpose: str = "debate"): ...


@dataclass(frozen=True)
class Society:
    """Which model each agent uses: generators answer round 0, critics the later rounds."""

    generators: Sequence[str]
    critics: Sequence[str]
    summarizer: str

    def __post_init__(self) -> None:
        if len(self.generators) != len(self.critics):
            raise ValueError("one generator and one critic per agent")

    @property
    def n_agents(self) -> int:
        return len(self.generators)


@dataclass(frozen=True)
class DebateSettings:
    rounds: int = 2
    mode: str = "summarize"  # or "concatenate"
    grading_timeout_s: float = 5.0


class Debater:
    def __init__(self, client: ChatClient, society: Society, prompts: Prompts,
                 extract: Callable[[str], str | None], settings: DebateSettings,
                 *, iteration: int, split: str):
        self.client = client
        self.society = society
        self.prompts = prompts
        self.extract = extract
        self.settings = settings
        self.iteration = iteration
        self.split = split

    def _sample(self, problem: Problem, agent: int, rnd: int, role: str = "agent") -> SampleId:
        return SampleId(iteration=self.iteration, split=self.split, problem_id=problem.id,
                        role=role, agent=agent, round=rnd)

    async def _other_answers_message(self, problem: Problem, agent: int, rnd: int,
                                     previous: list[str]) -> str:
        others = [(j, text) for j, text in enumerate(previous) if j != agent]
        if self.settings.mode == "concatenate":
            return self.prompts.debate(others)
        request = [Message(role="user", content=self.prompts.summarize(problem.question, others))]
        result = await self.client.chat(self.society.summarizer, request,
                                        self._sample(problem, agent, rnd, role="summarizer"), purpose="summary")
        return self.prompts.debate_summary(result.text)

    async def _agent_turn(self, problem: Problem, agent: int, rnd: int, conversation: list[Message],
                          previous: list[str] | None) -> str:
        if rnd == 0:
            conversation.append(Message(role="user", content=self.prompts.question(problem.question)))
            model = self.society.generators[agent]
        else:
            assert previous is not None
            conversation.append(Message(role="user", content=await self._other_answers_message(
                problem, agent, rnd, previous)))
            model = self.society.critics[agent]
        result = await self.client.chat(model, list(conversation), self._sample(problem, agent, rnd))
        conversation.append(Message(role="assistant", content=result.text))
        return result.text

    async def debate(self, problem: Problem) -> DebateRecord:
        n = self.society.n_agents
        conversations: list[list[Message]] = [[] for _ in range(n)]
        models: list[list[str]] = [[] for _ in range(n)]
        previous: list[str] | None = None
        for rnd in range(self.settings.rounds):
            texts = await asyncio.gather(*(
                self._agent_turn(problem, a, rnd, conversations[a], previous) for a in range(n)))
            for a in range(n):
                models[a].append(self.society.generators[a] if rnd == 0 else self.society.critics[a])
            previous = list(texts)
        # Votes never feed back into the debate, so all grading happens once, at the end, in one
        # worker thread: math-verify can take a while on odd answers and must not block the loop.
        return await asyncio.to_thread(self._record, problem, conversations, models)

    def _record(self, problem: Problem, conversations: list[list[Message]], models: list[list[str]]) -> DebateRecord:
        timeout = self.settings.grading_timeout_s
        answers = [[self.extract(m.content) for m in conv if m.role == "assistant"] for conv in conversations]
        round_votes = [majority_vote([answers[a][rnd] for a in range(len(answers))], timeout_s=timeout)
                       for rnd in range(self.settings.rounds)]
        agents = [AgentTranscript(agent=a, models=models[a], messages=conversations[a], answers=answers[a],
                                  correct=[equivalent(ans, problem.gold, timeout_s=timeout) for ans in answers[a]])
                  for a in range(len(answers))]
        return DebateRecord(iteration=self.iteration, split=self.split, problem=problem, agents=agents,
                            round_votes=round_votes,
                            correct=equivalent(round_votes[-1].answer, problem.gold, timeout_s=timeout))


def finished_records(path: Path) -> dict[str, DebateRecord]:
    return {r.problem.id: r for r in iter_jsonl(path, DebateRecord)}


async def run_debates(debater: Debater, problems: Sequence[Problem], out_path: Path,
                      on_done: Callable[[DebateRecord], None] | None = None) -> list[DebateRecord]:
    """Debate every problem not already in `out_path`, appending each record as it finishes.

    Returns all records (earlier and new) in the order of `problems`. If the budget cap stops new
    calls, the calls already in flight are allowed to finish (so nothing paid is lost), their
    problems are saved, and BudgetExceeded is raised for the loop to report.
    """
    done = finished_records(out_path)
    todo = [p for p in problems if p.id not in done]
    if done:
        log.info("%s: %d of %d problems already debated; resuming with %d", out_path, len(
            [p for p in problems if p.id in done]), len(problems), len(todo))
    for p in problems:
        if p.id in done and on_done is not None:
            on_done(done[p.id])
    budget_stop: BudgetExceeded | None = None
    with JsonlAppender(out_path) as out:
        tasks = [asyncio.create_task(debater.debate(p)) for p in todo]
        try:
            for fut in asyncio.as_completed(tasks):
                try:
                    record = await fut
                except BudgetExceeded as e:
                    budget_stop = budget_stop or e
                    continue
                out.append(record)
                done[record.problem.id] = record
                if on_done is not None:
                    on_done(record)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    if budget_stop is not None:
        raise budget_stop
    return [done[p.id] for p in problems]
