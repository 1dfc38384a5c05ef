"""The Batch API's calls (files and batches) for harness.llm.batch, each under the one retry
layer (harness.llm.retry). Creating a batch, like creating a fine-tuning job, has no idempotency
key: `submit` looks the batch up by the metadata it is tagged with before creating it, and the
lookup and the create are retried together, so a retry never submits a second batch."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, TypeVar

import openai

from harness.llm.retry import with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

ENDPOINT = "/v1/chat/completions"  # the debate's calls
EMBEDDINGS = "/v1/embeddings"  # the diversity stage's calls (an endpoint embedding model)
TAG = "harness_batch"  # metadata key holding the harness's own id of a batch
RUN_TAG = "harness_run"
TERMINAL = ("completed", "failed", "expired", "cancelled")
# Lookups page back through the newest batches and files down to this long before the record
# was written (clocks differ between us and the server).
_LOOKBACK_S = 3600


class BatchApi:
    def __init__(self, client: openai.AsyncOpenAI, base_url: str, *, max_retries: int, api_key_env: str | None,
                 backoff_base_s: float = 0.5):
        self._client = client
        self.base_url = base_url
        self._retries = max_retries
        self._api_key_env = api_key_env
        self._backoff_base_s = backoff_base_s

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(fn, self._retries, base_url=self.base_url, what=what, api_key_env=self._api_key_env,
                                  base_s=self._backoff_base_s)

    async def upload(self, filename: str, content: bytes, since: float) -> str:
        """The id of the input file: one already uploaded under this name and size, or a new upload."""
        async def find_or_upload() -> str:
            async for f in self._client.files.list(purpose="batch", order="desc"):
                if f.created_at < since - _LOOKBACK_S:
                    break
                if f.filename == filename and f.bytes == len(content):
                    log.info("batch input %s was already uploaded as %s", filename, f.id)
                    return f.id
            return (await self._client.files.create(file=(filename, content), purpose="batch")).id
        return await self._call(f"uploading the batch input {filename}", find_or_upload)

    async def find(self, tag: str, since: float) -> Any | None:
        """The batch tagged with this harness id, if one was created."""
        async def lookup() -> Any | None:
            async for b in self._client.batches.list(limit=100):
                if b.created_at < since - _LOOKBACK_S:
                    break
                if (b.metadata or {}).get(TAG) == tag:
                    return b
            return None
        return await self._call(f"looking up batch {tag}", lookup)

    async def submit(self, tag: str, run: str, input_file_id: str, window: str, since: float,
                     endpoint: str = ENDPOINT) -> Any:
        async def find_or_create() -> Any:
            found = await self.find(tag, since)
            if found is not None:
                log.info("batch %s was already created as %s: adopted, not submitted again", tag, found.id)
                return found
            return await self._client.batches.create(input_file_id=input_file_id, endpoint=endpoint,
                                                     completion_window=window, metadata={TAG: tag, RUN_TAG: run})
        return await self._call(f"creating batch {tag}", find_or_create)

    async def retrieve(self, batch_id: str) -> Any:
        return await self._call(f"checking batch {batch_id}", lambda: self._client.batches.retrieve(batch_id))

    async def content(self, file_id: str) -> bytes:
        async def read() -> bytes:
            return (await self._client.files.content(file_id)).content
        return await self._call(f"reading batch file {file_id}", read)


__all__ = ["BatchApi", "EMBEDDINGS", "ENDPOINT", "RUN_TAG", "TAG", "TERMINAL"]
