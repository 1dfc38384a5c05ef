"""Model prices in USD per million tokens, and the cost of one call.

Table recorded 2026-11-24 from OpenAI's published API prices (standard tier; the Batch API
costs `BATCH_SHARE` of it, input and output alike); re-check https://openai.com/api/pricing before quoting a cost. A run config's `prices`
section overrides any entry, and is the way to price models this table does not know
(vLLM-served open models, other providers): `prices: {"my-model": {input: 0.2, output: 0.6}}`.
Override keys may be shell-style patterns (`"agent-*"`, or `"*"` for everything on a local
server that costs nothing per token).

An unknown model has no price: `cost_usd` returns None and usage.jsonl records null, never 0,
so an unpriced run is never mistaken for a free one.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from harness.errors import ConfigError
from harness.llm import pricing_together


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens. `cached_input` None: the model has no discount for cached prompts."""

    input: float
    cached_input: float | None
    output: float


# Nominal prices for the built-in simulator's models (sim-*, and ft:sim-* after simulated
# finetuning). SIMULATED: nobody is billed. They mirror gpt-4o-mini / ft:gpt-4o-mini so that
# cost reports and the budget cap can be exercised offline with realistic magnitudes.
_SIM = Price(0.15, 0.075, 0.60)
_SIM_FT = Price(0.30, 0.15, 1.20)

PRICES: dict[str, Price] = {
    # Base models (inference).
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
    "gpt-4o": Price(2.50, 1.25, 10.00),
    "gpt-4.1": Price(2.00, 0.50, 8.00),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-3.5-turbo": Price(0.50, None, 1.50),
    # Inference on fine-tuned models, keyed "ft:<base>"; ids look like ft:<base>:<org>:<suffix>:<id>.
    "ft:gpt-4o-mini": Price(0.30, 0.15, 1.20),
    "ft:gpt-4o": Price(3.75, 1.875, 15.00),
    "ft:gpt-4.1": Price(3.00, 0.75, 12.00),
    "ft:gpt-4.1-mini": Price(0.80, 0.20, 3.20),
    "ft:gpt-4.1-nano": Price(0.20, 0.05, 0.80),
    "ft:gpt-3.5-turbo": Price(3.00, None, 6.00),
    # Embeddings (diversity metrics): input tokens only.
    "text-embedding-3-small": Price(0.02, None, 0.0),
    "text-embedding-3-large": Price(0.13, None, 0.0),
    "text-embedding-ada-002": Price(0.10, None, 0.0),
}

# Fine-tuning (training) prices, USD per 1M training tokens (examples' tokens x epochs), keyed
# by base family. Fine-tuning from a fine-tuned model (ft:<base>:...) costs the base's price.
TRAINING_PRICES: dict[str, float] = {
    "gpt-4o-mini": 3.00,
    "gpt-4o": 25.00,
    "gpt-4.1": 25.00,
    "gpt-4.1-mini": 5.00,
    "gpt-4.1-nano": 1.50,
    "gpt-3.5-turbo": 8.00,
}
_SIM_TRAINING = 3.00  # SIMULATED nominal price, as gpt-4o-mini; nobody is billed

# Dated snapshots share their family's price: gpt-4o-mini-2024-07-18, gpt-3.5-turbo-0125.
# Only a date suffix is accepted, not any suffix, because variants such as gpt-4o-audio-preview
# are priced differently and a wrong price is worse than an unknown one.
# The Batch API's price as a share of the standard one: OpenAI bills batch requests at half
# price. Applied to config overrides too, so a user's own price for a model stays the reference.
BATCH_SHARE = 0.5

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def _base_price(name: str) -> Price | None:
    if name in PRICES:
        return PRICES[name]
    stripped = _SNAPSHOT.sub("", name)
    if stripped in PRICES:
        return PRICES[stripped]
    return None


def _from_override(model: str, raw: dict) -> Price:
    if not isinstance(raw, dict) or "input" not in raw or "output" not in raw:
        raise ConfigError(
            f"prices.{model}: expected a mapping with 'input' and 'output' (USD per 1M tokens) "
            f"and optionally 'cached_input', got {raw!r}"
        )
    unknown = set(raw) - {"input", "cached_input", "output", "training"}
    if unknown:
        raise ConfigError(f"prices.{model}: unknown field(s) {sorted(unknown)}; "
                          f"allowed: input, cached_input, output, training")
    if raw.get("training") is not None and not isinstance(raw["training"], (int, float)):
        raise ConfigError(f"prices.{model}.training: must be a number (USD per 1M training tokens)")
    try:
        price = Price(float(raw["input"]), None if raw.get("cached_input") is None else float(raw["cached_input"]),
                      float(raw["output"]))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"prices.{model}: prices must be numbers (USD per 1M tokens): {e}") from None
    if min(price.input, price.output, price.cached_input or 0.0) < 0:
        raise ConfigError(f"prices.{model}: prices cannot be negative")
    return price


def check_overrides(overrides: dict | None) -> None:
    """Validate a config's `prices` section (raises ConfigError naming the entry)."""
    for name, raw in (overrides or {}).items():
        _from_override(name, raw)


def _override_entry(model: str, overrides: dict | None) -> tuple[str, dict] | None:
    """Exact key first, then the longest matching pattern."""
    if not overrides:
        return None
    if model in overrides:
        return model, overrides[model]
    patterns = [k for k in overrides if any(c in k for c in "*?[") and fnmatch.fnmatchcase(model, k)]
    if patterns:
        best = max(patterns, key=len)
        return best, overrides[best]
    return None


def price_for(model: str, overrides: dict | None = None) -> Price | None:
    """The price of `model`, or None when unknown. Config overrides win: an exact key first,
    then the longest matching pattern."""
    entry = _override_entry(model, overrides)
    if entry is not None:
        return _from_override(*entry)
    if model.startswith("ft:"):
        # ft:<base>:<org>:<suffix>:<id> -> the fine-tuned price of <base>.
        base = model[3:].split(":", 1)[0]
        if base.startswith("sim-"):
            return _SIM_FT
        return _base_price("ft:" + base)
    if model.startswith("sim-"):
        return _SIM
    if "/" in model:  # Together AI's names (org/model, and finetunes <user>/<base>-<suffix>-<hash>)
        together = pricing_together.inference_price(model)
        return Price(together[0], None, together[1]) if together else None
    return _base_price(model)


def training_price_for(model: str, overrides: dict | None = None) -> float | None:
    """USD per 1M training tokens to fine-tune `model` (a base id or an ft: id), None if unknown.
    A config override entry may carry `training`."""
    entry = _override_entry(model, overrides)
    if entry is not None:
        _from_override(*entry)  # validates the entry
        if entry[1].get("training") is not None:
            return float(entry[1]["training"])
    base = model[3:].split(":", 1)[0] if model.startswith("ft:") else model
    if base.startswith("sim-"):
        return _SIM_TRAINING
    # A Together model or finetune (a name in Together's table, or a finetune of one): its size
    # bracket's LoRA rate. Other org/model names (a hub model on vLLM, a Tinker base) are not
    # Together's to price: they stay unknown unless the config's `prices` gives them a rate.
    if "/" in base and pricing_together.inference_price(base) is not None:
        return pricing_together.training_price(base)
    if "/" in base:
        return None
    if base in TRAINING_PRICES:
        return TRAINING_PRICES[base]
    return TRAINING_PRICES.get(_SNAPSHOT.sub("", base))


def cost_usd(model: str, prompt_tokens: int, cached_prompt_tokens: int | None, completion_tokens: int,
             overrides: dict | None = None, *, batch: bool = False) -> float | None:
    """USD cost of one call from the tokens the server reported; None when the price is unknown.
    `batch`: the call was answered through the Batch API (BATCH_SHARE of the price)."""
    price = price_for(model, overrides)
    if price is None:
        return None
    cached = min(max(cached_prompt_tokens or 0, 0), prompt_tokens)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    total = (prompt_tokens - cached) * price.input + cached * cached_rate + completion_tokens * price.output
    return total / 1_000_000 * (BATCH_SHARE if batch else 1.0)


def estimate_cost(model: str, prompt_chars: int, max_output_tokens: int, overrides: dict | None = None, *,
                  batch: bool = False) -> float | None:
    """Upper-bound-ish estimate before a call: ~4 characters per prompt token (no tokenizer is
    needed or downloaded), the whole max_tokens as output, no cache discount."""
    return cost_usd(model, (prompt_chars + 3) // 4, 0, max_output_tokens, overrides, batch=batch)
