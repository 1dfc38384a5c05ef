"""Settings of the `tinker` finetuning provider (`finetune.tinker`), and Tinker's published prices.

Tinker (Thinking Machines' training API; also self-hostable, e.g. SkyRL's skyrl-tx) trains LoRA
adapters on one shared base model through a client-side loop. The provider runs that loop as
jobs of its own (harness/providers/tinker_train.py) and serves the trained adapters on the
harness's vLLM path. Ranges here are checked when the config loads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Tinker's training price, USD per million training tokens (every token of a datum that goes
# through forward_backward, times epochs), from its published models-and-pricing table
# (https://tinker-docs.thinkingmachines.ai/tinker/models/), as read on 2026-10-07. Keyed by the
# model name the service uses. Other models: `prices: {"<model>": {input: 0, output: 0,
# training: <USD per 1M>}}` in the run config. A local server (skyrl-tx) costs nothing per token.
TINKER_TRAINING_PRICES: dict[str, float] = {
    "Qwen/Qwen3-8B": 0.44,
}
TINKER_PRICES_DATE = "2026-10-07"
TINKER_PRICES_SOURCE = "https://tinker-docs.thinkingmachines.ai/tinker/models/"


class TinkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The service's address: None for the hosted service (the SDK's default), or e.g.
    # http://127.0.0.1:8000 for a self-hosted server.
    base_url: str | None = None
    # The environment variable holding the API key (never written to the config or run dir).
    api_key_env: str = "TINKER_API_KEY"
    # The base model as the service names it (e.g. "Qwen/Qwen3-8B"; a skyrl-tx server: its
    # --base-model string). Every adapter of the run is a LoRA on this one model.
    base_model: str | None = None
    # Where the jobs read the base model's tokenizer and chat template (a local folder or a hub
    # id): the tokens must be the service's. None: base_model.
    tokenizer: str | None = None
    rank: int = Field(8, ge=1, le=128)  # LoRA rank; must not exceed serve.max_lora_rank
    # Adam learning rate, scaled by finetune.hyperparameters.learning_rate_multiplier and decayed
    # linearly to 0 over the job. LoRA needs ~10x the full-finetuning rate.
    learning_rate: float = Field(1e-4, gt=0, le=1e-2)
    max_length: int = Field(2048, ge=16)  # tokens per example; an example that would cut a trained turn is dropped
    checkpoint_every: int = Field(5, ge=1)  # optimizer steps between training checkpoints (what a resumed job continues from)
    # Pad every datum with weight-0 tokens to a multiple of this length (no effect on the loss:
    # padding follows the text, and attention is causal). A JAX server (skyrl-tx) compiles one
    # program per padded length, ~1-2 minutes each on a CPU, so one length means one compile.
    # None on the hosted service, which bills every token sent.
    pad_to: int | None = Field(None, ge=1)
    max_parallel_jobs: int = Field(6, ge=1)  # training loops running at once (the service queues the rest)
    # Interpreter with the `tinker` SDK and transformers; None: .venv-tinker/bin/python of this
    # checkout if it exists (.ci/setup-tinker.sh), else the running interpreter.
    python: str | None = None
    request_timeout_s: float = Field(1800.0, gt=0)  # one forward_backward / optim_step / save

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url {v!r}: give the service's http(s) address, e.g. http://127.0.0.1:8000")
        return v.rstrip("/") if v else v


def tinker_config_error(cfg: Any) -> str | None:
    """What in a run config (a RunConfig; not imported here, to avoid an import cycle) the tinker
    provider cannot run with, or None."""
    tk = cfg.finetune.tinker
    if cfg.finetune.iterations > 0 and not tk.base_model:
        return ("finetune.tinker.base_model is not set: name the base model as the Tinker service knows it, "
                "e.g. --set finetune.tinker.base_model=Qwen/Qwen3-8B")
    if cfg.endpoint.kind != "vllm":
        return ("finetune.provider=tinker serves the trained adapters on a vLLM server: set endpoint.kind=vllm "
                "(e.g. --config vllm or smollm2, with serve.model the same base model as finetune.tinker.base_model)")
    if tk.rank > cfg.serve.max_lora_rank:
        return (f"finetune.tinker.rank: rank {tk.rank} exceeds serve.max_lora_rank {cfg.serve.max_lora_rank}; "
                f"vLLM would refuse the adapters")
    return None


def tinker_training_cost(settings: TinkerSettings, tokens: int, overrides: dict | None) -> tuple[float | None, str]:
    """(USD, note) for training `tokens` tokens on the Tinker service (for --dry-run and the
    plan): a `prices` entry with `training` wins, then the published table; a self-hosted
    server (base_url on this machine) costs nothing per token."""
    from harness.llm.pricing import training_price_for

    model = settings.base_model or "?"
    base_url = settings.base_url or ""
    if base_url.startswith(("http://127.0.0.1", "http://localhost")):
        return 0.0, "Tinker jobs on a self-hosted server: your own compute, no per-token charge"
    price = training_price_for(model, overrides)
    if price is None:
        price = TINKER_TRAINING_PRICES.get(model)
    if price is None:
        return None, (f"Tinker's training price of {model} is not in the table; add prices: {{\"{model}\": "
                      f"{{input: 0, output: 0, training: <USD per 1M tokens>}}}}")
    return tokens * price / 1e6, (f"Tinker training {model}: ${price}/1M tokens ({TINKER_PRICES_SOURCE}, "
                                  f"{TINKER_PRICES_DATE}); adapters served by your vLLM")
