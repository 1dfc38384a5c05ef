"""Azure Resource Manager's Deployments API (Microsoft.CognitiveServices, stable 2025-12-01:
Deployments_CreateOrUpdate / Get / List / Delete): deploy a finetuned model under a name, read
its provisioningState, list and remove deployments.

The HTTP client is the OpenAI SDK's generic one (`AsyncOpenAI.get/put/delete`), pointed at the
management plane with an Entra ID bearer token as its key: it raises the same status errors as
every other call of the harness, so harness.llm.retry stays the one retry layer and classifies
them (5xx, 408, 429 retried; 401/403/400 not). Its own retries are off.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Awaitable, Callable, TypeVar

import httpx2
import openai
from openai import AsyncOpenAI

from harness.errors import ConfigError, FinetuneError
from harness.llm.retry import is_terminal, short_error, with_retries
from harness.providers.azure_settings import MANAGEMENT_SCOPE, MANAGEMENT_URL, AzureSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
READY, FAILED = "Succeeded", ("Failed", "Canceled", "Disabled")
QUOTA_CODES = ("InsufficientQuota", "QuotaExceeded")


def token_provider(settings: AzureSettings) -> Callable[[], Awaitable[str]]:
    """Where the management token comes from: the environment variable settings.management_token_env
    when set, else azure-identity's DefaultAzureCredential (az login, a managed identity, a
    service principal's AZURE_CLIENT_* variables). Never from a file of ours."""
    env = settings.management_token_env
    if os.environ.get(env):
        async def from_env() -> str:
            return os.environ[env]
        return from_env
    try:
        from azure.identity.aio import DefaultAzureCredential
    except ImportError:
        raise ConfigError(
            f"finetune.provider azure deploys models through Azure Resource Manager, which needs an Entra ID token: "
            f"export {env}=$(az account get-access-token --resource https://management.azure.com --query accessToken "
            f"-o tsv), or install azure-identity (pip install -e '.[azure]') to use DefaultAzureCredential") from None
    credential = DefaultAzureCredential()

    async def from_identity() -> str:
        return (await credential.get_token(MANAGEMENT_SCOPE)).token  # cached and renewed by the credential
    from_identity.close = credential.close  # type: ignore[attr-defined]  # Deployments.close calls it
    return from_identity


class Deployments:
    """One Azure OpenAI resource's deployments, through ARM."""

    def __init__(self, settings: AzureSettings, *, token: Callable[[], Awaitable[str]], management_url: str | None = None,
                 max_retries: int = 6, timeout_s: float = 60.0, backoff_base_s: float = 0.5,
                 http_client: httpx2.AsyncClient | None = None):
        self.settings = settings
        self.url = (management_url or settings.management_url or MANAGEMENT_URL).rstrip("/")
        self.max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._account = (f"/subscriptions/{settings.subscription_id}/resourceGroups/{settings.resource_group}"
                         f"/providers/Microsoft.CognitiveServices/accounts/{settings.account}")
        self._token = token
        self._client = AsyncOpenAI(base_url=self.url, api_key=token, max_retries=0, timeout=timeout_s,
                                   default_query={"api-version": settings.api_version}, http_client=http_client)

    def path(self, name: str | None = None) -> str:
        return f"{self._account}/deployments" + (f"/{name}" if name else "")

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(fn, self.max_retries, base_url=self.url, base_s=self._backoff_base_s,
                                  error=lambda exc, attempts: FinetuneError(self.explain(what, exc, attempts)))

    def explain(self, what: str, exc: BaseException, attempts: int) -> str:
        """A failed management call, with what to do about it."""
        status = getattr(exc, "status_code", None)
        code = getattr(exc, "code", None)
        message = getattr(exc, "message", None) or str(exc)
        if status in (401, 403):
            return (f"{what}: Azure Resource Manager at {self.url} refused the credentials ({status}: {message}). "
                    f"The token (${self.settings.management_token_env}, or DefaultAzureCredential: `az login`) must be "
                    f"for https://management.azure.com, unexpired, and its identity needs a role with "
                    f"Microsoft.CognitiveServices/accounts/deployments/write on account {self.settings.account} "
                    f"(e.g. Cognitive Services Contributor); then resume the run")
        if code in QUOTA_CODES or status == 429:
            return (f"{what}: no deployment quota left ({status} {code or ''}: {message}). Remove deployments you no "
                    f"longer need (this run's: python -m harness.jobs RUN_DIR --undeploy), or choose another "
                    f"finetune.azure.sku or a lower finetune.azure.capacity; then resume the run (finished jobs are "
                    f"not trained again)")
        if not is_terminal(exc):
            return (f"{what} at {self.url} failed after {attempts} attempt(s): {short_error(exc)}; try again later "
                    f"(a resumed run finds the deployments already made)")
        if status == 404:
            return (f"{what}: not found at {self.url} ({message}); check finetune.azure.subscription_id, "
                    f"resource_group and account")
        return f"{what} rejected by Azure Resource Manager ({status} {code or ''}): {message}"

    async def get(self, name: str) -> dict[str, Any] | None:
        """The deployment, or None when there is none by that name."""
        async def fetch() -> dict[str, Any] | None:
            try:
                return await self._client.get(self.path(name), cast_to=object)
            except openai.NotFoundError:
                return None
        return await self._call(f"reading deployment {name}", fetch)

    async def create(self, name: str, model: str) -> dict[str, Any]:
        """Deployments_CreateOrUpdate of `model` (a finetuned model id) as `name`. Idempotent by
        name: a repeated PUT of the same body leaves one deployment."""
        s = self.settings
        body = {"sku": {"name": s.sku, "capacity": s.capacity},
                "properties": {"model": {"format": "OpenAI", "name": model, "version": "1"}}}
        log.info("deploying %s as %s (%s, capacity %d)", model, name, s.sku, s.capacity)
        return await self._call(f"deploying {model} as {name}",
                                lambda: self._client.put(self.path(name), body=body, cast_to=object))

    async def delete(self, name: str) -> bool:
        """Deployments_Delete; False when there was nothing by that name (204)."""
        async def remove() -> bool:
            response = await self._client.delete(self.path(name), cast_to=httpx2.Response)
            return response.status_code != 204
        return await self._call(f"removing deployment {name}", remove)

    async def list(self) -> list[dict[str, Any]]:
        """Every deployment of the account (Deployments_List, following nextLink)."""
        async def fetch() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            page = await self._client.get(self.path(), cast_to=object)
            while True:
                out.extend(page.get("value") or [])
                link = page.get("nextLink")
                if not link:
                    return out
                page = await self._client.get(link, cast_to=object)
        return await self._call("listing deployments", fetch)

    async def close(self) -> None:
        await self._client.close()
        close = getattr(self._token, "close", None)  # azure-identity's credential holds a session
        if close is not None:
            await close()


def state_of(deployment: dict[str, Any]) -> str:
    return str((deployment.get("properties") or {}).get("provisioningState") or "Unknown")


def model_of(deployment: dict[str, Any]) -> str | None:
    return ((deployment.get("properties") or {}).get("model") or {}).get("name")
