"""Multiagent finetuning harness (Subramaniam et al., ICLR 2025).

Data flows one way: config -> tasks -> debate (via llm) -> ftdata -> provider -> registry
-> next iteration; evaluate reads the debate records.
"""

__version__ = "0.1.0"
