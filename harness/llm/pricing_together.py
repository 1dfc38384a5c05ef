"""Together AI's prices in USD: serverless inference per 1M tokens, fine-tuning per 1M training
tokens (examples' tokens x epochs) by model size, LoRA or full, and dedicated endpoints per hour.

Recorded 2026-12-05 from Together's published price list (https://www.together.ai/pricing and
docs.together.ai "Fine-tuning pricing": the cost of a job is (n_epochs x training tokens +
n_evals x validation tokens) x the rate for the model's size bracket, SFT, LoRA or full; no
minimum). The rates below are the ones that list gave; prices change, so re-check the page
before quoting a cost, and override any model with the run config's `prices` section.

A LoRA finetune served serverless is billed at its base model's per-token price; a model that
needs a dedicated endpoint is billed per hour while the endpoint is up, whether or not it is
called (`dedicated_endpoint_usd_per_hour` in finetune.together).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Serverless inference, USD per 1M tokens (input, output). Keys are Together model names; a
# finetune's output name (<user>/<base name>-<suffix>-<hash>) is priced by the base it contains.
INFERENCE: dict[str, tuple[float, float]] = {
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo": (0.18, 0.18),
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference": (0.18, 0.18),
    "meta-llama/Meta-Llama-3.1-70B-Instruct-Turbo": (0.88, 0.88),
    "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference": (0.88, 0.88),
    "meta-llama/Llama-3.3-70B-Instruct-Turbo": (0.88, 0.88),
    "Qwen/Qwen2.5-7B-Instruct-Turbo": (0.30, 0.30),
    "Qwen/Qwen2.5-72B-Instruct-Turbo": (1.20, 1.20),
}

# Supervised fine-tuning, USD per 1M training tokens: (largest size in billions, LoRA, full).
TRAINING_BRACKETS: tuple[tuple[float, float, float], ...] = (
    (16, 0.48, 0.54),
    (69, 1.50, 1.65),
    (100, 2.90, 3.20),
)
_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)[Bb](?![a-zA-Z])")


@dataclass(frozen=True)
class EndpointCost:
    usd: float
    note: str


def _base_name(model: str) -> str | None:
    """The INFERENCE key a (finetuned) Together model name belongs to, or None."""
    if model in INFERENCE:
        return model
    short = model.rsplit("/", 1)[-1]
    for name in sorted(INFERENCE, key=len, reverse=True):
        if short.startswith(name.rsplit("/", 1)[-1] + "-"):
            return name
    return None


def inference_price(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens of a Together model or LoRA finetune; None if unknown."""
    name = _base_name(model)
    return INFERENCE[name] if name else None


def model_size_b(model: str) -> float | None:
    sizes = [float(m) for m in _SIZE.findall(model)]
    return max(sizes) if sizes else None


def training_price(model: str, lora: bool = True) -> float | None:
    """USD per 1M training tokens to finetune `model` on Together; None if its size is unknown."""
    size = model_size_b(model)
    if size is None:
        return None
    for most, lora_rate, full_rate in TRAINING_BRACKETS:
        if size <= most:
            return lora_rate if lora else full_rate
    return None


def needs_dedicated_endpoint(base: str, lora: bool, serverless_lora_models: list[str]) -> bool:
    """Whether Together answers for a finetune of `base` only from a dedicated endpoint."""
    return not lora or base not in serverless_lora_models


def endpoint_cost(models: int, usd_per_hour: float, hours: float) -> EndpointCost:
    usd = models * usd_per_hour * hours
    return EndpointCost(usd, f"Together serves these finetunes only from dedicated endpoints: {models} x "
                             f"${usd_per_hour:.2f}/h x {hours:g} h (finetune.together.dedicated_endpoint_*), billed "
                             f"while up; stop them when the run ends")
