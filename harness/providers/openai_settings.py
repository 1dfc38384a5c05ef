"""The ranges the OpenAI fine-tuning API accepts, checked when a run config loads.

Imports nothing of the harness, so harness.config (which runs the check) and the openai provider
(which runs it again before any upload) both use it without an import cycle.
"""

from __future__ import annotations

from typing import Protocol


class _Hyperparameters(Protocol):  # finetune.hyperparameters (harness.config.Hyperparameters)
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

# The OpenAI fine-tuning API's ranges, from its official OpenAPI spec v2.3.0 (openai/openai-openapi,
# openapi.yaml: FineTuneSupervisedHyperparameters and CreateFineTuningJobRequest.seed). A run with
# the openai provider is checked against them at load time, before any call or upload.
OPENAI_FT_RANGES: dict[str, tuple[float, float | None]] = {
    "finetune.hyperparameters.n_epochs": (1, 50),
    "finetune.hyperparameters.batch_size": (1, 256),
    "finetune.hyperparameters.learning_rate_multiplier": (0, None),  # exclusive minimum 0, no maximum
    "seed": (0, 2**31 - 1),  # sent as the job's seed
}


def openai_ft_range_error(hp: _Hyperparameters, seed: int | None) -> str | None:
    """What in these hyperparameters or this seed the OpenAI fine-tuning API would refuse, or None."""
    values = {"finetune.hyperparameters.n_epochs": hp.n_epochs, "finetune.hyperparameters.batch_size": hp.batch_size,
              "finetune.hyperparameters.learning_rate_multiplier": hp.learning_rate_multiplier, "seed": seed}
    for name, (lo, hi) in OPENAI_FT_RANGES.items():
        v = values[name]
        if v is None:
            continue
        exclusive = name.endswith("learning_rate_multiplier")
        if v < lo or (exclusive and v == lo) or (hi is not None and v > hi):
            allowed = f"between {lo} and {hi}" if hi is not None else f"greater than {lo}"
            return f"{name} = {v}: OpenAI's fine-tuning API accepts values {allowed}"
    return None

