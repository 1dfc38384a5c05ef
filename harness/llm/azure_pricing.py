"""Azure OpenAI's fine-tuning prices: training per 1M tokens and hosting per hour of a deployed
finetuned model, for `--dry-run`, the budget and the run's summary.

Recorded 2026-12-05 from Azure OpenAI's published pricing (azure.microsoft.com/pricing/details/
cognitive-services/openai-service, "Fine-tuning models", Global training; hosting of Standard and
Global Standard deployments). This machine has no access to the live page, so the numbers are the
ones known at the recording date: re-check them before quoting a cost. Regional (data-zone)
training costs more than Global; Developer training is cheaper and may be pre-empted. A run
config's `prices` section overrides the training price (`prices: {"gpt-4.1-mini": {input: ...,
output: ..., training: 5.0}}`), as for the openai provider.

Inference on a finetuned deployment is priced here as OpenAI prices inference on the same
finetuned model (harness.llm.pricing, "ft:<family>"), an upper estimate of Azure's Global rates.
"""

from __future__ import annotations

from harness.llm.pricing import price_for, training_price_for
from harness.providers.azure_settings import family_of

# USD per 1M training tokens (examples' tokens x epochs), Global training, by family.
AZURE_TRAINING_PRICES: dict[str, float] = {
    "gpt-4o-mini": 3.00,
    "gpt-4o": 25.00,
    "gpt-4.1": 25.00,
    "gpt-4.1-mini": 5.00,
    "gpt-4.1-nano": 1.50,
}
# USD per hour that one deployment of a finetuned model exists, by sku (deployment type).
# Developer deployments have no hosting fee (Azure deletes them after 24 hours).
AZURE_HOSTING_PER_HOUR: dict[str, float] = {"standard": 1.70, "globalstandard": 1.70, "developertier": 0.0}
PRICES_RECORDED = "2026-12-05"


def azure_training_price(model: str, overrides: dict | None = None) -> float | None:
    """USD per 1M training tokens to finetune `model` (family, snapshot or finetuned id) on Azure;
    a `prices` override with `training` wins; None for a model Azure does not finetune."""
    entry = (overrides or {}).get(model)
    if isinstance(entry, dict) and entry.get("training") is not None:
        return training_price_for(model, overrides)
    family = family_of(model)
    if family is None:
        return training_price_for(model, overrides) if model.startswith("sim-") else None
    return AZURE_TRAINING_PRICES[family]


def hosting_per_hour(sku: str) -> float:
    return AZURE_HOSTING_PER_HOUR[sku]


def inference_model(model: str) -> str:
    """The name whose (OpenAI) price stands for inference on a finetuned deployment of `model`."""
    family = family_of(model)
    if family:
        return f"ft:{family}"
    return f"ft:{model}:sim-org:plan:0" if model.startswith("sim-") else model


def deployment_price(model: str) -> dict[str, float] | None:
    """A `prices` entry for the deployments of models finetuned from `model`, or None if unknown."""
    price = price_for(inference_model(model))
    if price is None:
        return None
    entry = {"input": price.input, "output": price.output}
    if price.cached_input is not None:
        entry["cached_input"] = price.cached_input
    return entry


def azure_plan_note(cfg, jobs: int) -> str:
    """The dry run's note on an iteration's Azure jobs: training, and hosting per hour of the
    deployments they leave (cfg: a harness.config.RunConfig)."""
    az = cfg.finetune.azure
    rate = hosting_per_hour(az.sku)
    hosting = (f"{jobs} deployments x ${rate:.2f}/h = ${jobs * rate:.2f} per hour each iteration's models stay "
               f"deployed ({az.sku})" if rate else
               f"{jobs} {az.sku} deployments: no hosting fee, deleted by Azure after 24 h")
    return (f"Azure finetuning: {cfg.finetune.hyperparameters.n_epochs} epochs at Global training prices; {hosting}; "
            f"prices recorded {PRICES_RECORDED}")
