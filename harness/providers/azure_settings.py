"""Settings of the `azure` finetuning provider (Azure OpenAI / Microsoft Foundry), and of the
simulator's stand-in for Azure's deployment step.

Azure serves a finetuned model only once it is *deployed*: an Azure Resource Manager (ARM) call
on the management plane (`management.azure.com`), authenticated with a Microsoft Entra ID token,
never with the resource's API key. The settings here name the resource the deployments go to
(subscription, resource group, account), the deployment type (sku) and capacity, and the
environment variables that hold the secrets; the secrets themselves never enter a config.

Facts recorded 2026-12-05 (re-check before quoting them):
* finetunable models (supervised fine-tuning), Azure OpenAI "fine-tuning models" page:
  gpt-4o-mini 2024-07-18, gpt-4o 2024-08-06, gpt-4.1 / gpt-4.1-mini / gpt-4.1-nano 2025-04-14;
  o4-mini is finetunable only by reinforcement fine-tuning, which this harness does not do;
* deployment types (ARM sku names) for finetuned models: "standard", "globalstandard" and
  "developertier" (Developer: no hourly hosting fee, no SLA, deleted after 24 hours);
* a Standard/Global deployment of a finetuned model that serves no call for 15 days is deleted.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Supervised fine-tuning on Azure OpenAI: family -> the snapshot Azure trains.
FINETUNABLE: dict[str, str] = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
}
_RFT_ONLY = ("o4-mini",)
# A finetuned model's id on Azure: <base snapshot>.ft-<32 hex>[-<suffix>]; it may be finetuned again.
_FT_ID = re.compile(r"^(?P<base>[A-Za-z0-9.-]+?)\.ft-[0-9a-f]+")
MANAGEMENT_URL = "https://management.azure.com"
MANAGEMENT_SCOPE = "https://management.azure.com/.default"
# Deployment names this harness makes: lowercase letters, digits and '-', at most 64 characters,
# starting and ending with a letter or digit. ARM's spec (2025-12-01) gives deploymentName no
# pattern; this is the subset that the account-name pattern and the portal's rules both accept.
DEPLOYMENT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


def family_of(model: str) -> str | None:
    """The finetunable family of a model name (family, dated snapshot or finetuned id), or None."""
    m = _FT_ID.match(model)
    name = m.group("base") if m else model
    for family, snapshot in sorted(FINETUNABLE.items(), key=lambda kv: -len(kv[0])):
        if name in (family, snapshot):
            return family
    return None


def finetunable_error(model: str) -> str | None:
    """Why Azure cannot finetune `model`, or None when it can."""
    if family_of(model) is not None:
        return None
    listed = ", ".join(f"{f} ({s})" for f, s in FINETUNABLE.items())
    if any(model.startswith(r) for r in _RFT_ONLY):
        return (f"Azure finetunes {model} only by reinforcement fine-tuning; this harness trains by supervised "
                f"fine-tuning, which Azure offers for: {listed}")
    return f"Azure OpenAI cannot finetune {model!r} (supervised fine-tuning is offered for: {listed})"


def training_model(model: str) -> str:
    """The model name a fine-tuning job is created with: a family becomes its dated snapshot."""
    return FINETUNABLE.get(model, model)


class AzureSimSettings(BaseModel):
    """The simulator's stand-in for Azure's deployment step (endpoint.simulator.azure)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    deploy_seconds: float = Field(0.3, ge=0)  # provisioningState stays Creating this long, then Succeeded
    # At most this many deployments at once; one more is refused with ARM's InsufficientQuota.
    quota: int | None = Field(None, ge=0)
    fail_deployments: bool = False  # every deployment ends Failed (a provider-side failure)
    # The bearer token the management routes accept; None: any non-empty token.
    token: str | None = None


class AzureSettings(BaseModel):
    """`finetune.azure`: where and how the finetuned models are deployed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The Azure OpenAI / Foundry resource that trains and serves: its ARM coordinates. Required
    # with a real endpoint; with the simulator, placeholders stand in.
    subscription_id: str | None = None  # the Azure subscription id of the resource
    resource_group: str | None = None  # the resource group that holds the resource
    account: str | None = None  # the resource's name (RESOURCE in https://RESOURCE.openai.azure.com)
    # The model Azure finetunes at the first iteration. None: models.base (debates call models.base
    # as a *deployment* name; name your base deployment after its model, or set this).
    base_model: str | None = None
    # Deployment type of the finetuned models. developertier: no hosting fee, no SLA, Azure deletes
    # it after 24 hours; standard / globalstandard: billed per hour while deployed.
    sku: Literal["developertier", "standard", "globalstandard"] = "developertier"
    capacity: int = Field(50, ge=1)  # the sku's capacity (thousands of tokens per minute)
    # ARM api-version of the Deployments calls (Microsoft.CognitiveServices stable 2025-12-01).
    api_version: str = "2025-12-01"
    # The management plane. None: https://management.azure.com, or the simulator's own routes when
    # endpoint.kind is simulator. Set it to point the provider at another stand-in.
    management_url: str | None = None
    # A bearer token for the management plane, read from this environment variable when set
    # (e.g. `az account get-access-token`); otherwise azure-identity's DefaultAzureCredential
    # (the `azure` extra). The data plane's key is endpoint.api_key_env (AZURE_OPENAI_API_KEY).
    management_token_env: str = "AZURE_MANAGEMENT_TOKEN"
    deployment_prefix: str = Field("mft", pattern=r"^[a-z0-9][a-z0-9-]{0,11}$")  # deployment names start with it
    deploy_poll_s: float = Field(10.0, gt=0)  # poll interval while a deployment provisions
    # Give up on a deployment still provisioning after this long (the job's model is kept; resume retries).
    deploy_timeout_s: float = Field(3600.0, gt=0)

    @field_validator("subscription_id", "resource_group", "account")
    @classmethod
    def _no_slash(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v != v.strip()):
            raise ValueError(f"{v!r}: give the bare name, without slashes or spaces")
        return v

    def missing(self) -> list[str]:
        """The coordinates a real endpoint needs that are not set."""
        return [f"finetune.azure.{k}" for k in ("subscription_id", "resource_group", "account")
                if getattr(self, k) is None]


def deployment_name(prefix: str, run: str, iteration: str | int, role: str, agent: str | int) -> str:
    """The deployment of one job's model: <prefix>-<run>-i<iteration>-<g|c><agent>, in Azure's
    charset; the run part is shortened (never the part that tells jobs apart) to fit 64."""
    tail = f"-i{iteration}-{role[:1]}{agent}".lower()
    slug = re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-") or "run"
    room = 64 - len(prefix) - 1 - 12  # a fixed room for the tail: the run part is the same in every name
    if len(tail) > 12:
        raise ValueError(f"iteration {iteration} / agent {agent}: too large for a deployment name")
    if len(slug) > room:  # keep the run id's random end, which tells runs with one name apart
        slug = (slug[: room - 9].rstrip("-") + "-" + slug[-8:]) if room > 9 else slug[-room:]
    name = f"{prefix}-{slug.strip('-')}{tail}"
    assert DEPLOYMENT_NAME.match(name), name
    return name


def run_deployments(prefix: str, run: str) -> re.Pattern[str]:
    """Matches the deployment names of `run`, and only those (for listing and removing them)."""
    head = deployment_name(prefix, run, 0, "g", 0)[: -len("i0-g0")]
    return re.compile(re.escape(head) + r"i\d+-[gc]\d+")


def azure_config_error(cfg) -> str | None:
    """What in a run config (harness.config.RunConfig, not imported here: it imports this module)
    the azure provider cannot work with, or None. Checked at load, before any call."""
    if cfg.finetune.iterations == 0 or cfg.endpoint.kind == "simulator":
        return None  # nothing to train, or the simulator's models stand in for Azure's
    if cfg.endpoint.kind != "openai":
        return (f"finetune.provider azure: endpoint.kind is {cfg.endpoint.kind}; Azure's data plane speaks the OpenAI "
                f"API: --set endpoint.kind=openai --set endpoint.base_url=https://RESOURCE.openai.azure.com/openai/v1/ "
                f"--set endpoint.api_key_env=AZURE_OPENAI_API_KEY")
    if not cfg.endpoint.base_url:
        return ("endpoint.base_url: the azure provider needs your resource's v1 URL, "
                "e.g. --set endpoint.base_url=https://RESOURCE.openai.azure.com/openai/v1/")
    az: AzureSettings = cfg.finetune.azure
    if az.missing():
        return (f"{', '.join(az.missing())}: the azure provider deploys each finetuned model through Azure Resource "
                f"Manager and needs the resource's coordinates, e.g. --set finetune.azure.subscription_id=<id> "
                f"--set finetune.azure.resource_group=<group> --set finetune.azure.account=<RESOURCE>")
    model = az.base_model or cfg.models.base
    problem = finetunable_error(model)
    if problem:
        which = "finetune.azure.base_model" if az.base_model else "models.base"
        return (f"{which}: {problem}. models.base is the deployment the debates call; if its name is not its model's, "
                f"set finetune.azure.base_model to the model it serves")
    return None
