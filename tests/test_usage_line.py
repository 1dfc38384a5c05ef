"""How a run's cost reads to its user: calls to models served by vLLM have no API price and say
so, instead of "N calls of unknown price" (which suggests a bill nobody can tell)."""

from harness.llm.usage import UsageTotals, is_local, usage_line
from harness.records import UsageRecord
from harness.report import fmt_cost


def totals(*costs: float | None) -> dict:
    t = UsageTotals()
    for i, cost in enumerate(costs):
        t.add(UsageRecord(ts=float(i), model="base", prompt_tokens=10, completion_tokens=5, latency_s=0.1,
                          cost_usd=cost, cached=False))
    return t.model_dump()


def test_local_model_calls_read_as_local_not_unknown():
    usage = totals(None, None, None)
    line = usage_line(usage, local=True)
    assert "inference cost local (no API price)" in line and "unknown" not in line
    assert "calls 3 (cache hits 0), tokens 30 in / 15 out" in line
    # a priced call beside them (e.g. hosted embeddings) is still added up
    assert "$0.0020 + 1 calls local (no API price)" in usage_line(totals(0.002, None), local=True)


def test_hosted_calls_of_unknown_price_still_say_so():
    assert "inference cost $0.0010 + 1 calls of unknown price" in usage_line(totals(0.001, None))
    assert "inference cost $0.0010" in usage_line(totals(0.001), simulated=True)
    assert usage_line(totals(0.001), simulated=True).endswith("(simulated prices)")


def test_the_report_table_says_local_for_vllm_runs():
    assert is_local({"endpoint": {"kind": "vllm"}}) and not is_local({"endpoint": {"kind": "openai"}})
    assert fmt_cost(0.0, 432, False, local=True) == "local (no API price)"
    assert fmt_cost(0.5, 3, False) == "≥ $0.5000 + 3 unpriced"
    assert fmt_cost(0.0, 3, False) == "unknown"
