"""Model calls for the whole harness: AsyncOpenAI against any OpenAI-compatible endpoint, with
pacing under rate limits, one retry layer, the run's response cache, a journal of requests in
flight, usage/cost logging and the budget cap. See client.py (LLMClient), responses.py (one
request each, and its checks), transport.py (the HTTP client), pacing.py, retry.py, ledger.py
(usage, journal and budget together), journal.py, pricing.py, cache.py, usage.py; batch.py sends debate rounds through
the Batch API.

The names below are imported on first use (PEP 562), so that `python -m harness.llm.cache`
runs its module once, not after the package has already imported it."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChatResult": "harness.llm.client", "LLMClient": "harness.llm.client", "sample_seed": "harness.llm.client",
    "Price": "harness.llm.pricing", "cost_usd": "harness.llm.pricing", "price_for": "harness.llm.pricing",
    "is_terminal": "harness.llm.retry", "is_transient": "harness.llm.retry", "retrying": "harness.llm.retry",
    "with_retries": "harness.llm.retry", "UsageTotals": "harness.llm.usage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'harness.llm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
