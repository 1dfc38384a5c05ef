"""Diversity of the agents, per iteration and split (DESIGN §2 "Diversity"; the paper's §4.2,
Figs. 6-9).

The paper's argument is that independent finetuning keeps a society diverse while single-agent
self-training collapses it; these are the measures used to check that, each defined next to the
code that computes it:
- answer agreement (harness.evaluate): the authors' **consensus** (share of parsed final answers
  equal to their problem's majority, pooled), **agreement** (share of problems where all agents
  agree) and **pairwise agreement**; no calls;
- **embedding dissimilarity** of the final responses (embeddings.py): a local
  sentence-transformers model or an endpoint's embeddings, on every endpoint by default;
- from prompt log-probabilities (logprobs.py; computed by a vLLM endpoint or in-process by
  transformers + PEFT on the saved adapters, local_scoring.py): the **held-out-critic NLL** of
  the other critics' replies, and **KL divergence** between agents (generators; critics) and of
  each agent vs the base model, estimated by Monte Carlo from the replies.
A measure that cannot be computed is None with the reason in `notes`: never a made-up number.

    metrics = await compute_diversity(records, iteration=k, split="test", client=client,
                                      embedding_model="sim-embed", logprobs=False)
"""

from __future__ import annotations

from typing import Sequence

from pydantic import BaseModel, Field

from harness.diversity.embeddings import (DEFAULT_LOCAL, Embedder, EndpointEmbedder, LocalEmbedder,
                                          dissimilarity_of, embedding_dissimilarity, final_response, make_embedder)
from harness.diversity.logprobs import Scorer, round_measures
from harness.errors import BatchUnfinished, LogprobsUnavailable
from harness.evaluate import split_metrics
from harness.records import DebateRecord


class DiversityMetrics(BaseModel):
    """iter-<k>/diversity.json: one per evaluated split. Log-probability measures are in nats per
    token (see harness.diversity.logprobs)."""

    schema_version: int = 2
    iteration: int
    split: str
    n: int  # problems the agreement measures cover (all of them)
    # The authors' consensus: share of all parsed final answers equal to their problem's majority.
    consensus: float | None = None
    # "All agree": share of problems where every agent's final answer is equivalent
    # (SplitMetrics.agreement). None with one agent: agreement among agents is undefined there.
    agreement: float | None
    # Mean over problems of the share of agent pairs whose final answers are equivalent.
    pairwise_agreement: float | None
    # Mean over problems of 1 - mean pairwise cosine similarity of the final responses' embeddings.
    embedding_dissimilarity: float | None = None
    embedding_model: str | None = None
    # Mean -log p of the other critics' final replies under each held-out critic.
    heldout_critic_nll: float | None = None
    kl_between_generators: float | None = None  # round 0, mean over ordered agent pairs
    kl_between_critics: float | None = None  # final round
    kl_generators_vs_base: float | None = None  # mean over agents
    kl_critics_vs_base: float | None = None
    kl_generators_vs_base_per_agent: list[float | None] | None = None
    logprob_problems: int | None = None  # problems scored for the log-probability measures
    notes: list[str] = Field(default_factory=list)  # why a measure is None, and what was assumed


def sampling_note(sampling) -> str | None:
    """Why a run's replies are not plain samples of its models (a SamplingConfig), or None: the
    Monte-Carlo KL estimates assume replies drawn at temperature 1 from the full distribution."""
    reasons = []
    if sampling.temperature != 1.0:
        reasons.append(f"temperature {sampling.temperature:g}")
    if sampling.top_p not in (None, 1.0):
        reasons.append(f"top_p {sampling.top_p:g}")
    if sampling.extra_body:
        reasons.append(f"extra sampling parameters ({', '.join(sorted(sampling.extra_body))})")
    if not reasons:
        return None
    return ("replies were sampled with " + ", ".join(reasons) + ", not from the models' plain distributions, "
            "so the estimates are biased: compare them across iterations and methods, not as absolute KL")


LOGPROB_FIELDS = ("heldout_critic_nll", "kl_between_generators", "kl_between_critics", "kl_generators_vs_base",
                  "kl_critics_vs_base")


async def compute_diversity(records: Sequence[DebateRecord], *, iteration: int, split: str, client=None,
                            embedding_model: str | None = None, logprobs: bool = False, base_model: str | None = None,
                            logprob_max_problems: int | None = 100, logprob_concurrency: int = 16,
                            sampling_note: str | None = None, scorer=None,
                            logprobs_note: str | None = None) -> DiversityMetrics:
    """Every diversity measure of one split's debate records.

    `embedding_model`: `local:NAME` (sentence-transformers here) or a model of `client`'s
    /embeddings route; None skips the measure. `logprobs`: score replies through `scorer` (an
    object with LLMClient's `prompt_logprobs`, e.g. local_scoring.LocalLogprobs; default
    `client`, which must then reach a vLLM server that still serves the agents' models), and
    `base_model` for KL vs base, at most `logprob_concurrency` requests at a time, on the first
    `logprob_max_problems` problems; `logprobs_note`: which backend scores them, or why they are
    not computed, for the notes. `sampling_note`: why replies were not plain temperature-1
    samples, if they were not (the KL estimates then describe the sampling distributions).
    Missing inputs or endpoint errors leave a measure None with the reason in `notes`; a
    diversity measure never breaks a run that paid for its debates."""
    records = list(records)
    n_agents = len(records[0].agents) if records else 0
    m = split_metrics(records, iteration=iteration, split=split)
    multi = n_agents >= 2
    out = DiversityMetrics(iteration=iteration, split=split, n=len(records), consensus=m.consensus if multi else None,
                           agreement=m.agreement if multi else None,
                           pairwise_agreement=m.pairwise_agreement if multi else None)
    if not multi:
        out.notes.append(f"{n_agents} agent(s): agreement and diversity between agents are undefined")
    if multi and embedding_model is None:
        out.notes.append("embedding dissimilarity: off (analysis.embedding_model is null)")
    elif multi:
        try:
            embedder = make_embedder(embedding_model, client)
            out.embedding_dissimilarity = await embedding_dissimilarity(records, embedder)
            out.embedding_model = embedder.name
        except BatchUnfinished:
            raise  # its answers are still coming: the run stops and --resume waits for them, not a note
        except Exception as e:  # noqa: BLE001 - reported in notes, never fatal
            out.notes.append(f"embedding dissimilarity ({embedding_model}): {e}")
    if not logprobs:
        out.notes.append("held-out-critic NLL and KL divergences: " + (logprobs_note or (
            "not computed; they need prompt log-probabilities: a vLLM endpoint, or "
            "analysis.likelihood_backend=transformers with the local provider's adapters")))
    elif records:
        await _logprob_measures(out, records, scorer or client, base_model, n_agents, logprob_max_problems,
                                logprob_concurrency, sampling_note)
        if logprobs_note:
            out.notes.append(f"log-probability measures: {logprobs_note}")
    return out


async def _logprob_measures(out: DiversityMetrics, records: list[DebateRecord], client, base_model: str | None,
                            n_agents: int, max_problems: int | None, concurrency: int,
                            sampling_note: str | None) -> None:
    chosen = records[: max_problems or None]
    scorer = Scorer(client, concurrency=concurrency, iteration=out.iteration, split=out.split)
    rounds = len(chosen[0].round_votes)
    try:
        gen = await round_measures(scorer, chosen, 0, base_model, n_agents)
        crit = await round_measures(scorer, chosen, rounds - 1, base_model, n_agents) if rounds > 1 else None
    except Exception as e:  # noqa: BLE001 - reported in notes, never fatal
        out.notes.append(f"held-out-critic NLL and KL divergences: the replies could not be scored ({e})")
        return
    out.logprob_problems = gen.problems
    out.kl_between_generators = gen.between_agents if n_agents >= 2 else None
    out.kl_generators_vs_base = gen.vs_base
    out.kl_generators_vs_base_per_agent = gen.vs_base_per_agent or None
    if crit is not None:
        out.heldout_critic_nll = crit.heldout_nll if n_agents >= 2 else None
        out.kl_between_critics = crit.between_agents if n_agents >= 2 else None
        out.kl_critics_vs_base = crit.vs_base
    else:
        out.notes.append("held-out-critic NLL, KL between critics: one debate round, so no critics")
    if base_model is None:
        out.notes.append("KL vs the base model: no base model given")
    if len(chosen) < len(records):
        out.notes.append(f"log-probability measures: first {len(chosen)} of {len(records)} problems scored "
                         f"(analysis.likelihood_max_problems)")
    skipped = gen.skipped + (crit.skipped if crit else 0)
    if skipped:
        out.notes.append(f"log-probability measures: {skipped} replies left out (cut off by max_tokens or refused)")
    if sampling_note:
        out.notes.append(f"KL estimates: {sampling_note}")


__all__ = ["DEFAULT_LOCAL", "DiversityMetrics", "Embedder", "EndpointEmbedder", "LOGPROB_FIELDS", "LocalEmbedder",
           "LogprobsUnavailable", "compute_diversity", "dissimilarity_of", "embedding_dissimilarity",
           "final_response", "make_embedder", "sampling_note"]
