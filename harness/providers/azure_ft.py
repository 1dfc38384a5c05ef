"""Finetuning on Azure OpenAI (Microsoft Foundry): the `openai` provider's jobs, plus the
deployment Azure needs before a finetuned model answers.

Azure's v1 API (https://RESOURCE.openai.azure.com/openai/v1/) takes the plain OpenAI client for
files, fine_tuning.jobs and chat, so uploading, creating (tagged with metadata, looked up before
created), polling and cancelling are the openai provider's, inherited. What Azure adds:

* A finished job's model serves nothing until it is deployed (ARM Deployments_CreateOrUpdate,
  harness.providers.azure_deploy). `refresh` therefore reports a succeeded job as still running
  ("deploying") until its deployment's provisioningState is Succeeded, and only then as
  succeeded, with the *deployment name* as the model id: the registry holds deployment names
  and the debates call them. The name derives from the job's tags (run, iteration, role,
  agent), so it is found again after a crash: a GET comes before every PUT, and a deployment
  that exists is never created twice (the PUT is idempotent by name anyway).
* Training the next iteration starts from the finetuned model, not its deployment: a parent that
  is one of this run's deployment names is mapped back to its job's fine_tuned_model through the
  job list (which works even after the deployment was removed).
* Deployments cost per hour while they exist (except Developer ones): `billing_notes` lists the
  run's deployments and their hourly cost for the summary; `python -m harness.jobs RUN_DIR
  --undeploy` removes them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from harness.errors import FinetuneError
from harness.llm.azure_pricing import deployment_price, hosting_per_hour
from harness.providers.azure_deploy import FAILED, READY, Deployments, model_of, state_of
from harness.providers.azure_settings import AzureSettings, deployment_name, run_deployments, training_model
from harness.providers.base import FinetuneRequest, JobState, JobStatus, OnUpdate
from harness.providers.openai_ft import OpenAIFinetuneProvider

log = logging.getLogger(__name__)
DEPLOYING = "deploying"


class AzureFinetuneProvider(OpenAIFinetuneProvider):
    name = "azure"

    def __init__(self, base_url: str, api_key: str, settings: AzureSettings, deployments: Deployments, *,
                 models_base: str, run_dir: Path | None = None, **kwargs: Any):
        super().__init__(base_url, api_key, **kwargs)
        self.settings = settings
        self.deployments = deployments
        self.models_base = models_base  # the deployment the debates call at iteration 0
        self.run_dir = run_dir
        self._deploy_started: dict[str, float] = {}
        self._redeployed: set[str] = set()

    # ------------------------------------------------------------------ names

    def _state(self, job: Any, latest_event: str | None = None) -> JobState:  # type: ignore[override]
        return OpenAIFinetuneProvider._state(job, latest_event).model_copy(update={"provider": self.name})

    def deployment_for(self, metadata: dict[str, str]) -> str | None:
        """The deployment name of a job of this harness (None for a job without its tags)."""
        try:
            return deployment_name(self.settings.deployment_prefix, metadata["harness_run"], metadata["iteration"],
                                   metadata["role"], metadata["agent"])
        except (KeyError, ValueError):
            return None

    async def _train_from(self, request: FinetuneRequest) -> str:
        """The model a job starts from: the base deployment's model at the first iteration, and for
        later ones the finetuned model behind the parent's deployment name."""
        parent = request.base_model
        if parent == self.models_base:
            return training_model(self.settings.base_model or parent)
        run = request.metadata.get("harness_run")
        if run and run_deployments(self.settings.deployment_prefix, run).fullmatch(parent):
            for state in await OpenAIFinetuneProvider.jobs(self, {"harness_run": run}):
                if state.status is JobStatus.SUCCEEDED and self.deployment_for(state.metadata) == parent:
                    return state.model_id or parent
            raise FinetuneError(f"{parent}: no succeeded job of run {run} at {self.base_url} made this deployment's "
                                f"model, so the next job has nothing to start from; check registry.json")
        return parent  # a model id given as such (e.g. an earlier finetune)

    def model_prices(self) -> dict[str, dict[str, float]]:
        price = deployment_price(self.settings.base_model or self.models_base)
        return {} if price is None else {f"{self.settings.deployment_prefix}-*-i*-[gc]*": price}

    # ------------------------------------------------------------------ the interface

    async def submit(self, request: FinetuneRequest) -> JobState:
        start = await self._train_from(request)
        state = await super().submit(request.model_copy(update={"base_model": start}))
        return await self._deployed(state, deploy=False)

    async def find(self, metadata: dict[str, str]) -> JobState | None:
        state = await super().find(metadata)
        return None if state is None else await self._deployed(state, deploy=False)

    async def jobs(self, metadata: dict[str, str]) -> list[JobState]:
        return [await self._deployed(s, deploy=False) for s in await super().jobs(metadata)]

    async def refresh(self, job_id: str) -> JobState:
        return await self._deployed(await super().refresh(job_id), deploy=True)

    async def wait(self, job_id: str, *, poll_interval_s: float | None = None, max_interval_s: float = 60.0,
                   on_update: OnUpdate | None = None) -> JobState:
        return await super().wait(job_id, poll_interval_s=poll_interval_s,
                                  max_interval_s=min(max_interval_s, max(self.settings.deploy_poll_s, 1.0)),
                                  on_update=on_update)

    # ------------------------------------------------------------------ deployment

    async def _deployed(self, state: JobState, *, deploy: bool) -> JobState:
        """A succeeded job as the loop must see it: succeeded (model id: the deployment name) once
        its deployment is ready, running ("deploying") before, failed if the deployment failed.
        With `deploy`, a missing deployment is created; otherwise (lookups, recovery) only read."""
        if state.status is not JobStatus.SUCCEEDED or not state.model_id:
            return state
        name = self.deployment_for(state.metadata)
        if name is None:
            return state  # not a job of this harness: reported as the service reports it
        trained = state.model_id
        found = await self.deployments.get(name)
        if found is not None and model_of(found) not in (None, trained):
            return self._failed(state, f"deployment {name} already serves {model_of(found)}, not this job's model "
                                       f"{trained}; remove that deployment at Azure (az cognitiveservices account "
                                       f"deployment delete ... --deployment-name {name}), then resume the run")
        if found is not None and deploy and state_of(found) in FAILED and name not in self._redeployed:
            # One more try per session: a failed provisioning is often a passing capacity shortage.
            log.warning("deployment %s of %s ended %s; deploying it again", name, trained, state_of(found))
            self._redeployed.add(name)
            await self.deployments.delete(name)
            found = None
        if found is None and deploy:
            found = await self.deployments.create(name, trained)
            self._deploy_started.setdefault(name, time.monotonic())
        provisioning = state_of(found) if found is not None else "NotDeployed"
        if provisioning == READY:
            self._deploy_started.pop(name, None)
            return state.model_copy(update={"model_id": name, "latest_event": f"{trained} deployed as {name}"})
        if provisioning in FAILED:
            return self._failed(state, f"the deployment {name} of {trained} ended {provisioning} at Azure, also when "
                                       f"made again; look for the reason in the Azure portal (quota, region, "
                                       f"capacity); the agent keeps its previous model, and a run resumed before its "
                                       f"next iteration's debate tries the deployment again")
        started = self._deploy_started.get(name)
        if started is not None and time.monotonic() - started > self.settings.deploy_timeout_s:
            return self._failed(state, f"the deployment {name} of {trained} has been {provisioning} for more than "
                                       f"finetune.azure.deploy_timeout_s={self.settings.deploy_timeout_s:.0f}s; resume "
                                       f"the run later (the deployment is looked up, not made again)")
        return state.model_copy(update={"status": JobStatus.RUNNING, "raw_status": DEPLOYING, "model_id": None,
                                        "finished_at": None,
                                        "latest_event": f"{trained} → deployment {name}: {provisioning}"})

    @staticmethod
    def _failed(state: JobState, error: str) -> JobState:
        return state.model_copy(update={"status": JobStatus.FAILED, "raw_status": "deployment failed",
                                        "model_id": None, "error": error})

    async def run_deployments(self, run: str) -> list[dict[str, Any]]:
        """This run's deployments at the resource (by name; other deployments are not touched)."""
        pattern = run_deployments(self.settings.deployment_prefix, run)
        return [d for d in await self.deployments.list() if pattern.fullmatch(str(d.get("name", "")))]

    async def undeploy(self, run: str, keep: set[str] = frozenset()) -> list[str]:
        """Remove every deployment of `run` except those in `keep`; returns their names."""
        removed = []
        for d in await self.run_deployments(run):
            if d["name"] not in keep and await self.deployments.delete(d["name"]):
                removed.append(d["name"])
        return removed

    async def billing_notes(self, run: str) -> list[str]:
        where = self.run_dir if self.run_dir is not None else "RUN_DIR"
        try:
            found = await self.run_deployments(run)
        except FinetuneError as e:  # the run's results stand; only the listing failed
            return [f"could not list this run's deployments at Azure ({e}); they are billed per hour while they "
                    f"exist: python -m harness.jobs {where} lists them, --undeploy removes them"]
        if not found:
            return []
        by_sku: dict[str, int] = {}
        for d in found:
            sku = str((d.get("sku") or {}).get("name") or self.settings.sku).lower()
            by_sku[sku] = by_sku.get(sku, 0) + 1
        hourly = sum(hosting_per_hour(s) * n if s in ("standard", "globalstandard", "developertier") else 0.0
                     for s, n in by_sku.items())
        skus = ", ".join(f"{n} {s}" for s, n in sorted(by_sku.items()))
        developer = (" Developer deployments cost nothing per hour and Azure deletes them 24 hours after they "
                     "were made." if "developertier" in by_sku else "")
        head = deployment_name(self.settings.deployment_prefix, run, 0, "g", 0)[: -len("i0-g0")]
        names = f"{head}{{{','.join(sorted(str(d['name'])[len(head):] for d in found))}}}"
        return [f"{len(found)} deployment(s) of this run's finetuned models are still at Azure ({skus}): {names}; "
                f"${hourly:.2f} per hour of hosting while they exist.{developer} Remove them when done: "
                f"python -m harness.jobs {where} --undeploy"]

    async def close(self) -> None:
        await self.deployments.close()
        await super().close()


def azure_provider(cfg: Any, base_url: str, run_dir: Path | None) -> AzureFinetuneProvider:
    """The provider for a run config (harness.config.RunConfig). With the simulator endpoint the
    simulator's own ARM routes stand in for the management plane (placeholders for the resource's
    coordinates, a placeholder token), so `--set finetune.provider=azure` runs offline."""
    import os

    from harness.providers.azure_deploy import token_provider

    settings = cfg.finetune.azure
    management_url = settings.management_url
    if cfg.endpoint.kind == "simulator":
        settings = settings.model_copy(update={k: getattr(settings, k) or f"sim-{k.replace('_', '-')}"
                                               for k in ("subscription_id", "resource_group", "account")})
        management_url = management_url or base_url.rstrip("/").removesuffix("/v1")
        env = settings.management_token_env

        async def token() -> str:
            return os.environ.get(env) or "simulated-token"
    else:
        token = token_provider(settings)
    deployments = Deployments(settings, token=token, management_url=management_url,
                              max_retries=cfg.endpoint.max_retries)
    return AzureFinetuneProvider(base_url, cfg.endpoint.api_key(), settings, deployments, models_base=cfg.models.base,
                                 run_dir=run_dir, max_retries=cfg.endpoint.max_retries,
                                 poll_interval_s=cfg.finetune.poll_interval_s,
                                 paused_timeout_s=cfg.finetune.paused_timeout_s)
