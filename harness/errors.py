"""One exception hierarchy. Every message tells the user what to do next."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class: anything the harness raises on purpose."""


class ConfigError(HarnessError):
    """A run configuration is invalid. The message names the file, the field and what is allowed."""


class DataError(HarnessError):
    """A data set or data file cannot be loaded or is malformed (names the file and field)."""


class LLMError(HarnessError):
    """A model call failed for good (after retries, or a terminal error such as bad auth).
    `status` and `code` are the server's HTTP status and error code, when it gave them."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def context_too_long(self) -> bool:
        """The request was refused because the conversation outgrew the model's context window
        (OpenAI's code, or vLLM's wording): a property of this one request, not of the run."""
        return self.status == 400 and (self.code == "context_length_exceeded"
                                       or "maximum context length" in str(self).lower())


class LogprobsUnavailable(LLMError):
    """The endpoint gives no prompt log-probabilities (vLLM does; OpenAI and the simulator do
    not), or they cannot be lined up with the text scored. Never retried: asking again cannot help."""


class BatchUnfinished(LLMError):
    """A Batch API batch still running after endpoint.batch_settings.max_wait_s. The run stops
    and resumes by polling the same batch, whichever stage sent it (diversity included)."""


class BudgetExceeded(HarnessError):
    """The next call would pass the configured cost cap. The run stops cleanly and can resume."""


class FinetuneError(HarnessError):
    """A finetuning job or its data failed."""


class ServeError(HarnessError):
    """A model server is missing, died, or refused an adapter."""


class AdapterNotApplied(ServeError):
    """A loaded LoRA adapter scores a fixed text exactly like the base model on a server: the
    server is not applying it (or the adapter changes nothing). See harness/probes.py."""
