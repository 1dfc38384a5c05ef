"""Proof that every LoRA adapter is served: after the loop loads an iteration's adapters, each one
scores a fixed text on every server next to the base model (vLLM's prompt log-probabilities).

A server that accepted an adapter but does not apply it answers with the base model and says
nothing (vLLM has done so, and so have evaluation tools built on it); its replies would still carry
the adapter's name. A probe tells: a trained adapter shifts the text's log-probabilities, an
unapplied one leaves them equal to the base's. The base is scored before and after the adapters;
what it differs from itself (0 on one request at a time; batch noise on a busy GPU) raises the bar.

An adapter that changes nothing (LoRA B all zeros: PEFT's initial state, i.e. a job that never
stepped) cannot be told from an unapplied one, and stops the run the same way: either way the
agent would debate as the base model while the records say it is finetuned.

Results: iter-<k>/adapter-probes.json (AdapterProbes), the latest probe of each (adapter, server);
each probe is a line of usage.jsonl (purpose "probe"). docs/serving/adapter-probes.md.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Literal, Protocol, Sequence

from pydantic import BaseModel, Field

from harness.errors import AdapterNotApplied, LogprobsUnavailable, ServeError
from harness.fileio import write_model
from harness.llm.responses import PromptLogprobs
from harness.probe_settings import AdapterProbeConfig

PROBES_FILE = "adapter-probes.json"


class TextScorer(Protocol):
    async def score_text(self, model: str, text: str, *, server: int = 0,
                         purpose: str = "probe") -> PromptLogprobs: ...


class AdapterProbe(BaseModel):
    """One adapter against the base model on one server."""

    adapter: str
    server: str  # the server's base URL
    base_model: str
    tokens: int  # tokens compared (the text's, less the first, which has no log-probability)
    max_abs_delta: float  # largest |logprob(adapter) - logprob(base)| over those tokens (nats)
    mean_abs_delta: float
    base_noise: float  # largest |Δ| between the two base scorings around the adapters
    threshold: float  # max(tolerance, 2 x base_noise): at most this is "not_applied"
    verdict: Literal["applied", "not_applied"]
    probed_at: float  # unix time


class AdapterProbes(BaseModel):
    """iter-<k>/adapter-probes.json: the latest probe of each (adapter, server) of the iteration."""

    schema_version: int = 1
    iteration: int
    tolerance: float
    text_sha256: str  # of the probe text (serve.probe.text, or the built-in one)
    probes: list[AdapterProbe] = Field(default_factory=list)


def _deltas(base: PromptLogprobs, other: PromptLogprobs, what: str) -> list[float]:
    if base.token_ids != other.token_ids:
        raise ServeError(f"{what} tokenizes the probe text differently from the base model "
                         f"({len(other.token_ids)} vs {len(base.token_ids)} tokens); an adapter must keep "
                         f"the base vocabulary")
    return [abs(a - b) for a, b in zip(base.logprobs, other.logprobs) if a is not None and b is not None]


async def probe_server(scorer: TextScorer, server: int, url: str, base: str, adapters: Sequence[str],
                       settings: AdapterProbeConfig) -> list[AdapterProbe]:
    """Score the text with the base, each adapter (one request at a time: vLLM 0.32's CPU LoRA
    kernel fails on batched prompt_logprobs), then the base again."""
    text = settings.probe_text()
    try:
        before = await scorer.score_text(base, text, server=server)
        scored = [(name, await scorer.score_text(name, text, server=server)) for name in adapters]
        after = await scorer.score_text(base, text, server=server)
    except LogprobsUnavailable as e:
        raise ServeError(f"the server at {url} cannot score a text ({e}), so the adapters cannot be checked; "
                         f"use a vLLM server, or turn the check off with --set serve.probe.enabled=false") from e
    noise = max(_deltas(before, after, f"the base model '{base}' at {url}"), default=0.0)
    threshold = max(settings.tolerance, 2 * noise)
    out = []
    for name, got in scored:
        deltas = _deltas(before, got, f"adapter '{name}' at {url}")
        if not deltas:
            raise ServeError(f"the probe text gives no scored token at {url}; set serve.probe.text to a longer text")
        biggest = max(deltas)
        out.append(AdapterProbe(adapter=name, server=url, base_model=base, tokens=len(deltas),
                                max_abs_delta=biggest, mean_abs_delta=sum(deltas) / len(deltas), base_noise=noise,
                                threshold=threshold, verdict="applied" if biggest > threshold else "not_applied",
                                probed_at=time.time()))
    return out


def _failure(bad: list[AdapterProbe], path: Path) -> str:
    first = bad[0]
    more = f" (and {len(bad) - 1} more: {', '.join(f'{p.adapter} at {p.server}' for p in bad[1:4])})" if len(bad) > 1 else ""
    return (f"adapter '{first.adapter}' is not applied by the server at {first.server}: on the probe text it scores "
            f"like the base model '{first.base_model}' (max |Δ logprob| {first.max_abs_delta:.3g} over "
            f"{first.tokens} tokens, at most {first.threshold:.3g} counts as unchanged){more}. Its replies would come "
            f"from the base model under the adapter's name. Check the server's log for LoRA errors and that it "
            f"runs with --enable-lora, and that the adapter's weights are trained (LoRA B all zeros changes "
            f"nothing); then resume the run. Probes: {path}. To debate anyway: --set serve.probe.enabled=false")


async def probe_adapters(scorer: TextScorer, urls: Sequence[str], base: str, adapters: Sequence[str], *,
                         settings: AdapterProbeConfig, iteration: int, out_path: Path) -> AdapterProbes:
    """Probe every adapter on every server (server i is the scorer's server number i), record the
    results in `out_path` (merged with earlier probes of the iteration), and raise
    AdapterNotApplied naming each adapter a server does not apply."""
    text_sha = hashlib.sha256(settings.probe_text().encode("utf-8")).hexdigest()
    record = AdapterProbes(iteration=iteration, tolerance=settings.tolerance, text_sha256=text_sha)
    if out_path.exists():
        try:
            old = AdapterProbes.model_validate_json(out_path.read_bytes())
            if old.text_sha256 == text_sha:
                record.probes = old.probes
        except ValueError:
            pass  # a damaged file is replaced by this probe
    fresh: list[AdapterProbe] = []
    for i, url in enumerate(urls):
        fresh += await probe_server(scorer, i, url, base, adapters, settings)
    done = {(p.adapter, p.server) for p in fresh}
    record.probes = [p for p in record.probes if (p.adapter, p.server) not in done] + fresh
    write_model(out_path, record)
    bad = [p for p in fresh if p.verdict == "not_applied"]
    if bad:
        raise AdapterNotApplied(_failure(bad, out_path))
    return record


__all__ = ["PROBES_FILE", "AdapterProbe", "AdapterProbes", "probe_adapters", "probe_server"]
