"""The simulator over real HTTP on 127.0.0.1, through the openai client: chat behaviour,
determinism, faults, embeddings, adapters."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from harness.config import SimulatorConfig
from harness.records import Problem
from harness.sim import SimServer, create_app
from harness.sim.knowledge import boxed_all, final_answer

EXPRESSIONS = [(3, 4, 5, 6, 7, 2), (12, 3, 9, 0, 5, 5), (29, 28, 27, 1, 2, 3), (0, 0, 0, 0, 0, 0), (7, 11, 13, 17, 19, 23)]


def question(e) -> str:
    a, b, c, d, x, y = e
    return f"What is the result of {a}+{b}*{c}+{d}-{x}*{y}? Make sure to state your answer at the end."


def gold(e) -> str:
    a, b, c, d, x, y = e
    return str(a + b * c + d - x * y)


@pytest.fixture
def sim():
    """Start simulators with the given config; all are stopped after the test."""
    servers: list[SimServer] = []

    def start(known_problems=(), state_dir=None, **cfg) -> tuple[SimServer, AsyncOpenAI]:
        server = SimServer(SimulatorConfig(**cfg), state_dir=state_dir, known_problems=known_problems).start()
        servers.append(server)
        return server, AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10)

    yield start
    for s in servers:
        s.stop()


async def ask(client, content, model="sim-base", seed=None, **kw):
    r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], seed=seed, **kw)
    return r.choices[0].message.content


async def test_chat_response_is_openai_shaped_and_marked_simulated(sim):
    _, client = sim(skill=1)
    raw = await client.chat.completions.with_raw_response.create(
        model="sim-base", messages=[{"role": "user", "content": question(EXPRESSIONS[0])}], extra_body={"top_k": 5}
    )
    assert raw.headers["x-simulated"] == "true"
    r = raw.parse()
    assert r.system_fingerprint == "simulated"
    assert r.object == "chat.completion" and r.model == "sim-base"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert final_answer(r.choices[0].message.content) == gold(EXPRESSIONS[0])


async def test_health_and_model_list(sim):
    server, client = sim()
    async with httpx2.AsyncClient() as http:
        health = await http.get(server.base_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.headers["x-simulated"] == "true"
    ids = [m.id async for m in client.models.list()]
    assert "sim-base" in ids
    assert (await client.models.retrieve("sim-anything")).id == "sim-anything"


async def test_arithmetic_correct_at_full_skill_and_wrong_at_zero(sim):
    _, good = sim(skill=1)
    _, bad = sim(skill=0)
    for e in EXPRESSIONS:
        for seed in range(3):
            assert final_answer(await ask(good, question(e), seed=seed)) == gold(e)
            wrong = final_answer(await ask(bad, question(e), seed=seed))
            assert wrong is not None and wrong != gold(e)


async def test_same_request_same_answer_and_request_seeds_give_independent_samples(sim):
    _, client = sim(skill=0.5, seed=3)
    q = question(EXPRESSIONS[4])
    assert await ask(client, q, seed=7) == await ask(client, q, seed=7)
    answers = {final_answer(await ask(client, q, seed=s)) for s in range(30)}
    assert gold(EXPRESSIONS[4]) in answers and len(answers) >= 2


async def test_unseeded_sampling_differs_between_identical_requests(sim):
    # agents sharing a prompt without a seed must not all get one answer, as on a real server
    _, client = sim(skill=0.5, seed=3)
    prompts = [question(e) for e in EXPRESSIONS] + [f"What is {k}+{k}*2+1-0*0?" for k in range(15)]
    pairs = [(await ask(client, q, temperature=1), await ask(client, q, temperature=1)) for q in prompts]
    assert sum(a != b for a, b in pairs) >= 5
    # seeded requests stay reproducible, and greedy decoding gives one answer seed or not
    for q in prompts:
        assert await ask(client, q, seed=5, temperature=1) == await ask(client, q, seed=5, temperature=1)
        assert await ask(client, q, temperature=0) == await ask(client, q, temperature=0)


async def test_config_seed_changes_the_samples(sim):
    _, one = sim(skill=0.5, seed=1)
    _, two = sim(skill=0.5, seed=2)
    a = [await ask(one, question(e), seed=s) for e in EXPRESSIONS for s in range(4)]
    b = [await ask(two, question(e), seed=s) for e in EXPRESSIONS for s in range(4)]
    assert a != b
    _, one_again = sim(skill=0.5, seed=1)
    assert a == [await ask(one_again, question(e), seed=s) for e in EXPRESSIONS for s in range(4)]


async def test_n_choices_are_separate_samples(sim):
    _, client = sim(skill=0.5)
    r = await client.chat.completions.create(
        model="sim-base", messages=[{"role": "user", "content": question(EXPRESSIONS[2])}], n=8, seed=1
    )
    assert [c.index for c in r.choices] == list(range(8))
    assert len({c.message.content for c in r.choices}) > 1


async def test_models_make_their_own_mistakes(sim):
    _, client = sim(skill=0)
    a = [final_answer(await ask(client, question(e), model="sim-a", seed=0)) for e in EXPRESSIONS]
    b = [final_answer(await ask(client, question(e), model="sim-b", seed=0)) for e in EXPRESSIONS]
    assert a != b


async def test_known_and_unknown_questions(sim):
    problem = Problem(id="p1", task="gsm8k", question="Tom has 3 apples and buys 4 more. How many now?", gold="7")
    _, client = sim(skill=1, known_problems=[problem])
    assert final_answer(await ask(client, f"Solve: {problem.question}\nPut the answer in \\boxed{{}}.")) == "7"
    first = final_answer(await ask(client, "Who painted the ceiling?", seed=1))
    assert first is not None and first == final_answer(await ask(client, "Who painted the ceiling?", seed=2))


def debate(problem: str, own: str, others: list[str]) -> list[dict]:
    shown = "\n\n".join(f"One agent's solution: ... \\boxed{{{o}}}" for o in others)
    return [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": f"My reasoning.\n\\boxed{{{own}}}"},
        {"role": "user", "content": f"These are the other agents' solutions:\n{shown}\nGive an updated answer."},
    ]


async def test_later_round_adopts_the_majority_when_fully_persuadable(sim):
    _, pushover = sim(skill=0, persuadability=1)
    _, stubborn = sim(skill=0, persuadability=0)
    q = question(EXPRESSIONS[1])
    for seed in range(5):
        r = await pushover.chat.completions.create(model="sim-base", messages=debate(q, "5", ["7", "7", "9"]), seed=seed)
        assert final_answer(r.choices[0].message.content) == "7"
        r = await stubborn.chat.completions.create(model="sim-base", messages=debate(q, "5", ["7", "7"]), seed=seed)
        assert final_answer(r.choices[0].message.content) == "5"


async def test_later_round_can_switch_to_a_correct_minority_answer(sim):
    _, client = sim(skill=1, persuadability=0)  # correction chance = skill / 2
    q = question(EXPRESSIONS[1])
    finals = []
    for seed in range(30):
        r = await client.chat.completions.create(model="sim-base", messages=debate(q, "5", ["7", gold(EXPRESSIONS[1])]), seed=seed)
        finals.append(final_answer(r.choices[0].message.content))
    assert set(finals) == {"5", gold(EXPRESSIONS[1])}


async def test_summarizer_lists_every_answer(sim):
    _, client = sim()
    text = await ask(client, "Summarize these solutions:\nA: ... \\boxed{12}\nB: ... \\boxed{15}\nC: ... \\boxed{12}")
    assert boxed_all(text) == ["12", "15", "12"]
    assert len(text.strip().splitlines()) == 3
    # A task prompt that merely says "summarize" is still answered as a problem.
    _, solver = sim(skill=1)
    text = await ask(solver, question(EXPRESSIONS[0]) + " Summarize your reasoning.")
    assert final_answer(text) == gold(EXPRESSIONS[0])


async def test_malformed_answers_have_no_final_answer(sim):
    _, client = sim(malformed_rate=1)
    for seed in range(5):
        text = await ask(client, question(EXPRESSIONS[0]), seed=seed)
        assert final_answer(text) is None and not re.search(r"\d", text)


async def test_max_tokens_cuts_the_answer(sim):
    _, client = sim()
    r = await client.chat.completions.create(
        model="sim-base", messages=[{"role": "user", "content": question(EXPRESSIONS[0])}], max_tokens=3
    )
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].message.content) <= 12


async def test_unknown_model_is_404_and_bad_request_is_400(sim):
    _, client = sim()
    with pytest.raises(openai.NotFoundError) as e:
        await ask(client, "hi", model="gpt-nothing")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        await ask(client, "hi", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="sim-base", messages=[{"role": "robot", "content": "x"}])


async def test_rate_limit_gives_429_with_headers(sim):
    _, client = sim(rpm_limit=2, tpm_limit=100_000)
    ok = await client.chat.completions.with_raw_response.create(
        model="sim-base", messages=[{"role": "user", "content": "1+2*3+4-5*6"}])
    # Every answer carries the limits, not only the 429s: a client can pace before it is refused.
    assert ok.headers["x-ratelimit-limit-requests"] == "2" and ok.headers["x-ratelimit-remaining-requests"] == "1"
    await ask(client, "1+2*3+4-5*6")
    with pytest.raises(openai.RateLimitError) as e:
        await ask(client, "1+2*3+4-5*6")
    err = e.value
    assert err.code == "rate_limit_exceeded"
    h = err.response.headers
    # OpenAI's API: retry-after in whole seconds, at least 1 (60/2 = 30 s until one request fits).
    assert h["retry-after"] == "30" and "retry-after-ms" not in h
    wait = re.search(r"Please try again in (\d+(?:\.\d+)?)s", err.message)  # the precise wait is in the message
    assert wait and 29 < float(wait.group(1)) <= 30
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"] and h["x-ratelimit-limit-tokens"] == "100000"
    # Taken when the first request was admitted: its prompt tokens were spent.
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 100_000


async def test_token_budget_refills(sim):
    _, client = sim(tpm_limit=6000)  # 100 tokens a second
    prompt = "word " * 600  # about 750 tokens
    await ask(client, prompt)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(20):
            await ask(client, prompt)
    wait = float(e.value.response.headers["retry-after"])
    await asyncio.sleep(wait + 0.05)
    await ask(client, prompt)


async def test_server_errors_at_full_error_rate(sim):
    _, client = sim(error_rate=1)
    with pytest.raises(openai.InternalServerError) as e:
        await ask(client, question(EXPRESSIONS[0]))
    assert e.value.body["type"] == "server_error"


async def test_retried_requests_eventually_succeed_with_the_same_answer(sim):
    _, flaky = sim(error_rate=0.5, seed=4)
    _, clean = sim(seed=4)
    q = question(EXPRESSIONS[3])
    for attempt in range(40):
        try:
            text = await ask(flaky, q, seed=11)
            break
        except openai.InternalServerError:
            continue
    else:
        pytest.fail("a retried request never succeeded")
    assert text == await ask(clean, q, seed=11)


async def test_timeouts_hang_past_the_client_timeout(sim):
    server, _ = sim(timeout_rate=1)
    client = AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await ask(client, question(EXPRESSIONS[0]))


async def test_latency_is_concurrent(sim):
    _, client = sim(latency_ms=300)
    done: list[float] = []

    async def one(i: int) -> None:
        await ask(client, question(EXPRESSIONS[0]), seed=i)
        done.append(time.monotonic())

    await asyncio.gather(*(one(i) for i in range(40)))
    # Served one after another, answers would come at least 0.3 s apart (load only widens the
    # gaps); served concurrently, they come in bunches.
    gaps = [b - a for a, b in zip(done, done[1:])]
    assert sum(g < 0.3 for g in gaps) >= len(gaps) // 2, gaps


async def test_embeddings_are_deterministic_and_distinct(sim):
    _, client = sim()
    texts = ["The answer is 12.", "The answer is 12.", "A completely different solution path."]
    for kwargs in ({}, {"encoding_format": "float"}):
        r = await client.embeddings.create(model="sim-embed", input=texts, **kwargs)
        vecs = [d.embedding for d in r.data]
        assert len(vecs[0]) == 64 and abs(sum(x * x for x in vecs[0]) - 1) < 1e-5
        assert vecs[0] == pytest.approx(vecs[1]) and vecs[0] != pytest.approx(vecs[2])
    assert r.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="sim-embed", input="")


async def test_lora_adapters_load_answer_and_unload(sim, tmp_path):
    server, client = sim(skill=1)
    (tmp_path / "adapter_config.json").write_text("{}")
    async with httpx2.AsyncClient(base_url=server.base_url) as http:
        r = await http.post("/load_lora_adapter", json={"lora_name": "agent0", "lora_path": str(tmp_path)})
        assert r.status_code == 200, r.text
        assert (await http.post("/load_lora_adapter", json={"lora_name": "agent0", "lora_path": str(tmp_path)})).status_code == 400
        missing = await http.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "nope")})
        assert missing.status_code == 400
        assert "agent0" in [m.id async for m in client.models.list()]
        assert final_answer(await ask(client, question(EXPRESSIONS[0]), model="agent0")) == gold(EXPRESSIONS[0])
        assert (await http.post("/unload_lora_adapter", json={"lora_name": "agent0"})).status_code == 200
        assert (await http.post("/unload_lora_adapter", json={"lora_name": "agent0"})).status_code == 404
    with pytest.raises(openai.NotFoundError):
        await ask(client, question(EXPRESSIONS[0]), model="agent0")


async def test_in_process_app_works_without_a_socket():
    app = create_app(SimulatorConfig(skill=1))
    transport = httpx2.ASGITransport(app=app)
    client = AsyncOpenAI(base_url="http://sim/v1", api_key="x", http_client=httpx2.AsyncClient(transport=transport))
    assert final_answer(await ask(client, question(EXPRESSIONS[2]))) == gold(EXPRESSIONS[2])


def test_sync_context_manager_and_free_ports():
    with SimServer() as a, SimServer() as b:
        assert a.base_url != b.base_url and a.base_url.startswith("http://127.0.0.1:")


def test_standalone_cli_says_it_is_simulated():
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.sim", "--port", "0", "--seed", "3", "--latency-ms", "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("SIMULATED") and "http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        r = httpx2.post(url + "/chat/completions", json={"model": "sim-base", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["x-simulated"] == "true"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
