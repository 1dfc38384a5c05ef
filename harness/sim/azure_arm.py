"""Azure Resource Manager's Deployments routes of Microsoft.CognitiveServices, simulated: the
step that makes an Azure OpenAI finetuned model answer under a deployment name.

Shapes from the published spec (Azure/azure-rest-api-specs, specification/cognitiveservices/
resource-manager/Microsoft.CognitiveServices/stable/2025-12-01/cognitiveservices.json):
Deployments_CreateOrUpdate (PUT: 201 with Azure-AsyncOperation and Retry-After headers when it
creates, 200 when it updates), Deployments_Get (200, or 404), Deployments_List ({value,
nextLink}), Deployments_Delete (200 when it removed one, 204 when there was none); the Deployment
body {id, name, type, sku, properties: {model, provisioningState, ...}}; errors as ARM's
ErrorResponse {error: {code, message}}. Every call needs `api-version` and a bearer token.

A deployment's provisioningState is Creating for `endpoint.simulator.azure.deploy_seconds`
after it was made, then Succeeded (or Failed with `fail_deployments`): a pure function of the
time, like the simulated jobs. Deployments persist under the simulator's state directory, with
a ledger of every creation (azure/created.jsonl) that tests count. Once Succeeded, a deployment
name answers chat calls as the model it serves.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from harness.fileio import JsonlAppender, write_model
from harness.providers.azure_settings import AzureSimSettings

ACCOUNT = ("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/accounts/{account}")
TYPE = "Microsoft.CognitiveServices/accounts/deployments"


class DeploymentRecord(BaseModel):
    name: str
    account_path: str  # /subscriptions/.../accounts/<account>
    sku: dict[str, Any]
    model: dict[str, Any]
    created_at: float
    fails: bool = False
    puts: int = 1


def arm_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class AzureDeployments:
    """The simulated deployments, persisted under `state_dir`/azure. Names are unique per account
    and a run uses one account, so one namespace stands in for all accounts."""

    def __init__(self, cfg: AzureSimSettings, state_dir: Path | None, model_exists):
        self.cfg = cfg
        self.dir = Path(state_dir) / "azure" if state_dir is not None else None
        self.model_exists = model_exists  # (model name) -> bool: a model that may be deployed
        self.records: dict[str, DeploymentRecord] = {}
        if self.dir is not None:
            for path in sorted((self.dir / "deployments").glob("*.json")):
                try:
                    rec = DeploymentRecord.model_validate_json(path.read_bytes())
                except (OSError, ValidationError):
                    continue
                self.records[rec.name] = rec

    def _save(self, rec: DeploymentRecord) -> None:
        if self.dir is not None:
            write_model(self.dir / "deployments" / f"{rec.name}.json", rec)
        self.records[rec.name] = rec

    def _drop(self, name: str) -> None:
        self.records.pop(name, None)
        if self.dir is not None:
            (self.dir / "deployments" / f"{name}.json").unlink(missing_ok=True)

    def state(self, rec: DeploymentRecord, now: float | None = None) -> str:
        ready = (time.time() if now is None else now) >= rec.created_at + self.cfg.deploy_seconds
        return ("Failed" if rec.fails else "Succeeded") if ready else "Creating"

    def served_model(self, name: str) -> str | None:
        """The model a deployment name answers as, once it is Succeeded."""
        rec = self.records.get(name)
        return rec.model.get("name") if rec is not None and self.state(rec) == "Succeeded" else None

    def body(self, rec: DeploymentRecord) -> dict[str, Any]:
        return {"id": f"{rec.account_path}/deployments/{rec.name}", "name": rec.name, "type": TYPE,
                "sku": rec.sku, "properties": {"model": rec.model, "provisioningState": self.state(rec),
                                               "versionUpgradeOption": "NoAutoUpgrade"}}

    def put(self, account_path: str, name: str, body: dict[str, Any]) -> tuple[DeploymentRecord, bool]:
        rec = self.records.get(name)
        if rec is not None:
            rec = rec.model_copy(update={"sku": body["sku"], "model": body["properties"]["model"], "puts": rec.puts + 1})
            self._save(rec)
            return rec, False
        rec = DeploymentRecord(name=name, account_path=account_path, sku=body["sku"],
                               model=body["properties"]["model"], created_at=time.time(),
                               fails=self.cfg.fail_deployments)
        self._save(rec)
        if self.dir is not None:
            with JsonlAppender(self.dir / "created.jsonl") as out:
                out.append({"name": name, "model": rec.model.get("name"), "at": rec.created_at})
        return rec, True


def _check(request: Request, cfg: AzureSimSettings) -> JSONResponse | None:
    """ARM's checks before any route: a bearer token, then an api-version."""
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not token:
        return arm_error(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
    if cfg.token is not None and token != cfg.token:
        return arm_error(401, "InvalidAuthenticationToken", "The access token is invalid.")
    if not request.query_params.get("api-version"):
        return arm_error(400, "MissingApiVersionParameter",
                         "The api-version query parameter (?api-version=) is required for all requests.")
    return None


def _valid_put(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    sku = body.get("sku")
    if not isinstance(sku, dict) or not isinstance(sku.get("name"), str):
        return "The 'sku.name' property is required."
    if "capacity" in sku and not isinstance(sku["capacity"], int):
        return "The 'sku.capacity' property must be an integer."
    model = (body.get("properties") or {}).get("model") if isinstance(body.get("properties"), dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(model.get("format"), str):
        return "The 'properties.model' property needs 'format' and 'name'."
    return None


def make_arm_router(deployments: AzureDeployments) -> APIRouter:
    router = APIRouter()
    cfg = deployments.cfg
    item = ACCOUNT + "/deployments/{name}"

    @router.put(item)
    async def create_or_update(sub: str, rg: str, account: str, name: str, request: Request):
        if (refused := _check(request, cfg)) is not None:
            return refused
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        problem = _valid_put(body)
        if problem:
            return arm_error(400, "InvalidRequestContent", problem)
        model = body["properties"]["model"]["name"]
        if not deployments.model_exists(model):
            return arm_error(400, "DeploymentModelNotSupported",
                             f"The model '{model}' is not found or cannot be deployed by this account.")
        others = [n for n in deployments.records if n != name]
        if name not in deployments.records and cfg.quota is not None and len(others) >= cfg.quota:
            return arm_error(400, "InsufficientQuota",
                             f"This operation requires 1 more deployment, which is more than the quota of "
                             f"{cfg.quota} deployments of this account (simulated).")
        account_path = ACCOUNT.format(sub=sub, rg=rg, account=account)
        rec, created = deployments.put(account_path, name, body)
        if not created:
            return JSONResponse(deployments.body(rec), status_code=200)
        op = uuid.uuid4().hex
        status_url = (f"{str(request.base_url).rstrip('/')}/subscriptions/{sub}/providers/Microsoft.CognitiveServices/"
                      f"locations/simulated/operationStatuses/{name}~{op}?api-version={request.query_params['api-version']}")
        return JSONResponse(deployments.body(rec), status_code=201,
                            headers={"Azure-AsyncOperation": status_url,
                                     "Retry-After": str(max(1, round(cfg.deploy_seconds)))})

    @router.get(item)
    async def get(sub: str, rg: str, account: str, name: str, request: Request):
        if (refused := _check(request, cfg)) is not None:
            return refused
        rec = deployments.records.get(name)
        if rec is None:
            return arm_error(404, "DeploymentNotFound", f"Deployment '{name}' not found.")
        return deployments.body(rec)

    @router.get(ACCOUNT + "/deployments")
    async def list_(sub: str, rg: str, account: str, request: Request):
        if (refused := _check(request, cfg)) is not None:
            return refused
        return {"value": [deployments.body(r) for r in sorted(deployments.records.values(), key=lambda r: r.name)]}

    @router.delete(item)
    async def delete(sub: str, rg: str, account: str, name: str, request: Request):
        if (refused := _check(request, cfg)) is not None:
            return refused
        if name not in deployments.records:
            return Response(status_code=204)
        deployments._drop(name)
        return Response(status_code=200)

    @router.get("/subscriptions/{sub}/providers/Microsoft.CognitiveServices/locations/simulated/operationStatuses/{op}")
    async def operation(sub: str, op: str, request: Request):
        if (refused := _check(request, cfg)) is not None:
            return refused
        rec = deployments.records.get(op.split("~", 1)[0])
        state = "Canceled" if rec is None else deployments.state(rec)
        return {"id": str(request.url.path), "name": op, "status": state}

    return router
