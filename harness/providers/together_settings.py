"""Settings of the `together` finetuning provider (`finetune.together` in a run config).

Ranges are Together's documented ones, checked when the config loads so a bad value fails
before any debate is paid for. Sources (checked 2026-12-05): the published OpenAPI spec
(togethercomputer/openapi, openapi.yaml of 2026-04-28: POST /fine-tunes, LoRATrainingType,
TrainingMethodSFT, FineTuneModelLimits) and the official SDK's request checks (LoRA dropout in
[0, 1), warmup and min-lr ratios in [0, 1], max_grad_norm and weight decay >= 0). Per-model
limits (the largest LoRA rank, batch-size bounds, max epochs, learning-rate bounds) come from
`GET /v1/fine-tunes/models/limits?model_name=...`; the bounds here are the widest Together
documents, and the service refuses a value beyond a smaller model's own limit at submit.

`finetune.hyperparameters.n_epochs` is sent as is; its range is checked by
`together_epochs_error` (the provider calls it before any call). `finetune.hyperparameters.
batch_size` is NOT used: Together's smallest LoRA batch is 8 on most models (its default is
"max", with sequence packing), so the batch size is `finetune.together.batch_size`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The largest max_num_epochs GET /fine-tunes/models/limits reports for Together's models.
MAX_EPOCHS = 20
# The largest LoRA rank (lora_training.max_rank) Together reports for its models.
MAX_LORA_RANK = 64
# Together's suffix is added to the output model name; the service documents at most 40 characters.
MAX_SUFFIX = 40


class TogetherSettings(BaseModel):
    """How jobs are created on Together (POST /v1/fine-tunes)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The name Together's fine-tuning API knows models.base by, where the chat name differs: the
    # debates of iteration 0 run on a serverless chat model (e.g. ...-Instruct-Turbo), Together
    # finetunes its full-precision "Reference" twin. None: models.base itself.
    model: str | None = None
    # LoRA (Together's default) or a full finetune. Full finetunes of the 2N models each need a
    # dedicated endpoint to answer; LoRA adapters of a supported base are served serverless.
    lora: bool = True
    lora_r: int = Field(16, ge=1, le=MAX_LORA_RANK)  # LoRA rank (Together allows up to 64 on most models)
    lora_alpha: int = Field(32, ge=1)  # Together's CLI default is 2 x lora_r
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA layers
    lora_trainable_modules: str = "all-linear"  # the layers that get adapters (Together's default)
    # The usual LoRA rate (as finetune.local), between Together's API default (1e-5, meant for full
    # finetunes) and its CLI's LoRA default (1e-3); scaled by hyperparameters.learning_rate_multiplier.
    learning_rate: float = Field(1e-4, gt=0, le=1)
    # Examples per step; "max" (Together's default) packs sequences up to the model's largest batch.
    batch_size: int | Literal["max"] = "max"
    # Loss on the prompt tokens as well. Ignored (sent as true, with an explicit weight on every
    # message) when the data carries per-turn weights: Together then follows the weights only.
    train_on_inputs: bool = False
    warmup_ratio: float = Field(0.0, ge=0, le=1)  # share of the steps spent warming the learning rate up
    # Linear by default: the spec's lr_scheduler_args is a oneOf that cosine's arguments (which also
    # fit the linear shape) cannot satisfy strictly; cosine is sent with num_cycles 0.5 all the same.
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the schedule's final rate, as a share of learning_rate
    max_grad_norm: float = Field(1.0, ge=0)  # gradient clipping; 0 turns it off
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    # Base models whose LoRA finetunes Together serves serverless (pay per token, nothing
    # deployed). Any other model, and every full finetune, answers only from a dedicated endpoint
    # billed per hour while it runs: `--dry-run` says so and prices it.
    # The list changes: re-check Together's "LoRA inference" page before a paid run.
    serverless_lora_models: list[str] = Field(default_factory=lambda: [
        "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference",
        "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference",
    ])
    # USD per hour of the smallest dedicated endpoint for one finetuned model (1x H100 80GB on
    # Together's price list), and how many hours of it one iteration's debates keep it up.
    dedicated_endpoint_usd_per_hour: float = Field(3.36, ge=0)
    dedicated_endpoint_hours_per_iteration: float = Field(2.0, ge=0)  # for --dry-run's price

    @model_validator(mode="after")
    def _check(self) -> "TogetherSettings":
        if isinstance(self.batch_size, int) and not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size {self.batch_size}: give a number of examples (Together's models accept "
                             f"8 to a few hundred) or \"max\"")
        return self


def together_epochs_error(n_epochs: int) -> str | None:
    """What Together would refuse in finetune.hyperparameters.n_epochs, or None."""
    if not 1 <= n_epochs <= MAX_EPOCHS:
        return (f"finetune.hyperparameters.n_epochs = {n_epochs}: Together accepts 1 to {MAX_EPOCHS} epochs "
                f"(GET /v1/fine-tunes/models/limits, max_num_epochs)")
    return None
