"""The debate protocol (DESIGN §2) over many problems at once.

Round 0: each agent's generator answers the task prompt. Round m >= 1: each agent's critic gets
one new user message holding the *other* agents' round m-1 answers (concatenated, or condensed
by a summarizer call) and answers again in its own multi-turn conversation.

Problems run concurrently, a bounded number at a time (the LLM client bounds the calls), so
records are appended to the split's JSONL steadily from the start; a restarted run skips the
problems already there.
Nothing here knows about iterations beyond stamping them on records and sample identities.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from harness.errors import DataError, LLMError
from harness.fileio import JsonlAppender, iter_jsonl
from harness.grading import equivalent, majority_vote
from harness.prompts import Prompts
from harness.records import AgentTranscript, DebateRecord, Message, Problem, SampleId
from harness.workpool import drain

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
    seed: int = 0  # the run's seed: the order of the others' answers when the prompt set shuffles them


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

    def others_shown(self, problem: Problem, agent: int, rnd: int, previous: list[str]) -> list[tuple[int, str]]:
        """The other agents' previous answers this agent is shown, as (agent index, text). The
        harness prompt set shows every other agent in order; the authors' set shuffles them and
        keeps at most 5, as their code does. The order is drawn from (seed, problem, agent,
        round) alone, so a resumed run rebuilds the same message (and finds it in the cache)."""
        others = [(j, text) for j, text in enumerate(previous) if j != agent]
        prompt_set = self.prompts.set
        if prompt_set.shuffle_others:
            # random.Random seeded with a str is stable across processes (not salted like hash()).
            random.Random(f"{self.settings.seed}|{problem.id}|{agent}|{rnd}").shuffle(others)
        if prompt_set.max_others is not None:
            others = others[:prompt_set.max_others]
        return others

    async def _other_answers_message(self, problem: Problem, agent: int, rnd: int,
                                     previous: list[str]) -> str:
        others = self.others_shown(problem, agent, rnd, previous)
        if self.settings.mode == "concatenate":
            return self.prompts.debate(others, question=problem.question)
        request = [Message(role="user", content=self.prompts.summarize(problem.question, others))]
        try:
            result = await self.client.chat(self.society.summarizer, request,
                                            self._sample(problem, agent, rnd, role="summarizer"), purpose="summary")
        except LLMError as e:
            if not e.context_too_long:
                raise
            log.warning("problem %s round %d: the answers are too long to summarize; agent %d gets them as they are",
                        problem.id, rnd, agent)
            return self.prompts.debate(others, question=problem.question)
        return self.prompts.debate_summary(result.text, question=problem.question)

    async def _agent_turn(self, problem: Problem, agent: int, rnd: int, conversation: list[Message],
                          previous: list[str] | None) -> tuple[str, bool, str | None, str | None]:
        """One reply of one agent: its text, whether max_tokens cut it off, why the server
        refused it (None when it answered), and the model the server says answered."""
        if rnd == 0:
            conversation.append(Message(role="user", content=self.prompts.question(problem.question)))
            model = self.society.generators[agent]
        else:
            assert previous is not None
            conversation.append(Message(role="user", content=await self._other_answers_message(
                problem, agent, rnd, previous)))
            model = self.society.critics[agent]
        try:
            result = await self.client.chat(model, list(conversation), self._sample(problem, agent, rnd))
        except LLMError as e:
            if not e.context_too_long:
                raise
            # Only this turn is refused (its conversation outgrew the context window): it becomes an
            # empty, unparseable reply with the reason recorded, and the debate and the run go on.
            log.info("problem %s agent %d round %d: %s", problem.id, agent, rnd, e)
            conversation.append(Message(role="assistant", content=""))
            return "", False, str(e), None
        conversation.append(Message(role="assistant", content=result.text))
        return (result.text, getattr(result, "finish_reason", None) == "length", None,
                getattr(result, "served_model", None))

    def expected_models(self, agent: int) -> list[str]:
        return [self.society.generators[agent]] + [self.society.critics[agent]] * (self.settings.rounds - 1)

    async def debate(self, problem: Problem) -> DebateRecord:
        n = self.society.n_agents
        conversations: list[list[Message]] = [[] for _ in range(n)]
        truncated: list[list[bool]] = [[] for _ in range(n)]
        errors: list[list[str | None]] = [[] for _ in range(n)]
        served: list[list[str | None]] = [[] for _ in range(n)]
        previous: list[str] | None = None
        for rnd in range(self.settings.rounds):
            # return_exceptions: when one agent's call fails for good, its siblings' calls (maybe
            # paid) still finish and are recorded before the error ends the run, instead of being
            # left running while the client closes its files under them.
            outcomes = await asyncio.gather(*(
                self._agent_turn(problem, a, rnd, conversations[a], previous) for a in range(n)),
                return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                raise failed[0]
            replies = [o for o in outcomes if not isinstance(o, BaseException)]
            for a, (_, cut, error, model) in enumerate(replies):
                truncated[a].append(cut)
                errors[a].append(error)
                served[a].append(model)
            previous = [text for text, _, _, _ in replies]
        # Votes never feed back into the debate, so all grading happens once, at the end, in one
        # worker thread: math-verify can take a while on odd answers and must not block the loop.
        return await asyncio.to_thread(self._record, problem, conversations, truncated, errors, served)

    def _record(self, problem: Problem, conversations: list[list[Message]], truncated: list[list[bool]],
                errors: list[list[str | None]], served: list[list[str | None]]) -> DebateRecord:
        timeout = self.settings.grading_timeout_s
        replies = [[m.content for m in conv if m.role == "assistant"] for conv in conversations]
        answers = [[None if cut else self.extract(text) for text, cut in zip(texts, truncated[a])]
                   for a, texts in enumerate(replies)]
        round_votes = [majority_vote([answers[a][rnd] for a in range(len(answers))], timeout_s=timeout)
                       for rnd in range(self.settings.rounds)]
        round_correct = [equivalent(v.answer, problem.gold, timeout_s=timeout) for v in round_votes]
        agents = [AgentTranscript(agent=a, models=self.expected_models(a), messages=conversations[a],
                                  answers=answers[a], truncated=truncated[a], errors=errors[a], served=served[a],
                                  correct=[equivalent(ans, problem.gold, timeout_s=timeout) for ans in answers[a]])
                  for a in range(len(answers))]
        return DebateRecord(iteration=self.iteration, split=self.split, problem=problem, agents=agents,
                            round_votes=round_votes, round_correct=round_correct, correct=round_correct[-1])


def finished_records(path: Path) -> dict[str, DebateRecord]:
    return {r.problem.id: r for r in iter_jsonl(path, DebateRecord)}


def problems_in_flight(concurrency: int, agents: int) -> int:
    """How many problems to debate at once: enough to keep `concurrency` calls busy while some
    problems sit between rounds (hence 2x), few enough that records complete from the start
    rather than all at the end (which a budget stop or a crash would leave with nothing saved)."""
    return max(2, 2 * math.ceil(concurrency / max(agents, 1)))


def _check_reusable(record: DebateRecord, debater: Debater, path: Path) -> None:
    """A record from an earlier session must come from the same society and protocol."""
    n, rounds = debater.society.n_agents, debater.settings.rounds
    have = [t.models for t in record.agents]
    want = [debater.expected_models(a) for a in range(n)]
    if len(record.agents) != n or len(record.round_votes) != rounds or have != want:
        raise DataError(
            f"{path}: problem {record.problem.id!r} was debated by {len(record.agents)} agents over "
            f"{len(record.round_votes)} rounds with models {have}, but this run has {n} agents, {rounds} rounds "
            f"and models {want}. Debate settings cannot change on --resume: start a new run (--run-dir) instead.")


async def run_debates(debater: Debater, problems: Sequence[Problem], out_path: Path,
                      on_done: Callable[[DebateRecord], None] | None = None, *,
                      max_in_flight: int = 32) -> list[DebateRecord]:
    """Debate every problem not already in `out_path`, appending each record as it finishes.

    Returns all records (earlier and new) in the order of `problems`. When a call fails for good
    (the budget cap, an authentication error, retries used up), no new problem starts, the
    problems already under way finish (nothing paid is thrown away) and are saved, and the first
    error is raised for the loop to report; a resumed run continues from there.
    """
    done = finished_records(out_path)
    for record in done.values():
        _check_reusable(record, debater, out_path)
    todo = deque(p for p in problems if p.id not in done)
    if done:
        log.info("%s: %d of %d problems already debated; resuming with %d", out_path,
                 len(problems) - len(todo), len(problems), len(todo))
    for p in problems:
        if p.id in done and on_done is not None:
            on_done(done[p.id])
    with JsonlAppender(out_path) as out:
        def finished(record: DebateRecord) -> None:
            out.append(record)
            done[record.problem.id] = record
            if on_done is not None:
                on_done(record)

        await drain(todo, debater.debate, finished, max_in_flight=max_in_flight)
    return [done[p.id] for p in problems]
