"""Model calls for the whole harness: AsyncOpenAI against any OpenAI-compatible endpoint, with a
concurrency limit, one retry layer, the run's response cache, usage/cost logging and the
budget cap. See client.py (LLMClient), retry.py, pricing.py, cache.py, usage.py."""

from harness.llm.client import ChatResult, LLMClient, sample_seed
from harness.llm.pricing import Price, cost_usd, price_for
from harness.llm.retry import is_terminal, is_transient, retrying, with_retries
from harness.llm.usage import UsageTotals

__all__ = [
    "ChatResult", "LLMClient", "Price", "UsageTotals", "cost_usd", "is_terminal", "is_transient", "price_for",
    "retrying", "sample_seed", "with_retries",
]
