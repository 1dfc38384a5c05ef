"""What every section of the run config shares: strict pydantic models and the URL check.

Imports only pydantic, so each config module (harness.config, harness.config_local) can build on
it without importing the other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _http_url(url: str) -> str:
    """A server URL the OpenAI client can call: http(s)://host..., refused at load otherwise (an
    ftp:// or schemeless URL would only fail at the first call, after the run has started)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
        raise ValueError(f"{url!r} is not an http:// or https:// URL; write the server's API root, e.g. "
                         f"http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    return url

