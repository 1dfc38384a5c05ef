"""The OpenAI fine-tuning provider, over real HTTP against the simulator on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from harness.config import Hyperparameters, SimulatorConfig
from harness.errors import FinetuneError
from harness.providers.base import FinetuneRequest, JobStatus
from harness.providers.openai_ft import OpenAIFinetuneProvider

BASE = "sim-base"


def training_file(path: Path, n: int = 12) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def request(path: Path, agent: int = 0, **kw) -> FinetuneRequest:
    md = {"harness_run": "test-run", "iteration": "1", "role": "generator", "agent": str(agent)}
    return FinetuneRequest(training_file=path, base_model=BASE, metadata=md, suffix=f"t-g{agent}", seed=7,
                           hyperparameters=Hyperparameters(), **kw)


def provider(base_url: str) -> OpenAIFinetuneProvider:
    # Tiny backoff: the tests exercise retries without waiting for them.
    return OpenAIFinetuneProvider(base_url, "sim-key", max_retries=3, poll_interval_s=0.05, backoff_base_s=0.01)


@pytest.fixture
def sim_factory(tmp_path):
    from harness.sim import SimServer

    def start(job_seconds: float = 0.5):
        return SimServer(SimulatorConfig(job_seconds=job_seconds), state_dir=tmp_path / "sim-state")
    return start


@pytest.fixture
def sim(sim_factory):
    with sim_factory() as server:
        yield server


async def raw_jobs(base_url: str, metadata: dict[str, str]) -> list:
    async with AsyncOpenAI(base_url=base_url, api_key="sim-key", max_retries=0) as client:
        return [j async for j in client.fine_tuning.jobs.list(**({"metadata": metadata} if metadata else {}))]


async def raw_files(base_url: str) -> list:
    async with AsyncOpenAI(base_url=base_url, api_key="sim-key", max_retries=0) as client:
        return [f async for f in client.files.list(purpose="fine-tune")]


# ----------------------------------------------------------------------------- over HTTP

async def test_job_succeeds_end_to_end(sim, tmp_path):
    path = training_file(tmp_path / "generator-0.jsonl")
    async with provider(sim.base_url) as p:
        state = await p.submit(request(path))
        assert state.status in (JobStatus.VALIDATING, JobStatus.QUEUED, JobStatus.RUNNING)
        assert state.file_id and state.metadata["agent"] == "0"
        seen = []
        final = await p.wait(state.job_id, on_update=lambda s: seen.append(s.status))
    assert final.status is JobStatus.SUCCEEDED, final.error
    assert final.model_id and final.model_id.startswith(f"ft:{BASE}:") and "t-g0" in final.model_id
    assert final.trained_tokens and final.trained_tokens > 0
    assert final.job_id == state.job_id and seen[-1] is JobStatus.SUCCEEDED
    jobs = await raw_jobs(sim.base_url, {"harness_run": "test-run"})
    assert len(jobs) == 1
    hp = jobs[0].method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, 1, 1.0)


async def test_validation_failure_surfaces_provider_message(sim, tmp_path):
    path = training_file(tmp_path / "critic-0.jsonl", n=3)  # OpenAI needs at least 10 examples
    async with provider(sim.base_url) as p:
        state = await p.submit(request(path))
        final = await p.wait(state.job_id)
    assert final.status is JobStatus.FAILED and final.model_id is None
    raw = (await raw_jobs(sim.base_url, {"harness_run": "test-run"}))[0]
    assert raw.error is not None and final.error == raw.error.message  # verbatim
    assert "at least 10" in final.error


async def test_cancel(sim_factory, tmp_path):
    path = training_file(tmp_path / "generator-0.jsonl")
    with sim_factory(job_seconds=60) as sim:
        async with provider(sim.base_url) as p:
            state = await p.submit(request(path))
            cancelled = await p.cancel(state.job_id)
            assert cancelled.status is JobStatus.CANCELLED
            assert (await p.refresh(state.job_id)).status is JobStatus.CANCELLED
            assert await p.events(state.job_id)  # the history is readable, newest last
            # A cancelled job is not "the" job any more: submitting again starts a fresh one.
            again = await p.submit(request(path))
            assert again.job_id != state.job_id
            await p.cancel(again.job_id)
            # Cancelling a job that already ended reports its state instead of failing.
            assert (await p.cancel(again.job_id)).status is JobStatus.CANCELLED


async def test_restart_mid_job_never_starts_a_second_job(sim_factory, tmp_path):
    path = training_file(tmp_path / "generator-1.jsonl")
    with sim_factory(job_seconds=2.5) as sim:
        async with provider(sim.base_url) as first:
            started = await first.submit(request(path, agent=1))
    # The harness and the service both restart; a new provider resumes the same request.
    with sim_factory(job_seconds=2.5) as sim:
        async with provider(sim.base_url) as second:
            resumed = await second.submit(request(path, agent=1))
            assert resumed.job_id == started.job_id and not resumed.status.terminal  # still mid-job
            assert (await second.find(request(path, agent=1).metadata)).job_id == started.job_id
            final = await second.wait(resumed.job_id)
        assert final.status is JobStatus.SUCCEEDED
        assert [j.id for j in await raw_jobs(sim.base_url, {"harness_run": "test-run"})] == [started.job_id]
        assert len(await raw_files(sim.base_url)) == 1  # the file was not uploaded twice either


async def test_create_lost_in_transit_is_not_repeated(sim, tmp_path):
    """The job gets created but the reply is lost (a timeout): the retry finds it by metadata."""
    path = training_file(tmp_path / "generator-2.jsonl")
    async with provider(sim.base_url) as p:
        real_create = p._client.fine_tuning.jobs.create
        calls = []

        async def create_then_time_out(**kw):
            calls.append(kw)
            job = await real_create(**kw)
            if len(calls) == 1:
                raise openai.APITimeoutError(request=httpx2.Request("POST", sim.base_url))
            return job

        p._client.fine_tuning.jobs.create = create_then_time_out  # type: ignore[method-assign]
        state = await p.submit(request(path, agent=2))
    assert len(calls) == 1
    jobs = await raw_jobs(sim.base_url, {"harness_run": "test-run", "agent": "2"})
    assert [j.id for j in jobs] == [state.job_id]


async def test_same_data_uploaded_once(sim, tmp_path):
    path = training_file(tmp_path / "critic-1.jsonl")
    async with provider(sim.base_url) as p:
        a = await p.submit(request(path, agent=0))
        b = await p.submit(request(path, agent=1))
    assert a.job_id != b.job_id and a.file_id == b.file_id
    assert len(await raw_files(sim.base_url)) == 1


async def test_unknown_job_is_a_clear_error(sim):
    async with provider(sim.base_url) as p:
        with pytest.raises(FinetuneError, match="ftjob-nope"):
            await p.refresh("ftjob-nope")


# ----------------------------------------------------------------------------- no server needed

async def test_request_without_metadata_is_refused_before_any_call(tmp_path):
    p = provider("http://127.0.0.1:9/v1")  # nothing listens there: no call may be made
    req = request(training_file(tmp_path / "g.jsonl"))
    req.metadata = {}
    with pytest.raises(FinetuneError, match="needs metadata"):
        await p.submit(req)
    req.metadata = {"k" * 65: "v"}
    with pytest.raises(FinetuneError, match="keys may have 64"):
        await p.submit(req)
    await p.close()


def test_job_state_normalization():
    job = SimpleNamespace(id="ftjob-1", status="paused_for_review", fine_tuned_model=None, training_file="file-1",
                          trained_tokens=None, created_at=1, finished_at=None, metadata={"agent": "0"},
                          error=SimpleNamespace(code="quota", message="You have hit your fine-tuning quota."))
    state = OpenAIFinetuneProvider._state(job, "latest")
    assert state.status is JobStatus.UNKNOWN and state.raw_status == "paused_for_review"
    assert state.error == "You have hit your fine-tuning quota." and state.latest_event == "latest"
    job.status, job.error = "succeeded", None
    assert OpenAIFinetuneProvider._state(job).status is JobStatus.SUCCEEDED


# ----------------------------------------------------------------------------- the API's ranges, paused jobs

@pytest.mark.parametrize("change, field", [
    ({"hyperparameters": Hyperparameters(n_epochs=51)}, "n_epochs = 51"),
    ({"hyperparameters": Hyperparameters(batch_size=257)}, "batch_size = 257"),
    ({"seed": 2**31}, "seed = 2147483648"),
    ({"seed": -1}, "seed = -1"),
])
async def test_out_of_range_hyperparameters_and_seed_are_refused_before_any_upload(sim, tmp_path, change, field):
    req = request(training_file(tmp_path / "g.jsonl")).model_copy(update=change)
    async with provider(sim.base_url) as p:
        with pytest.raises(FinetuneError, match=field) as err:
            await p.submit(req)
    assert "nothing was uploaded" in str(err.value)
    assert await raw_files(sim.base_url) == [] and await raw_jobs(sim.base_url, {}) == []


async def test_a_paused_job_is_not_followed_forever_and_a_resume_picks_it_up(tmp_path):
    from harness.sim import SimServer

    path = training_file(tmp_path / "generator-0.jsonl")
    with SimServer(SimulatorConfig(job_seconds=0.5, job_pause_rate=1.0), state_dir=tmp_path / "sim") as sim:
        async with provider(sim.base_url) as p:
            p.paused_timeout_s = 0.5
            state = await p.submit(request(path))
            final = await p.wait(state.job_id)
            assert final.status is JobStatus.PAUSED and final.raw_status == "paused"
            assert "finetune.paused_timeout_s" in final.error and "--resume" in final.error
            # Its owner resumes it at the provider; the next submit finds the same job, no second one.
            async with AsyncOpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0) as client:
                await client.fine_tuning.jobs.resume(state.job_id)
            again = await p.submit(request(path))
            assert again.job_id == state.job_id
            assert (await p.wait(again.job_id)).status is JobStatus.SUCCEEDED
        assert len(await raw_jobs(sim.base_url, {})) == 1
