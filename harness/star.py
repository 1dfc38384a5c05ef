"""The STaR baseline's rationalization stage (Zelikman et al., 2022, as the paper's §3.2 uses it).

STaR samples the model's own answers to the training problems (a run with `finetune.selection:
star` and `debate.rounds: 1`: every agent answers once, nobody debates). Each round-0 answer
that does NOT match the gold answer is asked again, by the same model, with a hint holding the
gold answer: the prompt role `star_hint` wraps the task prompt exactly as it was sent. Then
`harness.ftdata.build_star_ftdata` keeps every answer that matched gold, and every rationalized
answer that now matches gold paired with the plain task prompt (the hint removed), as if the
model had found it unaided.

**This is the only stage of the harness that reads the gold answer to make training data.** It
is what separates STaR from the paper's method, whose data the majority vote alone selects.

Requests go to iter-<k>/star-rationalize.jsonl, one `Rationalization` per line, appended as each
finishes; a resumed run skips the ones already there. A request the server refuses for length
becomes an unparseable, unused rationalization; any other failure stops the stage the way a
debate stops (requests under way finish and are saved, then the error is raised).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from harness.debate import ChatClient
from harness.errors import LLMError
from harness.fileio import JsonlAppender, iter_jsonl
from harness.ftdata import task_prompt
from harness.grading import equivalent
from harness.prompts import Prompts
from harness.records import AgentTranscript, DebateRecord, Message, Rationalization, SampleId
from harness.workpool import drain

log = logging.getLogger(__name__)


def needs_rationalization(records: Sequence[DebateRecord], timeout_s: float = 5.0) -> list[tuple[DebateRecord, int]]:
    """(record, index of the transcript) for every round-0 answer not equivalent to GOLD
    (unparseable and cut-off answers included): the answers STaR retries with a hint."""
    out = []
    for rec in records:
        for i, t in enumerate(rec.agents):
            if t.answers and task_prompt(t) and not equivalent(t.answers[0], rec.problem.gold, timeout_s=timeout_s):
                out.append((rec, i))
    return out


def hinted_messages(prompts: Prompts, t: AgentTranscript, gold: str) -> list[Message]:
    """The round-0 request again, its task prompt wrapped in the `star_hint` template with gold."""
    head = task_prompt(t)
    hint = prompts.render("star_hint", question=head[-1].content, answer=gold)
    return [*head[:-1], Message(role="user", content=hint)]


async def rationalize(client: ChatClient, prompts: Prompts, extract: Callable[[str], str | None],
                      records: Sequence[DebateRecord], out_path: Path, *, iteration: int,
                      grading_timeout_s: float = 5.0, max_in_flight: int = 32) -> list[Rationalization]:
    """Rationalize every wrong round-0 answer in `records` not already in `out_path`; returns all
    rationalizations (earlier and new)."""
    done = {(r.problem_id, r.agent): r for r in iter_jsonl(out_path, Rationalization)}
    wanted = await asyncio.to_thread(needs_rationalization, records, grading_timeout_s)
    todo = deque((rec, i) for rec, i in wanted if (rec.problem.id, rec.agents[i].agent) not in done)
    if done:
        log.info("%s: %d rationalizations already made; %d to go", out_path, len(done), len(todo))

    async def one(rec: DebateRecord, i: int) -> Rationalization:
        t = rec.agents[i]
        gold = rec.problem.gold  # read on purpose: STaR's hint holds the gold answer
        messages = hinted_messages(prompts, t, gold)
        sample = SampleId(iteration=iteration, split=rec.split, problem_id=rec.problem.id, role="rationalizer",
                          agent=t.agent, round=0)
        model = t.models[0]
        try:
            result = await client.chat(model, messages, sample, purpose="rationalize")
        except LLMError as e:
            if not e.context_too_long:
                raise
            return Rationalization(iteration=iteration, problem_id=rec.problem.id, agent=t.agent, model=model,
                                   messages=messages, answer=None, error=str(e), correct=False)
        cut = getattr(result, "finish_reason", None) == "length"
        answer = None if cut else extract(result.text)
        ok = await asyncio.to_thread(equivalent, answer, gold, timeout_s=grading_timeout_s)
        return Rationalization(iteration=iteration, problem_id=rec.problem.id, agent=t.agent, model=model,
                               messages=[*messages, Message(role="assistant", content=result.text)],
                               answer=answer, truncated=cut, correct=bool(ok))

    with JsonlAppender(out_path) as out:
        def finished(r: Rationalization) -> None:
            out.append(r)
            done[(r.problem_id, r.agent)] = r

        await drain(todo, lambda item: one(*item), finished, max_in_flight=max_in_flight)
    return list(done.values())
