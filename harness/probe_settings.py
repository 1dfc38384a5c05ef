"""`serve.probe`: the check, after every load of LoRA adapters into vLLM, that each adapter
really changes what the server computes (harness/probes.py runs it; docs/serving/adapter-probes.md).

Imports only pydantic and harness.config_base, so harness.config_local can hold it.
"""

from __future__ import annotations

from pydantic import Field

from harness.config_base import _Strict

# A fixed text every adapter and the base model score. Mixed prose, arithmetic and a boxed answer:
# tokens an adapter trained on debate answers is likely to move, and long enough (80 tokens on
# SmolLM2's tokenizer) that a small shift shows in the maximum.
PROBE_TEXT = ("Question: What is 3+4*5+6-7*8? Let's think step by step. First, 4*5 = 20 and 7*8 = 56. "
              "Then 3 + 20 + 6 - 56 = -27. The other agents agree, so the final answer is \\boxed{-27}.")


class AdapterProbeConfig(_Strict):
    """Probe each loaded adapter against the base model on one fixed text: the prompt
    log-probabilities of a trained adapter differ from the base's; an adapter the server did not
    apply (or one that changes nothing, e.g. LoRA B all zeros) gives the base's own."""

    # Probe every adapter after each (re)load, on every server; a probe is one forward pass.
    enabled: bool = True
    # An adapter whose largest |logprob(adapter) - logprob(base)| over the text's tokens is at most
    # this (nats) is "not applied" and stops the run. The base against itself differs by 0 on the
    # same server; a one-epoch LoRA of the tiny test model moves it by ~1e-2 (measured, see the docs).
    tolerance: float = Field(1e-4, ge=0)
    # The text scored; None: PROBE_TEXT above.
    text: str | None = Field(None, min_length=1)

    def probe_text(self) -> str:
        return self.text or PROBE_TEXT
