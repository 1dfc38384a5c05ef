"""Debates through the Batch API (`endpoint.batch: true`), against the simulator's /v1/batches on
127.0.0.1: same results as direct calls at half the price, never a batch submitted twice, failed
lines sent again, and the simulator's shapes as OpenAI's spec has them."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import jsonschema
import pytest

from harness.config import EndpointConfig, SamplingConfig, SimulatorConfig
from harness.diversity import DiversityMetrics
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.llm.batch import debate_client
from harness.llm.batch_records import BatchBook, BatchRecord, BatchRequest
from harness.llm.batch_settings import BatchSettings
from harness.records import DebateRecord, IterationMetrics, Message, SampleId, UsageRecord
from harness.sim import SimServer
from harness.sim.batches import SimBatch

SPECS = Path(__file__).parent / "fixtures" / "specs"
SMALL = ["--set", "task.n_test=4", "--set", "task.n_train=4", "--set", "finetune.iterations=0"]
BATCH = ["--set", "endpoint.batch=true", "--set", "endpoint.simulator.batch_seconds=0.2",
         "--set", "endpoint.batch_settings.poll_interval_s=0.05", "--set", "endpoint.batch_settings.gather_s=0.1"]


def _sim_batches(run_dir: Path) -> list[SimBatch]:
    """The batches the run's simulator received (its state persists in the run directory)."""
    return [SimBatch.model_validate_json(p.read_bytes())
            for p in sorted((run_dir / "simulator" / "batches").glob("*.json"))]


def _custom_ids(run_dir: Path, batch: SimBatch) -> list[str]:
    data = (run_dir / "simulator" / "files" / f"{batch.input_file_id}.data").read_bytes()
    return [json.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]


def _records(run_dir: Path) -> dict[str, dict[str, dict]]:
    """Every debate record by file and problem (records are appended as they finish, in any order)."""
    return {str(p.relative_to(run_dir)): {r.problem.id: r.model_dump() for r in read_jsonl(p, DebateRecord)}
            for p in sorted(run_dir.glob("iter-*/debate-*.jsonl"))}


def _debate_cost(run_dir: Path, purposes: tuple[str, ...] = ("debate", "summary")) -> tuple[float, list[UsageRecord]]:
    lines = [u for u in read_jsonl(run_dir / "usage.jsonl", UsageRecord) if u.purpose in purposes]
    return sum(u.cost_usd or 0.0 for u in lines), lines


def test_batch_debates_give_the_direct_results_at_half_the_price(cli, tmp_path):
    loop = ["--set", "task.n_test=4", "--set", "task.n_train=4", "--set", "finetune.iterations=1",
            "--set", "finetune.min_examples=1"]
    direct = cli("--run-dir", "direct", *loop)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    batched = cli("--run-dir", "batched", *loop, *BATCH)
    assert batched.returncode == 0, batched.stdout + batched.stderr
    d, b = tmp_path / "direct", tmp_path / "batched"
    assert _records(b) == _records(d)  # every turn, answer and vote, finetuned iteration included
    for k in (0, 1):
        metrics = [IterationMetrics.model_validate_json((r / f"iter-{k}" / "metrics.json").read_text()) for r in (d, b)]
        assert metrics[0] == metrics[1]
        # The diversity stage's embeddings (the simulator's sim-embed) went out in a batch too.
        diversity = [DiversityMetrics.model_validate_json((r / f"iter-{k}" / "diversity.json").read_text())
                     for r in (d, b)]
        assert diversity[0].embedding_dissimilarity is not None and diversity[0] == diversity[1]
    d_embed, d_embed_lines = _debate_cost(d, ("embed",))
    b_embed, b_embed_lines = _debate_cost(b, ("embed",))
    assert len(b_embed_lines) == len(d_embed_lines) == 2 and all(u.batch_id and not u.cached for u in b_embed_lines)
    assert d_embed > 0 and b_embed == pytest.approx(0.5 * d_embed, rel=1e-9)
    d_cost, d_lines = _debate_cost(d)
    b_cost, b_lines = _debate_cost(b)
    assert len(b_lines) == len(d_lines) and all(u.batch_id and not u.cached for u in b_lines)
    assert not any(u.batch_id for u in d_lines)
    assert b_cost == pytest.approx(0.5 * d_cost, rel=1e-9)
    batched_calls = len(b_lines) + len(b_embed_lines)
    assert f"{batched_calls} through the Batch API at half price" in " ".join(batched.stdout.split())
    # One batch per model and round: 3 rounds of batches (answers, summaries, answers) per debated split.
    sim = _sim_batches(b)
    assert all(s.status_at(time.time()) == "completed" and s.failed == 0 for s in sim)
    ids = [cid for s in sim for cid in _custom_ids(b, s)]
    assert len(ids) == len(set(ids)) == len(b_lines) + len(b_embed_lines)  # each call in exactly one batch
    assert sorted(s.endpoint for s in sim).count("/v1/embeddings") == 2  # one per iteration's diversity stage
    book = [BatchRecord.model_validate_json(p.read_bytes()) for p in (b / "batches").glob("*.json")]
    assert sorted(r.batch_id for r in book) == sorted(s.id for s in sim)
    assert all(r.state == "done" for r in book)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/embeddings"])
def test_a_run_killed_while_its_batch_is_in_flight_resumes_by_polling_it(tmp_path, endpoint):
    """Killed while a debate round's batch, or the diversity stage's embeddings batch, is out."""
    args = [sys.executable, "-m", "harness.loop", "--run-dir", "run", *SMALL, *BATCH,
            "--set", "endpoint.simulator.batch_seconds=2"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    run_dir = tmp_path / "run"
    submitted = None
    try:
        deadline = time.monotonic() + 120
        while submitted is None and time.monotonic() < deadline and proc.poll() is None:
            for p in (run_dir / "batches").glob("*.json"):
                rec = BatchRecord.model_validate_json(p.read_bytes())
                if rec.batch_id is not None and rec.endpoint == endpoint:
                    submitted = rec
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert submitted is not None, "the run submitted no batch"
    debated = run_dir / "iter-0" / "debate-test.jsonl"
    if endpoint == "/v1/chat/completions":
        assert not debated.exists() or not read_jsonl(debated, DebateRecord)  # killed mid-debate
    else:
        assert not (run_dir / "iter-0" / "diversity.json").exists()  # killed in the diversity stage

    resumed = subprocess.run([sys.executable, "-m", "harness.loop", "--resume", "run"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=240, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    sim = _sim_batches(run_dir)
    ids = [cid for s in sim for cid in _custom_ids(run_dir, s)]
    assert len(ids) == len(set(ids)), "a request went out in two batches"
    assert sum(s.id == submitted.batch_id for s in sim) == 1
    assert {cid for cid in _custom_ids(run_dir, next(s for s in sim if s.id == submitted.batch_id))} == \
        {r.custom_id for r in submitted.requests}
    # Round 0, its summaries, round 1, the embeddings: the one in flight adopted, not sent again.
    assert sorted(s.endpoint for s in sim) == ["/v1/chat/completions"] * 3 + ["/v1/embeddings"]
    usage = [u for u in read_jsonl(run_dir / "usage.jsonl", UsageRecord) if u.batch_id]
    assert len(usage) == len({u.call_id for u in usage}) == len(ids)  # each answer recorded once
    assert len(read_jsonl(run_dir / "iter-0" / "debate-test.jsonl", DebateRecord)) == 4
    diversity = DiversityMetrics.model_validate_json((run_dir / "iter-0" / "diversity.json").read_bytes())
    assert diversity.embedding_dissimilarity is not None


def test_failed_and_expired_lines_go_out_again_in_the_next_batch(cli, tmp_path):
    flaky = ["--set", "endpoint.simulator.batch_error_rate=0.3", "--set", "endpoint.simulator.batch_expire_rate=0.4",
             "--set", "endpoint.batch_settings.retries=6"]
    result = cli("--run-dir", "flaky", *SMALL, *BATCH, *flaky)
    assert result.returncode == 0, result.stdout + result.stderr
    assert cli("--run-dir", "clean", *SMALL).returncode == 0  # direct: the same answers, as the first test shows
    run_dir = tmp_path / "flaky"
    assert _records(run_dir) == _records(tmp_path / "clean")  # the failures changed nothing
    sim = _sim_batches(run_dir)
    assert any(s.failed for s in sim), "the simulator failed no line"
    assert any(s.status_at(time.time()) == "expired" for s in sim), "no batch expired"
    seen: dict[str, int] = {}
    for s in sim:
        for cid in _custom_ids(run_dir, s):
            seen[cid] = seen.get(cid, 0) + 1
    assert max(seen.values()) > 1  # a failed request went out again
    usage = [u for u in read_jsonl(run_dir / "usage.jsonl", UsageRecord) if u.batch_id]
    assert len(usage) == len(seen)  # each request answered and recorded once, the failures not billed


def test_a_request_out_of_retries_stops_the_run_and_resume_sends_it_again(cli, tmp_path):
    flaky = ["--set", "endpoint.simulator.batch_error_rate=0.5", "--set", "endpoint.batch_settings.retries=0"]
    result = cli("--run-dir", "run", *SMALL, *BATCH, *flaky)
    assert result.returncode == 1, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "failed" in out and "simulated fault" in out and "Traceback" not in out
    assert "--resume" in out
    resumed = cli("--resume", "run", "--set", "endpoint.batch_settings.retries=8")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(read_jsonl(tmp_path / "run" / "iter-0" / "debate-test.jsonl", DebateRecord)) == 4


def test_the_budget_cap_stops_before_a_batch_is_submitted(cli, tmp_path):
    result = cli("--run-dir", "run", *SMALL, *BATCH, "--set", "budget.max_cost_usd=0.00001")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "budget cap" in result.stdout
    assert not _sim_batches(tmp_path / "run")


def test_dry_run_shows_both_prices_and_the_expected_wait(cli, tmp_path):
    result = cli("--dry-run", "--set", "endpoint.kind=openai", "--set", "models.base=gpt-4.1-mini",
                 "--set", "endpoint.batch=true", "--set", "finetune.iterations=0", env={"OPENAI_API_KEY": "unused"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "cost (USD)" in out and "with batch (USD)" in out
    assert "expected wait 3 rounds of batches" in out and "24h" in out
    row = next(line for line in result.stdout.splitlines() if "debate test" in line)
    direct, batch = (float(x) for x in row.replace("│", " ").split()[-2:])
    assert batch == pytest.approx(direct / 2, abs=1e-4)


def test_batch_on_a_vllm_endpoint_is_refused_at_load(cli):
    result = cli("--set", "endpoint.kind=vllm", "--set", "endpoint.base_url=http://127.0.0.1:9/v1",
                 "--set", "endpoint.batch=true", "--dry-run")
    assert result.returncode == 2 and "endpoint.batch" in result.stdout


# ----------------------------------------------------------------------------- the simulator's shapes

def _schema(name: str) -> dict:
    return json.loads((SPECS / f"openai-batch-{name}.json").read_text())


def _valid(obj: dict, name: str, *, only_named: bool = True) -> None:
    """Valid against the spec's schema, and (what the simulator sends) no field the schema does
    not name: the spec allows extra fields, so a misspelt one would pass the schema alone."""
    schema = _schema(name)
    jsonschema.validate(obj, schema)
    if only_named:
        assert set(obj) <= set(schema["properties"]), set(obj) - set(schema["properties"])


def test_the_simulators_batches_have_the_spec_shapes():
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "sim-base", "seed": i, "messages": [{"role": "user", "content": f"What is {i}+1?"}]}}
             for i in range(3)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "sim-base", "messages": []}})  # refused: no messages
    for line in lines:  # the schema names no `body`; the spec's example and OpenAI's guide have it
        _valid(line, "request-input", only_named=False)
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with SimServer(SimulatorConfig(batch_seconds=0.5)) as server, httpx2.Client(base_url=server.base_url) as http:
        file_id = http.post("/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()["id"]
        create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                  "metadata": {"harness_batch": "t1"}}
        jsonschema.validate(create, _schema("create-request"))
        batch = http.post("/batches", json=create).json()
        _valid(batch, "batch")
        assert batch["status"] == "validating" and batch["request_counts"]["total"] == 4
        statuses = {batch["status"]}
        while batch["status"] != "completed":
            time.sleep(0.05)
            batch = http.get(f"/batches/{batch['id']}").json()
            _valid(batch, "batch")
            statuses.add(batch["status"])
        assert {"in_progress", "completed"} <= statuses
        assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
        assert batch["completed_at"] >= batch["in_progress_at"] >= batch["created_at"]
        out = [json.loads(x) for x in http.get(f"/files/{batch['output_file_id']}/content").content.splitlines()]
        err = [json.loads(x) for x in http.get(f"/files/{batch['error_file_id']}/content").content.splitlines()]
        for line in out + err:
            _valid(line, "request-output")
        assert sorted(x["custom_id"] for x in out) == ["r0", "r1", "r2"]
        assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["choices"] for x in out)
        assert err[0]["custom_id"] == "bad" and err[0]["response"]["status_code"] == 400
        # The same seeded request asked directly gets the same answer.
        direct = http.post("/chat/completions", json=lines[1]["body"]).json()
        in_batch = out[1]["response"]["body"]["choices"][0]["message"]["content"]
        assert direct["choices"][0]["message"]["content"] == in_batch

        second = http.post("/batches", json=create).json()
        cancelled = http.post(f"/batches/{second['id']}/cancel").json()
        _valid(cancelled, "batch")
        assert cancelled["status"] == "cancelling"
        listing = http.get("/batches", params={"limit": 1}).json()
        _valid(listing, "list")
        assert listing["has_more"] and listing["data"][0]["id"] == second["id"]
        assert http.get("/batches", params={"after": second["id"]}).json()["data"][0]["id"] == batch["id"]
        assert http.post(f"/batches/{batch['id']}/cancel").status_code == 409  # completed already

        mixed = [dict(lines[0], custom_id="a"), dict(lines[0], custom_id="a")]
        bad_file = http.post("/files", files={"file": ("bad.jsonl", "".join(json.dumps(x) + "\n" for x in mixed))},
                             data={"purpose": "batch"}).json()["id"]
        failed = http.post("/batches", json={**create, "input_file_id": bad_file}).json()
        while failed["status"] == "validating":
            time.sleep(0.05)
            failed = http.get(f"/batches/{failed['id']}").json()
        _valid(failed, "batch")
        assert failed["status"] == "failed" and failed["errors"]["data"][0]["code"] == "duplicate_custom_id"


def _floats(embedding: list[float] | str) -> list[float]:
    if isinstance(embedding, list):
        return embedding
    raw = base64.b64decode(embedding)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_the_simulators_embeddings_batches_have_the_spec_shapes():
    lines = [{"custom_id": "e0", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "sim-embed", "input": ["two plus two is four", "the answer is 4"],
                       "encoding_format": "base64"}},
             {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "sim-embed", "input": ["a third text"], "encoding_format": "float"}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "sim-embed", "input": [""]}}]  # refused: an empty input
    for line in lines:
        _valid(line, "request-input", only_named=False)
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with SimServer(SimulatorConfig(batch_seconds=0.3)) as server, httpx2.Client(base_url=server.base_url) as http:
        file_id = http.post("/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()["id"]
        create = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
        jsonschema.validate(create, _schema("create-request"))
        batch = http.post("/batches", json=create).json()
        while batch["status"] != "completed":
            time.sleep(0.05)
            batch = http.get(f"/batches/{batch['id']}").json()
        _valid(batch, "batch")
        assert batch["endpoint"] == "/v1/embeddings"
        assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        out = [json.loads(x) for x in http.get(f"/files/{batch['output_file_id']}/content").content.splitlines()]
        err = [json.loads(x) for x in http.get(f"/files/{batch['error_file_id']}/content").content.splitlines()]
        for line in out + err:
            _valid(line, "request-output")
        for line in out:
            body = line["response"]["body"]
            # The spec types `embedding` as numbers only; with encoding_format base64 (what the SDK
            # asks for) it is their little-endian float32 bytes in base64: checked decoded.
            decoded = {**body, "data": [{**d, "embedding": _floats(d["embedding"])} for d in body["data"]]}
            _valid(decoded, "embedding-response")
            assert all(set(d) <= {"index", "object", "embedding"} for d in body["data"])
            # The same request asked directly gets the same vectors.
            direct = http.post("/embeddings", json=next(x["body"] for x in lines if x["custom_id"] == line["custom_id"]))
            assert direct.json()["data"] == body["data"]
        assert sorted(len(x["response"]["body"]["data"]) for x in out) == [1, 2]
        assert err[0]["custom_id"] == "bad" and err[0]["response"]["status_code"] == 400


# ----------------------------------------------------------------------------- records of an earlier session

def _line(key: str, body: dict) -> str:
    return json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"


async def test_a_batch_created_before_a_crash_is_adopted_and_one_never_created_goes_out_anew(tmp_path):
    """A session died after creating batch A (its id never reached the record) and after
    preparing batch B (never created). The next session adopts A, found by its metadata tag,
    and sends B's request in a new batch: 2 batches on the server, not 3."""
    endpoint = EndpointConfig(batch=True, batch_settings=BatchSettings(poll_interval_s=0.05, gather_s=0.05))
    samples = [SampleId(iteration=0, split="test", problem_id=f"p{i}", agent=i, round=0) for i in range(3)]
    messages = [[Message(role="user", content=f"What is {i}+2?")] for i in range(3)]
    with SimServer(SimulatorConfig(batch_seconds=0.3), state_dir=tmp_path / "sim") as sim:
        async with LLMClient(base_url=sim.base_url, api_key="x", run_dir=tmp_path / "run", endpoint=endpoint,
                             sampling=SamplingConfig()) as client:
            reqs = [client.chat_request("sim-base", m, s) for m, s in zip(messages, samples)]
            book = BatchBook(tmp_path / "run")
            records = []
            for name, picked in (("a", [0, 1]), ("b", [2])):
                rec = BatchRecord(id=f"earlier-{name}", run="run-1", model="sim-base", requests=[
                    BatchRequest(custom_id=reqs[i][0], model="sim-base", sample=samples[i], purpose="debate")
                    for i in picked])
                book.prepare(rec, "".join(_line(reqs[i][0], reqs[i][1]) for i in picked).encode())
                records.append(rec)
            with httpx2.Client(base_url=sim.base_url) as http:
                content = book.input_path(records[0]).read_bytes()
                file_id = http.post("/files", files={"file": (records[0].filename, content)},
                                    data={"purpose": "batch"}).json()["id"]
                book.save(records[0].model_copy(update={"state": "uploaded", "input_file_id": file_id}))
                created = http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                      "completion_window": "24h",
                                                      "metadata": {"harness_batch": "earlier-a"}}).json()
            async with debate_client(endpoint, client, tmp_path / "run", "run-1", sim.base_url) as chat:
                answers = await asyncio.gather(*(chat.chat("sim-base", m, s) for m, s in zip(messages, samples)))
        assert all(a.text and not a.cached for a in answers)
        assert [a.usage.batch_id for a in answers[:2]] == [created["id"]] * 2
        with httpx2.Client(base_url=sim.base_url) as http:
            on_server = http.get("/batches").json()["data"]
        assert len(on_server) == 2
        after = {r.id: r for r in BatchBook(tmp_path / "run").records.values()}
        assert after["earlier-a"].state == "done" and after["earlier-a"].batch_id == created["id"]
        assert after["earlier-b"].state == "abandoned" and after["earlier-b"].batch_id is None
        assert answers[2].usage.batch_id in {b["id"] for b in on_server} - {created["id"]}


def test_an_expired_batch_has_the_spec_shape_and_answers_part_of_its_lines():
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "sim-base", "seed": i, "messages": [{"role": "user", "content": f"{i}+1?"}]}}
             for i in range(4)]
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with SimServer(SimulatorConfig(batch_seconds=0.2, batch_expire_rate=1.0)) as server, \
            httpx2.Client(base_url=server.base_url) as http:
        file_id = http.post("/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()["id"]
        batch = http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"}).json()
        while batch["status"] not in ("expired", "completed"):
            time.sleep(0.05)
            batch = http.get(f"/batches/{batch['id']}").json()
        _valid(batch, "batch")
        assert batch["status"] == "expired" and "expired_at" in batch and "completed_at" not in batch
        assert batch["request_counts"] == {"total": 4, "completed": 2, "failed": 0}
        out = http.get(f"/files/{batch['output_file_id']}/content").content.splitlines()
        assert len(out) == 2
