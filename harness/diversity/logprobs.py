"""Likelihood-based diversity from prompt log-probabilities (vLLM), the paper's §4.2 / Figs. 7-9.

Every measure here is built from one number: s_M(y | c), the mean per-token log-probability
(nats) that model M gives response y as the assistant's reply to conversation c, read from
vLLM's prompt log-probabilities (`LLMClient.prompt_logprobs`: the chat template renders c with
and then without y, and y's tokens are those after the rendered prompt, end-of-turn included:
a model that would not stop there finds y less likely). For each problem and round, agent j's
reply y_j was sampled from its own model M_j given its own conversation c_j; each y_j is scored
under every agent's model of that round and under the base model.

- **Held-out-critic NLL** (the paper's likelihood measure): over the final round's critics,
  the mean over ordered pairs (i, j), i != j, of -s_{C_i}(y_j | c_j): how unlikely the other
  critics' replies are under critic i held out from them. Higher = more diverse. Mean over
  problems, nats per token. It is not 0 for identical agents (a model's NLL of its own samples
  is its entropy); single-agent finetuning lowers it as the shared model narrows.
- **KL divergence between agents**, estimated by Monte Carlo from the samples we have: for
  y ~ M_j(. | c), KL(M_j || M_i)(c) = E_y[log M_j(y|c) - log M_i(y|c)], so with one sample per
  agent the per-token estimate is s_{M_j}(y_j | c_j) - s_{M_i}(y_j | c_j). Mean over ordered
  pairs i != j and problems. Exactly 0 when agents share a model (the same cached score is
  subtracted from itself). Between generators (round 0, every agent answers the same task
  prompt) and between critics (final round, each in its own conversation).
- **KL of each finetuned agent vs the base model**: KL(M_j || base)(c_j) estimated as
  s_{M_j}(y_j | c_j) - s_base(y_j | c_j); 0 at iteration 0. Per agent (generators) and the mean.
The Monte-Carlo estimate is unbiased for KL between the distributions the replies were drawn
from; it assumes replies sampled at temperature 1 without top_p/top_k or constrained decoding
(compute_diversity notes when the run sampled otherwise). Per-token normalisation keeps long
and short replies comparable. A single sample can make one pair's estimate negative; means over
problems are what to read. Replies cut off by max_tokens or refused by the server are left out
(a cut-off reply would be scored with an end-of-turn its model never wrote).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Sequence

from harness.errors import LogprobsUnavailable
from harness.records import DebateRecord, Message, SampleId


@dataclass(frozen=True)
class Reply:
    """One agent's reply in one round, with what it answered and which model wrote it."""

    agent: int
    round: int
    context: list[Message]  # the agent's own conversation before this reply
    text: str
    model: str


def replies(record: DebateRecord, rnd: int) -> tuple[list[Reply], int]:
    """The usable replies of round `rnd` and how many were left out (cut off, refused, empty)."""
    out, skipped = [], 0
    for t in record.agents:
        assistant = [i for i, m in enumerate(t.messages) if m.role == "assistant"]
        if rnd >= len(assistant) or rnd >= len(t.models):
            continue
        pos = assistant[rnd]
        cut = rnd < len(t.truncated) and t.truncated[rnd]
        refused = rnd < len(t.errors) and t.errors[rnd] is not None
        if cut or refused or not t.messages[pos].content:
            skipped += 1
            continue
        out.append(Reply(agent=t.agent, round=rnd, context=list(t.messages[:pos]), text=t.messages[pos].content,
                         model=t.models[rnd]))
    return out, skipped


class Scorer:
    """s_M(y | c) through an LLMClient, at most `concurrency` scoring requests in flight.
    (vLLM 0.32's CPU build with LoRA kills its engine when prompt_logprobs requests are batched
    together: give it concurrency 1. GPU builds are fine with many.)"""

    def __init__(self, client, *, concurrency: int = 16, iteration: int = 0, split: str = "test"):
        self.client = client
        self.sem = asyncio.Semaphore(concurrency)
        self.iteration, self.split = iteration, split

    async def _logprobs(self, model: str, messages: list[Message], add_generation_prompt: bool, sample: SampleId):
        async with self.sem:
            return await self.client.prompt_logprobs(model, messages, add_generation_prompt=add_generation_prompt,
                                                     sample=sample, purpose="score")

    async def score(self, model: str, reply: Reply, problem_id: str) -> float:
        sample = SampleId(iteration=self.iteration, split=self.split, problem_id=problem_id, agent=reply.agent,
                          round=reply.round)
        # Only the prefix's tokens are needed: a scorer that can tokenize without a forward pass
        # (local_scoring.LocalLogprobs) saves half the work; vLLM gives tokens with logprobs only.
        tokenize = getattr(self.client, "prompt_token_ids", None)
        if tokenize is not None:
            prefix_ids = await tokenize(model, reply.context, add_generation_prompt=True)
        else:
            prefix_ids = (await self._logprobs(model, reply.context, True, sample)).token_ids
        full = await self._logprobs(model, [*reply.context, Message(role="assistant", content=reply.text)], False,
                                    sample)
        n = len(prefix_ids)
        if full.token_ids[:n] != prefix_ids:
            raise LogprobsUnavailable(f"{model}'s chat template does not render a conversation as a prefix of the same "
                                      f"conversation with the reply added, so the reply's tokens cannot be found")
        scores = full.logprobs[n:]
        if not scores or any(s is None for s in scores):
            raise LogprobsUnavailable(f"no log-probabilities for the reply's tokens from {model}")
        return sum(scores) / len(scores)  # type: ignore[arg-type]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class RoundMeasures:
    """One round's measures, each a mean over problems (None: nothing to average)."""

    between_agents: float | None = None  # KL between agents
    heldout_nll: float | None = None  # NLL of the other agents' replies under each held-out agent
    vs_base: float | None = None  # KL of each agent vs the base model, mean over agents
    vs_base_per_agent: list[float | None] = field(default_factory=list)
    problems: int = 0  # problems with at least one scored reply
    skipped: int = 0  # replies left out (cut off, refused, empty)


async def round_measures(scorer: Scorer, records: Sequence[DebateRecord], rnd: int, base_model: str | None,
                         n_agents: int) -> RoundMeasures:
    """The measures of round `rnd` over `records` (see the module docstring)."""

    async def one(record: DebateRecord):
        usable, skipped = replies(record, rnd)
        models = {t.agent: t.models[rnd] for t in record.agents if rnd < len(t.models)}
        wanted = {(m, r.agent) for r in usable for m in {*models.values(), *([base_model] if base_model else [])}}
        keys = sorted(wanted)
        by_agent = {r.agent: r for r in usable}
        values = await asyncio.gather(*(scorer.score(m, by_agent[a], record.problem.id) for m, a in keys))
        s = dict(zip(keys, values))
        kl = [s[models[r.agent], r.agent] - s[models[i], r.agent] for r in usable for i in models if i != r.agent]
        nll = [-s[models[i], r.agent] for r in usable for i in models if i != r.agent]
        base = {r.agent: s[models[r.agent], r.agent] - s[base_model, r.agent] for r in usable} if base_model else {}
        return _mean(kl), _mean(nll), base, skipped, bool(usable)

    results = await asyncio.gather(*(one(r) for r in records))
    out = RoundMeasures(problems=sum(1 for *_, any_scored in results if any_scored),
                        skipped=sum(r[3] for r in results))
    out.between_agents = _mean([r[0] for r in results if r[0] is not None])
    out.heldout_nll = _mean([r[1] for r in results if r[1] is not None])
    if base_model:
        out.vs_base_per_agent = [_mean([r[2][a] for r in results if a in r[2]]) for a in range(n_agents)]
        out.vs_base = _mean([v for v in out.vs_base_per_agent if v is not None])
    return out


__all__ = ["Reply", "RoundMeasures", "Scorer", "replies", "round_measures"]
