"""The azure provider (Azure OpenAI fine-tuning + ARM deployments) against the simulator on
127.0.0.1, whose ARM Deployments routes are checked against Azure's published spec
(tests/fixtures/specs/azure-cognitiveservices-deployments-2025-12-01.json, vendored fragments)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from jsonschema import Draft4Validator
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT4

from harness.config import Hyperparameters, SimulatorConfig, load_config
from harness.errors import ConfigError, FinetuneError
from harness.providers.azure_deploy import Deployments, state_of
from harness.providers.azure_ft import AzureFinetuneProvider
from harness.providers.azure_settings import AzureSettings, AzureSimSettings, deployment_name, run_deployments
from harness.providers.base import FinetuneRequest, JobStatus
from harness.registry import Registry
from harness.sim import SimServer
from harness.sim.app import create_app

SPEC = json.loads((Path(__file__).parent / "fixtures" / "specs" /
                   "azure-cognitiveservices-deployments-2025-12-01.json").read_text())
_SCHEMAS = SchemaRegistry().with_resource("urn:azure-spec", Resource.from_contents(SPEC, default_specification=DRAFT4))
SETTINGS = AzureSettings(subscription_id="sub-1", resource_group="rg-1", account="acct-1", deploy_poll_s=0.05)


def validate(definition: str, instance: object) -> None:
    Draft4Validator({"$ref": f"urn:azure-spec#/definitions/{definition}"}, registry=_SCHEMAS).validate(instance)


def training_file(path: Path, n: int = 12) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def request(path: Path, base: str = "sim-base", iteration: int = 1) -> FinetuneRequest:
    md = {"harness_run": "test-run-1a2b3c4d", "iteration": str(iteration), "role": "generator", "agent": "0"}
    return FinetuneRequest(training_file=path, base_model=base, metadata=md, suffix="t-g0", seed=7,
                           hyperparameters=Hyperparameters())


def provider(sim: SimServer, token: str = "a-token", settings: AzureSettings = SETTINGS) -> AzureFinetuneProvider:
    async def bearer() -> str:
        return token
    root = sim.base_url.removesuffix("/v1")
    deployments = Deployments(settings, token=bearer, management_url=root, max_retries=2, backoff_base_s=0.01)
    return AzureFinetuneProvider(sim.base_url, "sim-key", settings, deployments, models_base="sim-base",
                                 max_retries=2, poll_interval_s=0.05, backoff_base_s=0.01)


@pytest.fixture
def sim_with(tmp_path):
    servers = []

    def start(**azure) -> SimServer:
        cfg = SimulatorConfig(job_seconds=0.2, azure=AzureSimSettings(deploy_seconds=0.2, **azure))
        server = SimServer(cfg, state_dir=tmp_path / "sim-state").start()
        servers.append(server)
        return server
    yield start
    for s in servers:
        s.stop()


# ----------------------------------------------------------------------------- the spec

async def test_the_simulated_arm_routes_answer_as_the_spec_says():
    """Every request the provider's ARM client sends and every answer the simulator gives, checked
    against the spec's schemas, status codes and headers."""
    app = create_app(SimulatorConfig(azure=AzureSimSettings(deploy_seconds=0.0)))
    seen: list[tuple[httpx2.Request, httpx2.Response]] = []

    async def keep(response: httpx2.Response) -> None:
        await response.aread()
        seen.append((response.request, response))

    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app), event_hooks={"response": [keep]})

    async def bearer() -> str:
        return "a-token"
    arm = Deployments(SETTINGS, token=bearer, management_url="http://sim", http_client=client, max_retries=0)
    try:
        assert await arm.get("d1") is None
        created = await arm.create("d1", "sim-base")
        again = await arm.create("d1", "sim-base")  # CreateOrUpdate of an existing name: an update, not a second one
        listed = await arm.list()
        assert await arm.delete("d1") is True
        assert await arm.delete("d1") is False
    finally:
        await arm.close()
    assert [d["name"] for d in listed] == ["d1"]
    assert state_of(again) == "Succeeded" and created["properties"]["model"]["name"] == "sim-base"

    statuses = []
    for req, resp in seen:
        assert req.url.params["api-version"] == "2025-12-01" and req.headers["authorization"] == "Bearer a-token"
        assert req.url.path.startswith("/subscriptions/sub-1/resourceGroups/rg-1/providers/"
                                       "Microsoft.CognitiveServices/accounts/acct-1/deployments")
        op = {("PUT", True): "Deployments_CreateOrUpdate", ("GET", True): "Deployments_Get",
              ("DELETE", True): "Deployments_Delete", ("GET", False): "Deployments_List"}[
            (req.method, req.url.path.rstrip("/").split("/")[-2] == "deployments")]
        spec = SPEC["operations"][op]
        if spec.get("body"):
            validate(spec["body"], json.loads(req.content))
        answer = spec["responses"].get(str(resp.status_code), spec["responses"]["default"])
        if answer.get("schema"):
            validate(answer["schema"], resp.json())
        for header in answer.get("headers", []):
            if header != "location":
                assert header.lower() in resp.headers, f"{op} {resp.status_code} lacks {header}"
        if answer is spec["responses"]["default"]:
            assert resp.json()["error"]["code"] and resp.json()["error"]["message"]
        statuses.append((op, resp.status_code))
    assert statuses == [("Deployments_Get", 404), ("Deployments_CreateOrUpdate", 201), ("Deployments_CreateOrUpdate", 200),
                        ("Deployments_List", 200), ("Deployments_Delete", 200), ("Deployments_Delete", 204)]


async def test_arm_refuses_a_call_without_token_or_api_version():
    app = create_app(SimulatorConfig())
    path = "/subscriptions/s/resourceGroups/r/providers/Microsoft.CognitiveServices/accounts/a/deployments/x"
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://sim") as client:
        no_token = await client.get(path, params={"api-version": "2025-12-01"})
        no_version = await client.get(path, headers={"authorization": "Bearer t"})
    assert (no_token.status_code, no_version.status_code) == (401, 400)
    for r in (no_token, no_version):
        validate("ErrorResponse", r.json())


# ----------------------------------------------------------------------------- the provider

async def test_a_finished_job_is_deployed_once_and_registered_by_deployment_name(sim_with, tmp_path):
    sim = sim_with()
    p = provider(sim)
    try:
        state = await p.submit(request(training_file(tmp_path / "g0.jsonl")))
        seen = []
        final = await p.wait(state.job_id, poll_interval_s=0.05, on_update=lambda s: seen.append(s.raw_status))
        again = await p.submit(request(tmp_path / "g0.jsonl"))  # a resumed submit: same job, same deployment
        await p.wait(again.job_id, poll_interval_s=0.05)
        listed = await p.deployments.list()
    finally:
        await p.close()
    name = deployment_name("mft", "test-run-1a2b3c4d", 1, "generator", 0)
    assert final.status is JobStatus.SUCCEEDED and final.model_id == name and final.provider == "azure"
    assert "deploying" in seen, "a succeeded job is reported as deploying until its deployment is ready"
    assert again.job_id == state.job_id
    assert [d["name"] for d in listed] == [name]
    created = (tmp_path / "sim-state" / "azure" / "created.jsonl").read_text().splitlines()
    assert len(created) == 1 and json.loads(created[0])["model"].startswith("ft:sim-base:")


async def test_the_next_iteration_trains_from_the_finetuned_model_behind_a_deployment(sim_with, tmp_path):
    sim = sim_with()
    p = provider(sim)
    try:
        first = await p.wait((await p.submit(request(training_file(tmp_path / "g0.jsonl")))).job_id, poll_interval_s=0.05)
        second = await p.submit(request(tmp_path / "g0.jsonl", base=first.model_id, iteration=2))
        job = await p.refresh(second.job_id)
    finally:
        await p.close()
    assert first.model_id.startswith("mft-")
    assert job.base_model.startswith("ft:sim-base:"), "the job starts from the model, not from its deployment name"


async def test_bad_management_credentials_say_what_to_do(sim_with, tmp_path):
    sim = sim_with(token="the-right-token")
    p = provider(sim, token="a-wrong-token")
    try:
        state = await p.submit(request(training_file(tmp_path / "g0.jsonl")))
        with pytest.raises(FinetuneError) as err:
            await p.wait(state.job_id, poll_interval_s=0.05)
    finally:
        await p.close()
    text = str(err.value)
    assert "refused the credentials (401" in text and "AZURE_MANAGEMENT_TOKEN" in text
    assert "deployments/write" in text


async def test_exhausted_deployment_quota_says_what_to_do(sim_with, tmp_path):
    sim = sim_with(quota=0)
    p = provider(sim)
    try:
        state = await p.submit(request(training_file(tmp_path / "g0.jsonl")))
        with pytest.raises(FinetuneError) as err:
            await p.wait(state.job_id, poll_interval_s=0.05)
    finally:
        await p.close()
    assert "no deployment quota left" in str(err.value) and "InsufficientQuota" in str(err.value)
    assert "--undeploy" in str(err.value)


async def test_a_failed_deployment_fails_the_model_with_a_clear_message(sim_with, tmp_path):
    sim = sim_with(fail_deployments=True)
    p = provider(sim)
    try:
        state = await p.wait((await p.submit(request(training_file(tmp_path / "g0.jsonl")))).job_id, poll_interval_s=0.05)
    finally:
        await p.close()
    assert state.status is JobStatus.FAILED and state.model_id is None
    assert "ended Failed at Azure, also when made again" in state.error
    created = (tmp_path / "sim-state" / "azure" / "created.jsonl").read_text().splitlines()
    assert len(created) == 2, "a failed deployment is removed and made once more, not more"


async def test_a_job_failed_at_the_provider_keeps_the_providers_message_and_deploys_nothing(tmp_path):
    cfg = SimulatorConfig(job_seconds=0.2, job_failure_rate=1.0)
    with SimServer(cfg, state_dir=tmp_path / "sim-state") as sim:
        p = provider(sim)
        try:
            state = await p.wait((await p.submit(request(training_file(tmp_path / "g0.jsonl")))).job_id,
                                 poll_interval_s=0.05)
            deployed = await p.deployments.list()
        finally:
            await p.close()
    assert state.status is JobStatus.FAILED and state.error and deployed == []


def test_a_model_azure_cannot_finetune_is_refused_at_config_load():
    real = ["finetune.provider=azure", "finetune.iterations=1", "endpoint.kind=openai",
            "endpoint.base_url=https://res.openai.azure.com/openai/v1/", "finetune.azure.subscription_id=s",
            "finetune.azure.resource_group=r", "finetune.azure.account=res"]
    with pytest.raises(ConfigError, match="Azure OpenAI cannot finetune 'gpt-5'"):
        load_config(None, [*real, "models.base=gpt-5"])
    with pytest.raises(ConfigError, match="only by reinforcement fine-tuning"):
        load_config(None, [*real, "models.base=my-deployment", "finetune.azure.base_model=o4-mini"])
    with pytest.raises(ConfigError, match="finetune.azure.subscription_id"):
        load_config(None, [*real[:4], "models.base=gpt-4.1-mini"])
    assert load_config(None, [*real, "models.base=gpt-4.1-mini"]).finetune.azure.sku == "developertier"


def test_deployment_names_fit_azures_rules_and_tell_runs_apart():
    long_run = "a-very-long-experiment-name-with-many-words-in-it-7f3e2a1b"
    names = {deployment_name("mft", long_run, k, role, n) for k in (1, 12) for role in ("generator", "critic")
             for n in range(12)}
    assert len(names) == 48 and all(len(n) <= 64 for n in names)
    assert all(run_deployments("mft", long_run).fullmatch(n) for n in names)
    assert not run_deployments("mft", "demo-1a2b3c4d").fullmatch(deployment_name("mft", "demo-1a2b3c4d-x", 1, "g", 0))


def test_dry_run_prices_a_500_500_math_run_with_hosting(tmp_path):
    from harness.plan import estimate_plan
    from harness.tasks import load_split

    sample = [json.loads(line) for line in (Path(__file__).parent.parent / "harness" / "resources" / "data" / "math-sample.jsonl").open()]
    sample = [r for r in sample if r["level"] in ("Level 1", "Level 2", "Level 3")]
    source = tmp_path / "math.jsonl"  # MATH-shaped: the sample's problems, repeated to 1000
    source.write_text("".join(json.dumps({**sample[i % len(sample)], "problem": f"{sample[i % len(sample)]['problem']} "
                                          f"(copy {i})"}) + "\n" for i in range(1000)))
    cfg = load_config(None, ["finetune.provider=azure", "finetune.iterations=1", "task.name=math",
                             f"task.source={source}", "task.n_train=500", "task.n_test=500", "endpoint.kind=openai",
                             "models.base=gpt-4.1-mini", "endpoint.base_url=https://res.openai.azure.com/openai/v1/",
                             "finetune.azure.subscription_id=s", "finetune.azure.resource_group=r",
                             "finetune.azure.account=res", "finetune.azure.sku=standard"])
    stages = estimate_plan(cfg, load_split(cfg.task, "train"), load_split(cfg.task, "test"))
    finetune = next(s for s in stages if "finetune 6 models" in s.stage)
    assert finetune.cost_usd == pytest.approx(finetune.prompt_tokens * 5.00 / 1e6)  # gpt-4.1-mini, Global training
    assert "6 deployments x $1.70/h = $10.20 per hour" in finetune.note
    assert all(s.cost_usd is not None for s in stages), "every stage is priced"


# ----------------------------------------------------------------------------- the loop

@pytest.mark.slow
def test_the_loop_on_azure_survives_a_kill_while_deploying_and_undeploys(tmp_path):
    run_dir = tmp_path / "run"
    sets = ["finetune.provider=azure", "finetune.iterations=2", "task.n_test=20", "task.n_train=40",
            "endpoint.simulator.job_seconds=0.3", "endpoint.simulator.azure.deploy_seconds=3",
            "finetune.azure.deploy_poll_s=0.2"]
    args = [sys.executable, "-m", "harness.loop", "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    ledger = run_dir / "simulator" / "azure" / "created.jsonl"
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, deploying = time.monotonic() + 120, []
    while time.monotonic() < deadline and not deploying:
        try:
            if ledger.exists() and ledger.read_text().strip():
                deploying = [e for e in Registry.load(run_dir / "registry.json").entries if e.status == "running"]
        except Exception:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert deploying, "the run was killed while its models were being deployed"

    result = subprocess.run([sys.executable, "-m", "harness.loop", "--resume", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--undeploy" in result.stdout, "the summary says what is still deployed and how to remove it"
    reg = Registry.load(run_dir / "registry.json")
    trained = [e for e in reg.entries if e.iteration > 0]
    assert len(trained) == 12 and all(e.status == "succeeded" for e in trained)
    assert {e.model_id for e in trained} == {deployment_name("mft", reg.run, e.iteration, e.role, e.agent)
                                            for e in trained}, "the registry holds deployment names"
    created = [json.loads(line)["name"] for line in ledger.read_text().splitlines()]
    assert sorted(created) == sorted(e.model_id for e in trained), "each model deployed exactly once"
    jobs = list((run_dir / "simulator" / "jobs").glob("*.json"))
    assert len(jobs) == 12, "no job was created twice"
    metrics = json.loads((run_dir / "iter-2" / "metrics.json").read_text())
    assert set(metrics["generators"]) <= {e.model_id for e in trained}, "the last debate called the deployments"

    listing = subprocess.run([sys.executable, "-m", "harness.jobs", str(run_dir)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "$0.00 per hour" in listing.stdout
    def undeploy(*more: str) -> str:
        done = subprocess.run([sys.executable, "-m", "harness.jobs", str(run_dir), "--undeploy", *more], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return " ".join(done.stdout.split())
    left = lambda: sorted(p.stem for p in (run_dir / "simulator" / "azure" / "deployments").glob("*.json"))  # noqa: E731
    latest = sorted(e.model_id for e in trained if e.iteration == 2)
    assert "removed 6 deployment(s)" in undeploy("--keep-latest") and left() == latest
    assert "removed 6 deployment(s)" in undeploy() and left() == []


def test_without_a_management_token_the_message_says_how_to_get_one(monkeypatch):
    from harness.providers.azure_deploy import token_provider

    try:
        import azure.identity  # noqa: F401
        pytest.skip("azure-identity is installed: DefaultAzureCredential would be used")
    except ImportError:
        pass
    monkeypatch.delenv("AZURE_MANAGEMENT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"export AZURE_MANAGEMENT_TOKEN=\$\(az account get-access-token"):
        token_provider(SETTINGS)
