"""The Together provider over real HTTP against the simulator on 127.0.0.1, whose Together routes
are checked against Together's published OpenAPI spec: every request the provider sends and every
response it reads is validated with jsonschema against the spec's own schemas
(tests/fixtures/specs/together-finetune.json, vendored fragments of togethercomputer/openapi)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx2
import jsonschema
import pytest

from harness.config import Hyperparameters, SimulatorConfig
from harness.errors import ConfigError, FinetuneError
from harness.providers.base import FinetuneRequest, JobStatus
from harness.providers.together_ft import TogetherFinetuneProvider
from harness.providers.together_settings import TogetherSettings

def _json_schema(node: object) -> object:
    """OpenAPI 3.0's `nullable: true` in JSON Schema terms (a null is allowed), recursively."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


SPEC = _json_schema(json.loads((Path(__file__).parent / "fixtures" / "specs" / "together-finetune.json").read_text()))
BASE = "sim-base"
RUN = "test-run-0a1b2c3d"


def schema(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}


def request_schema(route: str) -> dict:
    return {**SPEC["requests"][route], "components": SPEC["components"]}


def check(instance: object, against: dict) -> None:
    jsonschema.Draft202012Validator(against).validate(instance)


# Which spec schema answers which route (2xx); every error answer is ErrorData.
RESPONSES = [("POST", r"/v1/files/upload$", "FileResponse"), ("GET", r"/v1/files/[^/]+$", "FileResponse"),
             ("POST", r"/v1/fine-tunes$", "FinetuneResponseTruncated"), ("GET", r"/v1/fine-tunes$", "FinetuneTruncatedList"),
             ("GET", r"/v1/fine-tunes/[^/]+$", "FinetuneResponse"),
             ("GET", r"/v1/fine-tunes/[^/]+/events$", "FinetuneListEvents"),
             ("POST", r"/v1/fine-tunes/[^/]+/cancel$", "FinetuneResponseTruncated")]


class SpecChecker:
    """httpx2 event hooks: validate each request body and response against the spec."""

    def __init__(self):
        self.seen: list[tuple[str, str, int]] = []
        self.created: list[dict] = []
        self.uploads: list[dict] = []

    async def on_request(self, req: httpx2.Request) -> None:
        body = req.read()
        if req.method == "POST" and req.url.path.endswith("/fine-tunes"):
            sent = json.loads(body)
            against = request_schema("POST /fine-tunes")
            if "from_checkpoint" in sent:  # Together's SDK sends a model OR a checkpoint (see together_ft.py)
                against = {**against, "required": [r for r in against["required"] if r != "model"]}
            check(sent, against)
            self.created.append(sent)
        elif req.url.path.endswith("/files/upload"):
            fields = dict(re.findall(rb'name="(\w+)"(?:; filename="[^"]*")?\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--',
                                     body, re.S))
            form = {k.decode(): v.decode() for k, v in fields.items()}
            check(form, request_schema("POST /files/upload"))
            self.uploads.append(form)

    async def on_response(self, resp: httpx2.Response) -> None:
        await resp.aread()
        method, path = resp.request.method, resp.request.url.path
        self.seen.append((method, path, resp.status_code))
        data = resp.json()
        if resp.status_code >= 400:
            check(data, schema("ErrorData"))
            return
        for m, pattern, name in RESPONSES:
            if m == method and re.search(pattern, path) and "/models/" not in path:
                check(data, schema(name))
                return
        raise AssertionError(f"no spec schema for {method} {path}")

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(event_hooks={"request": [self.on_request], "response": [self.on_response]})


def training_file(path: Path, n: int = 12, critic: bool = False) -> Path:
    rows = []
    for i in range(n):
        answer = {"role": "assistant", "content": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"}
        messages = [{"role": "user", "content": f"What is {i} + {i}?"}, answer]
        if critic:
            messages = [{"role": "user", "content": f"What is {i} + {i}?"},
                        {"role": "assistant", "content": "\\boxed{1}", "weight": 0},
                        {"role": "user", "content": "Others said \\boxed{%d}. Check again." % (2 * i)}, answer]
        rows.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def request(path: Path, agent: int = 0, iteration: int = 1, role: str = "generator", base: str = BASE) -> FinetuneRequest:
    md = {"harness_run": RUN, "iteration": str(iteration), "role": role, "agent": str(agent),
          "data_sha256": "0123456789abcdef"}
    return FinetuneRequest(training_file=path, base_model=base, metadata=md, suffix=f"t-i{iteration}-{role[0]}{agent}",
                           seed=7, hyperparameters=Hyperparameters())


def provider(base_url: str, key: str = "sim-key", checker: SpecChecker | None = None, **kw) -> TogetherFinetuneProvider:
    return TogetherFinetuneProvider(base_url, key, base_model=BASE, max_retries=2, poll_interval_s=0.05,
                                    backoff_base_s=0.01, http_client=checker.client() if checker else None, **kw)


@pytest.fixture
def sim_factory(tmp_path):
    from harness.sim import SimServer

    def start(**kw):
        return SimServer(SimulatorConfig(**{"job_seconds": 0.4, **kw}), state_dir=tmp_path / "sim-state")
    return start


@pytest.fixture
def sim(sim_factory):
    with sim_factory() as server:
        yield server


async def test_two_iterations_follow_the_spec_and_continue_from_the_previous_model(sim, tmp_path):
    spec = SpecChecker()
    p = provider(sim.base_url, checker=spec)
    try:
        first = await p.submit(request(training_file(tmp_path / "g0.jsonl")))
        done = await p.wait(first.job_id)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.model_id and done.model_id.startswith("sim-org/sim-base-t-i1-g0-")
        # Iteration 2 starts from the agent's Together model, by its output name.
        second = await p.submit(request(training_file(tmp_path / "g0-2.jsonl", n=14), iteration=2, base=done.model_id))
        final = await p.wait(second.job_id)
        assert final.status is JobStatus.SUCCEEDED and final.base_model == done.model_id
        assert await p.events(final.job_id)
    finally:
        await p.close()
    assert "model" in spec.created[0] and "from_checkpoint" not in spec.created[0]
    assert spec.created[1]["from_checkpoint"] == done.model_id and "model" not in spec.created[1]
    assert spec.created[0]["training_type"] == {"type": "Lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                                "lora_trainable_modules": "all-linear"}
    assert spec.created[0]["n_epochs"] == 2 and spec.created[0]["random_seed"] == 7
    routes = {(m, re.sub(r"ft-[0-9a-f-]+|file-[0-9a-f-]+", "ID", path)) for m, path, _ in spec.seen}
    assert {("POST", "/v1/files/upload"), ("POST", "/v1/fine-tunes"), ("GET", "/v1/fine-tunes"),
            ("GET", "/v1/fine-tunes/ID"), ("GET", "/v1/fine-tunes/ID/events")} <= routes
    # The finetuned model answers chat calls through the OpenAI-compatible endpoint.
    async with httpx2.AsyncClient() as http:
        reply = await http.post(f"{sim.base_url}/chat/completions", json={
            "model": final.model_id, "messages": [{"role": "user", "content": "What is 2+3*4+1-5*2?"}]})
    assert reply.status_code == 200 and "boxed" in reply.json()["choices"][0]["message"]["content"]


async def test_a_retried_or_resumed_submit_never_creates_a_second_job(sim_factory, tmp_path):
    path = training_file(tmp_path / "c1.jsonl")
    with sim_factory(job_seconds=3) as sim:
        p = provider(sim.base_url)
        first = await p.submit(request(path, agent=1))
        await p.close()
    with sim_factory(job_seconds=3) as sim:  # the service and the harness both restart
        spec = SpecChecker()
        p = provider(sim.base_url, checker=spec)
        try:
            again = await p.submit(request(path, agent=1))
            assert again.job_id == first.job_id and not again.status.terminal
            # A lost registry is rebuilt from the job list: the tags come back from the file name.
            recovered = await p.jobs({"harness_run": RUN})
            assert [s.job_id for s in recovered] == [first.job_id]
            assert recovered[0].metadata == request(path, agent=1).metadata
            assert await p.jobs({"harness_run": "another-run"}) == []
            assert (await p.find({"iteration": "1", "data_sha256": "0123456789abcdef"})).job_id == first.job_id
            cancelled = await p.cancel(first.job_id)
            assert cancelled.raw_status in ("cancel_requested", "cancelled")
            final = await p.wait(first.job_id)
            assert final.status is JobStatus.CANCELLED
            # A cancelled job may be redone: the next submit creates a new one.
            assert (await p.submit(request(path, agent=1))).job_id != first.job_id
        finally:
            await p.close()
        assert not spec.created[1:], "only the redo was created"
        assert len(spec.created) == 1


async def test_per_turn_weights_reach_together_as_explicit_message_weights(sim, tmp_path):
    spec = SpecChecker()
    p = provider(sim.base_url, checker=spec)
    try:
        state = await p.submit(request(training_file(tmp_path / "c0.jsonl", critic=True), role="critic"))
        file_id = state.file_id
    finally:
        await p.close()
    # train_on_inputs must be on for Together to follow weights; every message says its weight.
    assert spec.created[0]["training_method"] == {"method": "sft", "train_on_inputs": True}
    async with httpx2.AsyncClient() as http:
        content = (await http.get(f"{sim.base_url}/files/{file_id}/content")).text
    first = json.loads(content.splitlines()[0])["messages"]
    assert [(m["role"], m["weight"]) for m in first] == [("user", 0), ("assistant", 0), ("user", 0), ("assistant", 1)]
    assert spec.uploads[0]["file_name"] == f"{RUN}.i1.critic.a0.0123456789abcdef.jsonl"


@pytest.mark.parametrize("messages, why", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}], "only 0 and 1"),
    ([{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}], "assistant turns only"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}], "teach nothing"),
    ([{"role": "assistant", "content": "a"}], "where user must come"),
])
async def test_data_together_would_train_wrongly_on_is_refused_before_any_upload(sim, tmp_path, messages, why):
    path = training_file(tmp_path / "bad.jsonl")
    rows = path.read_text().splitlines()
    rows[3] = json.dumps({"messages": messages})
    path.write_text("\n".join(rows) + "\n")
    spec = SpecChecker()
    p = provider(sim.base_url, checker=spec)
    try:
        with pytest.raises(FinetuneError, match=rf"line 4.*{why}.*nothing was uploaded"):
            await p.submit(request(path))
    finally:
        await p.close()
    assert not spec.uploads and not spec.created


async def test_a_bad_key_says_which_variable_to_set(sim, tmp_path):
    p = provider(sim.base_url, key="sim-invalid-key", checker=SpecChecker())
    try:
        with pytest.raises(FinetuneError, match="refused the API key.*TOGETHER_API_KEY"):
            await p.submit(request(training_file(tmp_path / "g.jsonl")))
    finally:
        await p.close()


async def test_no_credit_says_where_to_add_it(sim, tmp_path):
    p = provider(sim.base_url, key="sim-nocredit-key", checker=SpecChecker())
    try:
        with pytest.raises(FinetuneError, match="no credit left.*billing.*--resume"):
            await p.submit(request(training_file(tmp_path / "g.jsonl")))
    finally:
        await p.close()


async def test_a_model_together_cannot_finetune_is_named(sim, tmp_path):
    p = TogetherFinetuneProvider(sim.base_url, "sim-key", base_model="gpt-4.1-mini", max_retries=0,
                                 http_client=SpecChecker().client())
    try:
        with pytest.raises(FinetuneError, match="cannot finetune this model.*gpt-4.1-mini.*models.base"):
            await p.submit(request(training_file(tmp_path / "g.jsonl"), base="gpt-4.1-mini"))
    finally:
        await p.close()


async def test_a_job_failed_at_together_quotes_its_message(sim_factory, tmp_path):
    with sim_factory(job_failure_rate=1.0) as sim:
        p = provider(sim.base_url, checker=SpecChecker())
        try:
            final = await p.wait((await p.submit(request(training_file(tmp_path / "g.jsonl")))).job_id)
        finally:
            await p.close()
    assert final.status is JobStatus.FAILED and final.model_id is None
    assert "internal error during training (simulated failure)" in final.error


async def test_a_file_together_rejects_fails_the_job_with_its_reason(sim, tmp_path):
    p = provider(sim.base_url, checker=SpecChecker())
    try:  # 3 examples: the simulated service wants 10
        final = await p.wait((await p.submit(request(training_file(tmp_path / "g.jsonl", n=3)))).job_id)
    finally:
        await p.close()
    assert final.status is JobStatus.FAILED and "at least 10" in final.error


def test_ranges_are_checked_before_any_call():
    with pytest.raises(ValueError, match="lora_r"):
        TogetherSettings(lora_r=65)
    with pytest.raises(ValueError, match="lora_dropout"):
        TogetherSettings(lora_dropout=1.0)
    with pytest.raises(ConfigError, match="n_epochs = 30.*1 to 20"):
        TogetherFinetuneProvider("http://127.0.0.1:9/v1", "k", base_model=BASE, n_epochs=30)


@pytest.mark.slow
def test_the_demo_runs_on_together_and_survives_a_kill_and_a_lost_registry_and_run_id(tmp_path):
    """`python -m harness.loop --set finetune.provider=together` offline: killed (SIGKILL) while
    its first jobs run, registry.json and every local copy of the run id lost, resumed: every job
    exists once on the (simulated) service and the registry holds Together model names."""
    import signal
    import subprocess
    import sys
    import time

    from harness.registry import Registry

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "harness.loop", "--run-dir", str(run_dir), "--set", "finetune.provider=together",
            "--set", "task.n_test=10", "--set", "task.n_train=40", "--set", "endpoint.simulator.job_seconds=3",
            "--set", "finetune.poll_interval_s=0.1"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running: list = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(running) < 6:
        try:
            reg = Registry.load(run_dir / "registry.json")
            running = [e for e in reg.entries if e.job_id and e.status in ("queued", "running")]
        except Exception:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(running) == 6, "all six jobs of iteration 1 were running when the run was killed"
    run_id = json.loads((run_dir / "run.json").read_text())["run"]
    # Every local copy of the run id is lost too: it comes back from the job list on Together.
    (run_dir / "registry.json").unlink()
    (run_dir / "run.json").unlink()
    config = run_dir / "config.yaml"
    config.write_text("".join(config.read_text().splitlines(keepends=True)[1:]))

    result = subprocess.run([sys.executable, "-m", "harness.loop", "--resume", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert "6 finetuning job(s)" in said and "found at the provider were registered again" in said
    assert f"run id {run_id} was recovered from the together provider's jobs" in said
    reg = Registry.load(run_dir / "registry.json")
    first = [e for e in reg.entries if e.iteration == 1]
    second = [e for e in reg.entries if e.iteration == 2]
    assert {e.job_id for e in first} == {e.job_id for e in running}
    assert len(second) == 6 and all(e.status == "succeeded" for e in reg.entries)
    assert all(e.model_id.startswith("sim-org/sim-base-") for e in reg.entries)
    by_key = {(e.role, e.agent): e.model_id for e in first}
    assert all(e.parent_model == by_key[(e.role, e.agent)] for e in second), "iteration 2 continued each agent's model"
    jobs = [json.loads(p.read_text()) for p in (run_dir / "simulator" / "together-jobs").glob("*.json")]
    assert len(jobs) == 12, "no job was created twice"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and len(summary["iterations"]) == 3


def _math_like(path: Path, split: str, n: int = 500) -> Path:
    """n MATH-shaped problems (levels 1-3 of the bundled sample, each made distinct), so the plan of
    a 500/500 MATH run can be priced offline."""
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "harness" / "resources" / "data" / "math-sample.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("level") in ("Level 1", "Level 2", "Level 3")]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({**rows[i % len(rows)], "problem": f"{rows[i % len(rows)]['problem']} ({split} {i})"}) + "\n")
    return path


@pytest.mark.parametrize("lora", [True, False])
def test_dry_run_prices_a_500_500_math_run_on_together(tmp_path, lora):
    import subprocess
    import sys

    sources = ["--set", f"task.source={_math_like(tmp_path / 'train.jsonl', 'train')}",
               "--set", f"task.test_source={_math_like(tmp_path / 'test.jsonl', 'test')}"]
    result = subprocess.run([sys.executable, "-m", "harness.loop", "--config", "together", "--dry-run", *sources,
                             "--set", f"finetune.together.lora={str(lora).lower()}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env={
                                **__import__("os").environ, "TOGETHER_API_KEY": "", "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert "iter 0: debate train │ 4,500" in said and "iter 0: finetune 6 models" in said
    total = float(re.search(r"total │ [\d,]+ │ [\d,]+ │ [\d,]+ │ ([\d.]+)", said).group(1))
    if lora:  # served serverless: no endpoint to pay for
        assert "LoRA finetuning at $0.48/1M" in said and "dedicated" not in said and 1 < total < 10
    else:  # a full finetune answers only from a dedicated endpoint per model
        assert "6 dedicated endpoints" in said and "$3.36/h" in said and total > 40


def test_together_models_and_their_finetunes_are_priced():
    from harness.llm.pricing import cost_usd, price_for, training_price_for

    base = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
    tuned = "someone/Meta-Llama-3.1-8B-Instruct-Reference-demo-i1-g0-0123456789ab-deadbeef"
    assert price_for(base).input == price_for(tuned).input == 0.18  # serverless LoRA: the base's price
    assert cost_usd(tuned, 1_000_000, 0, 1_000_000) == pytest.approx(0.36)
    assert training_price_for(tuned) == 0.48 and training_price_for("meta-llama/Llama-3.3-70B-Instruct-Turbo") == 2.90
    assert price_for("someone/an-unknown-model") is None  # unknown stays unknown, never free


def test_epochs_beyond_togethers_range_are_refused_at_config_load():
    from harness.config import load_config
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="Together accepts 1 to 20 epochs"):
        load_config(None, ["finetune.provider=together", "finetune.hyperparameters.n_epochs=21"])
    assert load_config(None, ["finetune.provider=together", "finetune.hyperparameters.n_epochs=20"])
