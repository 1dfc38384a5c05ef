"""The finetuning provider a run config names (`finetune.provider`): the one place that chooses.

Each provider's module is imported only when chosen, so a run never loads another's SDK.
"""

from __future__ import annotations

from pathlib import Path

from harness.config import RunConfig
from harness.providers.base import FinetuneProvider


def make_provider(cfg: RunConfig, base_url: str, run_dir: Path) -> FinetuneProvider:
    if cfg.finetune.provider == "local":
        from harness.providers.local import LocalLoraProvider

        return LocalLoraProvider.from_config(cfg, run_dir)
    if cfg.finetune.provider == "tinker":
        from harness.providers.tinker_ft import TinkerProvider

        return TinkerProvider.from_config(cfg, run_dir)
    if cfg.finetune.provider == "together":
        from harness.providers.together_ft import TogetherFinetuneProvider

        ft = cfg.finetune
        return TogetherFinetuneProvider(base_url, cfg.endpoint.api_key(), base_model=cfg.models.base,
                                        settings=ft.together, n_epochs=ft.hyperparameters.n_epochs,
                                        learning_rate_multiplier=ft.hyperparameters.learning_rate_multiplier,
                                        max_retries=cfg.endpoint.max_retries, poll_interval_s=ft.poll_interval_s,
                                        paused_timeout_s=ft.paused_timeout_s)
    if cfg.finetune.provider == "azure":
        from harness.providers.azure_ft import azure_provider

        return azure_provider(cfg, base_url, run_dir)
    from harness.providers.openai_ft import OpenAIFinetuneProvider

    return OpenAIFinetuneProvider(base_url, cfg.endpoint.api_key(), max_retries=cfg.endpoint.max_retries,
                                  poll_interval_s=cfg.finetune.poll_interval_s,
                                  paused_timeout_s=cfg.finetune.paused_timeout_s)
