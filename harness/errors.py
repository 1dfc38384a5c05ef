"""One exception hierarchy. Every message tells the user what to do next."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class: anything the harness raises on purpose."""


class ConfigError(HarnessError):
    """A run configuration is invalid. The message names the file, the field and what is allowed."""


class DataError(HarnessError):
    """A data set or data file cannot be loaded or is malformed (names the file and field)."""


class LLMError(HarnessError):
    """A model call failed for good (after retries, or a terminal error such as bad auth)."""


class BudgetExceeded(HarnessError):
    """The next call would pass the configured cost cap. The run stops cleanly and can resume."""


class FinetuneError(HarnessError):
    """A finetuning job or its data failed."""


class ServeError(HarnessError):
    """A model server is missing, died, or refused an adapter."""
