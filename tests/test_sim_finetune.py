"""The simulator's files and fine-tuning jobs over real HTTP, through the openai client."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from openai import AsyncOpenAI

from harness.config import SimulatorConfig
from harness.sim import SimServer
from harness.sim.knowledge import final_answer


def q(i: int) -> str:
    return f"What is the result of {i}+{i % 7}*3+2-{i % 5}*4? Make sure to state your answer at the end."


def gold(i: int) -> int:
    return i + (i % 7) * 3 + 2 - (i % 5) * 4


def example(i: int, correct: bool = True, critic: bool = False) -> dict:
    answer = gold(i) if correct else gold(i) + 3
    if critic:
        return {
            "messages": [
                {"role": "user", "content": q(i)},
                {"role": "assistant", "content": f"First try.\n\\boxed{{{gold(i) + 1}}}", "weight": 0},
                {"role": "user", "content": "Other agents answered \\boxed{%d}. Update your answer." % gold(i)},
                {"role": "assistant", "content": f"I correct it.\n\\boxed{{{answer}}}"},
            ]
        }
    return {"messages": [{"role": "user", "content": q(i)}, {"role": "assistant", "content": f"Work.\n\\boxed{{{answer}}}"}]}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def sim():
    servers: list[SimServer] = []

    def start(state_dir=None, **cfg):
        server = SimServer(SimulatorConfig(**cfg), state_dir=state_dir).start()
        servers.append(server)
        return server, AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10)

    yield start
    for s in servers:
        s.stop()


async def upload(client, content: bytes, name="train.jsonl"):
    return await client.files.create(file=(name, content), purpose="fine-tune")


async def wait(client, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        job = await client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.05)


async def accuracy(client, model: str, n: int = 60) -> float:
    right = 0
    for i in range(n):
        r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": q(i)}], seed=i)
        right += final_answer(r.choices[0].message.content) == str(gold(i))
    return right / n


async def test_files_roundtrip(sim):
    _, client = sim()
    content = jsonl(example(i) for i in range(12))
    f = await upload(client, content)
    assert f.id.startswith("file-") and f.bytes == len(content) and f.purpose == "fine-tune"
    assert (await client.files.retrieve(f.id)).filename == "train.jsonl"
    assert (await client.files.content(f.id)).read() == content
    assert f.id in [x.id async for x in client.files.list()]
    assert (await client.files.delete(f.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(f.id)


async def test_job_runs_to_success_and_the_model_answers(sim):
    _, client = sim(job_seconds=0.3, skill=0)
    f = await upload(client, jsonl(example(i) for i in range(60)))
    job = await client.fine_tuning.jobs.create(
        model="sim-base",
        training_file=f.id,
        suffix="agent0",
        seed=3,
        metadata={"run": "r1", "agent": "0"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.status == "validating_files" and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 2 and job.metadata == {"run": "r1", "agent": "0"}
    done = await wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:sim-base:sim-org:agent0:{job.id[6:14]}"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at
    assert done.fine_tuned_model in [m.id async for m in client.models.list()]
    # Trained on 60 correct answers, a skill-0 model improves (rule: 0 -> 0.5).
    assert await accuracy(client, "sim-base") == 0
    assert 0.25 < await accuracy(client, done.fine_tuned_model) < 0.75
    events = [e.message async for e in client.fine_tuning.jobs.list_events(job.id)]
    assert "successfully completed" in events[0] and "Validating" in events[-1]


async def test_training_on_wrong_answers_hurts(sim):
    _, client = sim(job_seconds=0.1, skill=1)
    f = await upload(client, jsonl(example(i, correct=False) for i in range(60)))
    job = await wait(client, (await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id)).id)
    assert job.status == "succeeded"
    assert await accuracy(client, job.fine_tuned_model) < 0.8


async def test_critic_data_and_finetuning_a_finetuned_model(sim):
    _, client = sim(job_seconds=0.1, skill=0.5)
    f = await upload(client, jsonl(example(i, critic=True) for i in range(20)))
    first = await wait(client, (await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id, suffix="c")).id)
    assert first.status == "succeeded"
    second = await client.fine_tuning.jobs.create(model=first.fine_tuned_model, training_file=f.id, suffix="c2")
    assert second.model == first.fine_tuned_model
    second = await wait(client, second.id)
    assert second.fine_tuned_model.startswith("ft:sim-base:sim-org:c2:")
    events = [e.message async for e in client.fine_tuning.jobs.list_events(second.id)]
    assert any("correction" in m for m in events)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([example(i) for i in range(2)] + ["not json"] + [example(i) for i in range(12)], "line 3"),
        ([example(i) for i in range(5)], "at least 10"),
        ([{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}] * 12, "role"),
        ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}] * 12, "empty content"),
        ([{"prompt": "x", "completion": "y"}] * 12, "messages"),
    ],
)
async def test_bad_training_files_fail_validation(sim, rows, expected):
    _, client = sim(job_seconds=0.1)
    content = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    f = await upload(client, content)
    job = await wait(client, (await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id)).id)
    assert job.status == "failed"
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert expected in job.error.message and f.id in job.error.message
    assert job.fine_tuned_model is None


async def test_create_rejects_unknown_files_and_models(sim):
    _, client = sim()
    f = await upload(client, jsonl(example(i) for i in range(12)))
    with pytest.raises(openai.BadRequestError) as e:
        await client.fine_tuning.jobs.create(model="sim-base", training_file="file-nope")
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:
        await client.fine_tuning.jobs.create(model="gpt-nothing", training_file=f.id)
    assert e.value.code == "model_not_available"
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve("ftjob-nope")


async def test_injected_job_failures(sim):
    _, client = sim(job_seconds=0.1, job_failure_rate=1)
    f = await upload(client, jsonl(example(i) for i in range(12)))
    job = await wait(client, (await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id)).id)
    assert job.status == "failed" and job.error.code and job.error.message


async def test_cancel(sim):
    _, client = sim(job_seconds=30)
    f = await upload(client, jsonl(example(i) for i in range(12)))
    job = await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id)
    cancelled = await client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.cancel(job.id)
    events = [e.message async for e in client.fine_tuning.jobs.list_events(job.id)]
    assert "cancelled" in events[0]


async def test_list_filters_by_metadata_and_pages(sim):
    _, client = sim(job_seconds=30)
    f = await upload(client, jsonl(example(i) for i in range(12)))
    ids = {}
    for agent in range(3):
        for role in ("generator", "critic"):
            job = await client.fine_tuning.jobs.create(
                model="sim-base", training_file=f.id, metadata={"run": "r", "agent": str(agent), "role": role}
            )
            ids[(agent, role)] = job.id
    page = await client.fine_tuning.jobs.list(metadata={"agent": "1", "role": "critic"})
    assert [j.id for j in page.data] == [ids[(1, "critic")]]
    assert len([j async for j in client.fine_tuning.jobs.list(metadata={"run": "r"})]) == 6
    assert (await client.fine_tuning.jobs.list(metadata={"run": "other"})).data == []
    first = await client.fine_tuning.jobs.list(limit=4)
    assert len(first.data) == 4 and first.has_more
    rest = await client.fine_tuning.jobs.list(limit=4, after=first.data[-1].id)
    assert len(rest.data) == 2 and not rest.has_more


async def test_state_survives_a_restart(sim, tmp_path):
    state = tmp_path / "simulator"
    server, client = sim(state_dir=state, job_seconds=1.0)
    f = await upload(client, jsonl(example(i) for i in range(12)))
    job = await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id, metadata={"run": "x"})
    server.stop()  # dies while the job is validating

    _, client = sim(state_dir=state, job_seconds=1.0)
    assert (await client.files.content(f.id)).read() == jsonl(example(i) for i in range(12))
    assert [j.id for j in (await client.fine_tuning.jobs.list(metadata={"run": "x"})).data] == [job.id]
    done = await wait(client, job.id)
    assert done.status == "succeeded"
    r = await client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": q(1)}])
    assert r.system_fingerprint == "simulated"


async def test_lists_files_and_jobs_are_shaped_as_the_spec_says(sim):
    """OpenAI's OpenAPI spec v2.3.0: ListPaginatedFineTuningJobsResponse and the events list hold
    object/data/has_more only; ListFilesResponse adds first_id/last_id (strings, so an empty page
    leaves them out); OpenAIFile has no null expires_at; estimated_finish is null unless running."""
    import httpx2

    server, client = sim(job_seconds=1.0)
    empty = {"object": "list", "data": [], "has_more": False}
    async with httpx2.AsyncClient(base_url=server.base_url, headers={"Authorization": "Bearer x"}) as http:
        assert (await http.get("/files")).json() == empty
        assert (await http.get("/fine_tuning/jobs")).json() == empty
        assert (await http.get("/fine_tuning/jobs", params={"metadata[run]": "none"})).json() == empty
        f = await upload(client, jsonl(example(i) for i in range(12)))
        obj = (await http.get(f"/files/{f.id}")).json()
        assert set(obj) == {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}
        assert obj["object"] == "file" and obj["purpose"] == "fine-tune"
        files = (await http.get("/files")).json()
        assert files["first_id"] == files["last_id"] == f.id and files["has_more"] is False
        job = await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id)
        listed = (await http.get("/fine_tuning/jobs")).json()
        assert set(listed) == {"object", "data", "has_more"}
        assert set((await http.get(f"/fine_tuning/jobs/{job.id}/events")).json()) == {"object", "data", "has_more"}
    seen = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        j = await client.fine_tuning.jobs.retrieve(job.id)
        seen.setdefault(j.status, j.estimated_finish)
        if j.status == "succeeded":
            break
        await asyncio.sleep(0.02)
    assert seen["validating_files"] is None and seen["succeeded"] is None
    assert isinstance(seen["running"], int)


async def test_pause_and_resume_follow_the_spec(sim):
    _, client = sim(job_seconds=0.6)
    f = await upload(client, jsonl(example(i) for i in range(12)))
    job = await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id)
    paused = await client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused" and paused.estimated_finish is None
    await asyncio.sleep(0.8)  # longer than the whole job: a paused job does not move on
    assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "paused"
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.pause(job.id)
    await client.fine_tuning.jobs.resume(job.id)
    assert (await wait(client, job.id)).status == "succeeded"
    events = [e.message async for e in client.fine_tuning.jobs.list_events(job.id)]
    assert "Fine-tuning job paused" in events and "Fine-tuning job resumed" in events
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.resume(job.id)


async def test_seed_and_learning_rate_outside_the_spec_are_refused(sim):
    _, client = sim()
    f = await upload(client, jsonl(example(i) for i in range(12)))
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id, seed=2**31)
    with pytest.raises(openai.BadRequestError):
        await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id, method={
            "type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 0}}})
    big = await client.fine_tuning.jobs.create(model="sim-base", training_file=f.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 500}}})
    assert big.hyperparameters.learning_rate_multiplier == 500  # the spec sets no maximum
