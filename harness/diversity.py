"""Diversity of the agents' answers, per iteration and split (DESIGN §2, "Diversity").

The paper's argument is that independent finetuning keeps a society diverse while single-agent
self-training collapses it; these are the measures used to check that. Each one is defined next
to the code that computes it. A measure that cannot be computed is None with the reason in
`notes`: never a made-up number.

    metrics = await compute_diversity(records, iteration=k, split="test", client=client,
                                      embedding_model="sim-embed", logprob_base_url=None)
"""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Sequence

import httpx2
from pydantic import BaseModel, Field

from harness.evaluate import split_metrics
from harness.llm import LLMClient
from harness.records import AgentTranscript, DebateRecord


class DiversityMetrics(BaseModel):
    """iter-<k>/diversity.json: one per evaluated split."""

    iteration: int
    split: str
    n: int  # problems the agreement measures cover (all of them)
    # Share of problems where every agent's final answer is equivalent (SplitMetrics.agreement).
    # None with one agent: agreement among agents is undefined there (SplitMetrics says 1.0).
    agreement: float | None
    # Mean over problems of the share of agent pairs whose final answers are equivalent
    # (SplitMetrics.pairwise_agreement). 1 - this is the simplest answer-level diversity.
    pairwise_agreement: float | None
    # Mean over problems of 1 - mean pairwise cosine similarity of the final responses' embeddings.
    embedding_dissimilarity: float | None = None
    embedding_model: str | None = None
    # Mean over problems and ordered agent pairs (i, j), i != j, of l_i(r_i) - l_i(r_j) (see
    # likelihood_diversity below), in nats per token; exactly 0 when all agents share one model.
    likelihood_diversity: float | None = None
    likelihood_problems: int | None = None  # problems scored for the likelihood measure
    notes: list[str] = Field(default_factory=list)  # why a measure is None, and what was assumed


# ----------------------------------------------------------------------------- agreement

def agreement_measures(records: Sequence[DebateRecord], *, iteration: int, split: str) -> tuple[float, float]:
    """(agreement, pairwise_agreement), taken from harness.evaluate so the report and metrics.json
    can never disagree on what "agreement" means. Both use the final-round vote's equivalence
    classes (mathematical equivalence, not string equality); an unparseable answer is in no
    class, so it agrees with nobody."""
    m = split_metrics(records, iteration=iteration, split=split)
    return m.agreement, m.pairwise_agreement


# ----------------------------------------------------------------------------- embeddings

def final_response(t: AgentTranscript) -> str:
    """The agent's last assistant message: its final-round response, reasoning included."""
    for msg in reversed(t.messages):
        if msg.role == "assistant":
            return msg.content
    return ""


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def dissimilarity_of(vectors: Sequence[Sequence[float]]) -> float | None:
    """1 - mean cosine similarity over unordered pairs of `vectors`; None for fewer than two."""
    pairs = list(itertools.combinations(vectors, 2))
    if not pairs:
        return None
    return 1.0 - sum(_cosine(a, b) for a, b in pairs) / len(pairs)


async def embedding_dissimilarity(records: Sequence[DebateRecord], client: LLMClient, model: str) -> float:
    """Embedding dissimilarity of the agents' final responses.

    Definition: for each problem, embed every agent's final-round response (the whole last
    assistant message, reasoning included, not only the parsed answer) with `model` through the
    OpenAI-compatible /embeddings route; the problem's dissimilarity is 1 - the mean cosine
    similarity over unordered agent pairs. The result is the mean over problems. 0 means every
    agent wrote the same thing; larger means more varied reasoning. Empty responses are embedded
    as a single space (the route refuses empty strings). Needs at least two agents.
    """
    if not records or len(records[0].agents) < 2:
        raise ValueError("embedding dissimilarity needs records with at least two agents")
    texts = [final_response(t) or " " for r in records for t in r.agents]
    vectors = await client.embed(model, texts)
    per_problem, pos = [], 0
    for r in records:
        k = len(r.agents)
        d = dissimilarity_of(vectors[pos:pos + k])
        pos += k
        if d is not None:
            per_problem.append(d)
    return sum(per_problem) / len(per_problem)


# ----------------------------------------------------------------------------- likelihood

class LogprobsUnavailable(Exception):
    """The endpoint cannot score a given text (no vLLM /tokenize or prompt_logprobs)."""


async def _response_loglik(http: httpx2.AsyncClient, root: str, model: str, prompt: list[dict],
                           response: str) -> float:
    """Mean per-token log-likelihood of `response` as the assistant's answer to `prompt` under
    `model`: vLLM's /tokenize renders the chat template (with and without the answer), then
    /v1/completions with prompt_logprobs scores the rendered token ids without generating."""
    async def tokenize(messages: list[dict], add_generation_prompt: bool) -> list[int]:
        r = await http.post(f"{root}/tokenize", json={"model": model, "messages": messages,
                                                      "add_generation_prompt": add_generation_prompt})
        if r.status_code != 200:
            raise LogprobsUnavailable(f"POST /tokenize answered {r.status_code}")
        return list(r.json()["tokens"])

    prefix = await tokenize(prompt, True)
    full = await tokenize([*prompt, {"role": "assistant", "content": response}], False)
    r = await http.post(f"{root}/v1/completions", json={"model": model, "prompt": full, "max_tokens": 1,
                                                         "temperature": 0, "prompt_logprobs": 0})
    if r.status_code != 200:
        raise LogprobsUnavailable(f"POST /v1/completions with prompt_logprobs answered {r.status_code}")
    entries = r.json()["choices"][0].get("prompt_logprobs")
    if not entries or len(entries) != len(full):
        raise LogprobsUnavailable("the completions answer carries no prompt_logprobs for every prompt token")
    # The answer's tokens are those after the rendered prompt (the end-of-turn token included:
    # a model that would not stop there finds the answer less likely, which is fair).
    scores = []
    for pos in range(len(prefix), len(full)):
        entry = entries[pos] or {}
        tok = entry.get(str(full[pos]))
        if tok is None:
            raise LogprobsUnavailable("prompt_logprobs lacks the prompt token's own log-probability")
        scores.append(float(tok["logprob"]))
    if not scores:
        raise LogprobsUnavailable("the response adds no tokens after the prompt")
    return sum(scores) / len(scores)


async def likelihood_diversity(records: Sequence[DebateRecord], base_url: str, *, api_key: str | None = None,
                               max_problems: int | None = None, concurrency: int = 16,
                               http: httpx2.AsyncClient | None = None) -> tuple[float, int]:
    """Likelihood-based diversity from prompt log-probabilities (vLLM).

    Definition: on round 0 (the generators, which all answer the same task prompt), let r_j be
    agent j's response and l_i(r) the mean per-token log-likelihood (nats) of r as the answer to
    the task prompt under agent i's generator model. For each problem take the mean over ordered
    pairs (i, j), i != j, of l_i(r_i) - l_i(r_j): how much more agent i's model prefers its own
    answer to its peers'. Averaged over problems. It is exactly 0 whenever all agents share one
    model (the terms cancel in pairs), e.g. at iteration 0 and for single-model self-training,
    whatever they answer: it measures how far the agents' MODELS have specialised apart (each
    preferring its own reasoning), not how different one sample of answers is (that is the
    embedding measure). Checked against a real vLLM server. Round 0 is used because
    later rounds condition each agent on a different conversation, which would confound the
    comparison. Per-token means keep long and short answers comparable. Returns (value, problems
    scored); raises LogprobsUnavailable when the server cannot score texts.
    """
    chosen = [r for r in records if len(r.agents) >= 2][: max_problems or None]
    if not chosen:
        raise ValueError("likelihood diversity needs records with at least two agents")
    root = base_url.rstrip("/").removesuffix("/v1")
    own = http is None
    if http is None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        http = httpx2.AsyncClient(timeout=120.0, headers=headers)
    sem = asyncio.Semaphore(concurrency)

    async def score(model: str, prompt: list[dict], text: str) -> float:
        async with sem:
            return await _response_loglik(http, root, model, prompt, text)

    try:
        per_problem = []
        for r in chosen:
            agents = r.agents
            # Round 0's prompt is everything before the first assistant message (system + task).
            first = [next(i for i, m in enumerate(t.messages) if m.role == "assistant") for t in agents]
            prompts = [[m.model_dump() for m in t.messages[:f]] for t, f in zip(agents, first)]
            responses = [t.messages[f].content for t, f in zip(agents, first)]
            n = len(agents)
            pairs = [(i, j) for i in range(n) for j in range(n)]
            ll = await asyncio.gather(*(score(agents[i].models[0], prompts[i], responses[j]) for i, j in pairs))
            table = dict(zip(pairs, ll))
            diffs = [table[i, i] - table[i, j] for i in range(n) for j in range(n) if i != j]
            per_problem.append(sum(diffs) / len(diffs))
        return sum(per_problem) / len(per_problem), len(per_problem)
    except httpx2.HTTPError as e:
        raise LogprobsUnavailable(f"{type(e).__name__}: {e}") from e
    finally:
        if own:
            await http.aclose()


# ----------------------------------------------------------------------------- all together

async def compute_diversity(records: Sequence[DebateRecord], *, iteration: int, split: str,
                            client: LLMClient | None, embedding_model: str | None,
                            logprob_base_url: str | None, logprob_api_key: str | None = None,
                            likelihood_max_problems: int | None = 100) -> DiversityMetrics:
    """Every diversity measure of one split's debate records. Agreement needs no calls; the
    embedding measure needs `client` and `embedding_model`; the likelihood measure needs a vLLM
    server at `logprob_base_url` that still serves the agents' models. Missing inputs or
    endpoint errors leave that measure None with the reason in `notes`."""
    records = list(records)
    n_agents = len(records[0].agents) if records else 0
    if n_agents < 2:
        return DiversityMetrics(iteration=iteration, split=split, n=len(records), agreement=None,
                                pairwise_agreement=None,
                                notes=[f"{n_agents} agent(s): agreement and diversity between agents are undefined"])
    agreement, pairwise = agreement_measures(records, iteration=iteration, split=split)
    out = DiversityMetrics(iteration=iteration, split=split, n=len(records), agreement=agreement,
                           pairwise_agreement=pairwise)
    if embedding_model is None or client is None:
        out.notes.append("embedding dissimilarity: no embeddings model/endpoint configured "
                         "(analysis.embedding_model)")
    else:
        try:
            out.embedding_dissimilarity = await embedding_dissimilarity(records, client, embedding_model)
            out.embedding_model = embedding_model
        except Exception as e:  # a diversity measure must never break a run that paid for its debates
            out.notes.append(f"embedding dissimilarity: the embeddings call failed: {e}")
    if logprob_base_url is None:
        out.notes.append("likelihood diversity: no vLLM endpoint with prompt logprobs given "
                         "(the simulator and OpenAI chat give none)")
    else:
        try:
            value, scored = await likelihood_diversity(records, logprob_base_url, api_key=logprob_api_key,
                                                       max_problems=likelihood_max_problems)
            out.likelihood_diversity, out.likelihood_problems = value, scored
            if scored < len(records):
                out.notes.append(f"likelihood diversity: first {scored} of {len(records)} problems scored")
        except LogprobsUnavailable as e:
            out.notes.append(f"likelihood diversity: the endpoint gives no usable prompt logprobs ({e})")
    return out


__all__ = ["DiversityMetrics", "LogprobsUnavailable", "agreement_measures", "compute_diversity",
           "dissimilarity_of", "embedding_dissimilarity", "final_response", "likelihood_diversity"]
