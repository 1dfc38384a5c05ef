"""Diversity measures on hand-built records with known answers; embeddings through the real
simulator over HTTP; the likelihood measure against an in-process stand-in for vLLM's
/tokenize and prompt_logprobs routes."""

import math

import httpx2
import pytest
from fastapi import FastAPI, Request

from harness.config import EndpointConfig, SamplingConfig
from harness.diversity import (compute_diversity, dissimilarity_of, embedding_dissimilarity, likelihood_diversity,
                               LogprobsUnavailable)
from harness.evaluate import split_metrics
from harness.llm import LLMClient
from harness.sim import SimServer
from records_factory import make_record


def with_responses(record, texts, models=None):
    """Replace each agent's final assistant message (and, optionally, its models)."""
    for t, text in zip(record.agents, texts):
        t.messages[-1].content = text
        if models is not None:
            t.models = [models[t.agent]] * len(t.models)
    return record


@pytest.fixture
def sim():
    with SimServer() as server:
        yield server


def sim_client(server, tmp_path):
    return LLMClient(base_url=server.base_url, api_key="k", run_dir=tmp_path, sampling=SamplingConfig(),
                     endpoint=EndpointConfig(kind="simulator", api_key_env=None))


def test_agreement_comes_from_split_metrics_and_accuracy_se_are_known():
    recs = [make_record("p1", "5", [["5"], ["5"], ["5"]]),  # all agree, right
            make_record("p2", "7", [["7"], ["8"], ["8"]]),  # 2 of 3 agree, wrong
            make_record("p3", "1", [["1"], ["2"], ["3"]]),  # nobody agrees; tie broken to agent 0: right
            make_record("p4", "4", [[None], [None], ["4"]])]  # one voter
    m = split_metrics(recs, iteration=0, split="test")
    assert m.accuracy == pytest.approx(3 / 4) and m.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert m.agreement == pytest.approx(1 / 4)
    assert m.pairwise_agreement == pytest.approx((1 + 1 / 3 + 0 + 0) / 4)


def test_dissimilarity_of_vectors():
    assert dissimilarity_of([[1, 0], [1, 0], [2, 0]]) == pytest.approx(0.0)
    assert dissimilarity_of([[1, 0], [0, 1]]) == pytest.approx(1.0)
    assert dissimilarity_of([[1, 0]]) is None


async def test_embedding_dissimilarity_identical_vs_different_answers(sim, tmp_path):
    same = [with_responses(make_record(f"s{i}", "5", [["5"], ["5"], ["5"]]),
                           ["I add the numbers and get \\boxed{5}."] * 3) for i in range(3)]
    different = [with_responses(make_record(f"d{i}", "5", [["5"], ["6"], ["9"]]),
                                ["First multiply, then add: \\boxed{5}.", "Carry the one to obtain \\boxed{6}.",
                                 "Working left to right the total is \\boxed{9}."]) for i in range(3)]
    async with sim_client(sim, tmp_path) as client:
        d_same = await embedding_dissimilarity(same, client, "sim-embed")
        d_diff = await embedding_dissimilarity(different, client, "sim-embed")
    assert d_same == pytest.approx(0.0, abs=1e-9)
    assert d_diff > 0.3


async def test_compute_diversity_on_the_simulator_reports_missing_logprobs_honestly(sim, tmp_path):
    recs = [make_record("p1", "5", [["5", "5"], ["5", "5"]]), make_record("p2", "3", [["3", "3"], ["4", "4"]])]
    async with sim_client(sim, tmp_path) as client:
        d = await compute_diversity(recs, iteration=2, split="test", client=client, embedding_model="sim-embed",
                                    logprob_base_url=sim.base_url)
    assert (d.iteration, d.split, d.n) == (2, "test", 2)
    assert d.agreement == pytest.approx(0.5) and d.pairwise_agreement == pytest.approx(0.5)
    assert d.embedding_dissimilarity is not None and d.embedding_model == "sim-embed"
    assert d.likelihood_diversity is None
    assert any("likelihood" in n and "no usable prompt logprobs" in n for n in d.notes)


async def test_compute_diversity_without_endpoints_or_with_one_agent():
    recs = [make_record("p1", "5", [["5"], ["6"]])]
    d = await compute_diversity(recs, iteration=0, split="test", client=None, embedding_model=None,
                                logprob_base_url=None)
    assert d.pairwise_agreement == 0.0 and d.embedding_dissimilarity is None and d.likelihood_diversity is None
    assert any("embedding" in n for n in d.notes) and any("likelihood" in n for n in d.notes)
    single = await compute_diversity([make_record("p1", "5", [["5"]])], iteration=0, split="test", client=None,
                                     embedding_model="sim-embed", logprob_base_url=None)
    assert single.agreement is None and single.pairwise_agreement is None and "undefined" in single.notes[0]


# ----------------------------------------------------------------------------- likelihood

USER, ASSISTANT, END = 1000, 2000, 3000


def fake_vllm() -> FastAPI:
    """vLLM's /tokenize (chat) and /v1/completions with prompt_logprobs, with a toy tokenizer (one
    token per character, role markers, end of turn) and toy models: model "m-X" gives its
    favourite character X log-prob -0.5 and every other token -2."""
    app = FastAPI()

    def render(messages, add_generation_prompt):
        ids = []
        for m in messages:
            ids += [USER if m["role"] != "assistant" else ASSISTANT] + [ord(c) for c in m["content"]] + [END]
        return ids + ([ASSISTANT] if add_generation_prompt else [])

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        return {"tokens": render(body["messages"], body["add_generation_prompt"])}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        assert body["prompt_logprobs"] == 0 and body["max_tokens"] == 1
        fav = ord(body["model"][-1])
        entries = [None] + [{str(t): {"logprob": -0.5 if t == fav else -2.0, "rank": 1}} for t in body["prompt"][1:]]
        return {"choices": [{"text": "x", "prompt_logprobs": entries}]}

    return app


def two_agent_records():
    recs = []
    for i in range(2):
        r = make_record(f"p{i}", "5", [["5"], ["5"]])
        recs.append(with_responses(r, ["aaa", "bbb"], models=["m-a", "m-b"]))
    return recs


async def test_likelihood_diversity_matches_the_hand_computed_value():
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(fake_vllm()), base_url="http://vllm") as http:
        value, scored = await likelihood_diversity(two_agent_records(), "http://vllm/v1", http=http)
    # l_a("aaa") = mean(-0.5, -0.5, -0.5, -2 for the end token) = -0.875; l_a("bbb") = -2. Same for b.
    assert scored == 2
    assert value == pytest.approx(-0.875 - -2.0)


async def test_likelihood_diversity_is_zero_for_one_model_and_one_answer():
    recs = [with_responses(make_record("p", "5", [["5"], ["5"], ["5"]]), ["abc"] * 3, models=["m-a"] * 3)]
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(fake_vllm()), base_url="http://vllm") as http:
        value, _ = await likelihood_diversity(recs, "http://vllm/v1", http=http)
    assert value == pytest.approx(0.0)


async def test_likelihood_diversity_refuses_an_endpoint_without_logprobs(sim):
    with pytest.raises(LogprobsUnavailable):
        await likelihood_diversity(two_agent_records(), sim.base_url)
