"""The HTTP client of LLMClient, and the moment each request starts to leave this machine.

The journal of requests in flight (journal.py) counts a request as possibly billed only if the
server may have received it whole. A request still waiting for a connection, or whose
connection failed before its body went out, cannot have been billed; counting it anyway made a
run that was stopped with 64 calls queued report hundreds of "possibly billed" calls where the
server had produced a handful of answers. So the journal line of a request is written when the
first byte of its body is about to be written to the socket (aiohttp's `on_request_chunk_sent`
trace signal fires just before the write), not when the call starts.

How a request reaches the signal: `sending(on_send)` sets a context variable for the attempt;
aiohttp runs the body write in a task created from the caller's context, so the signal handler
finds it there and calls `on_send()` once. If `on_send` fails (a full disk: the journal line
cannot be written), the body is not sent and the error is kept on the `Sending` for the caller
to raise instead of the connection error aiohttp makes of it.

The client is the SDK's own aiohttp client (see client.py for why aiohttp) with a trace config
added to each aiohttp session it creates. Should a future SDK build its transport differently,
`traced` is False and the caller journals every request before sending it, as before: the count
is then an over-estimate again, never an under-estimate.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Iterator

import aiohttp
import httpx2
import openai

log = logging.getLogger(__name__)


class Sending:
    """One attempt: `on_send()` runs (once) as its body starts to go out; `sent` says it did."""

    def __init__(self, on_send: Callable[[], None]):
        self._on_send = on_send
        self.sent = False
        self.error: BaseException | None = None

    def transmit(self) -> None:
        if self.sent or self.error is not None:
            return
        try:
            self._on_send()
        except BaseException as exc:  # nothing goes out unrecorded
            self.error = exc
            raise
        self.sent = True


_CURRENT: contextvars.ContextVar[Sending | None] = contextvars.ContextVar("harness_llm_sending", default=None)


@contextlib.contextmanager
def sending(on_send: Callable[[], None]) -> Iterator[Sending]:
    """The attempt made inside this block calls `on_send()` just before its body is sent."""
    attempt = Sending(on_send)
    token = _CURRENT.set(attempt)
    try:
        yield attempt
    finally:
        _CURRENT.reset(token)


async def _on_chunk_sent(session: Any, ctx: Any, params: Any) -> None:
    attempt = _CURRENT.get()
    if attempt is not None:
        attempt.transmit()


def _trace_config() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_on_chunk_sent)
    return trace


def _traced(transport: Any) -> bool:
    """Make the SDK's aiohttp transport open its sessions with our trace config. It builds the
    same connector the SDK does (pool size, keep-alive, TLS context); proxies are per request."""
    if not (hasattr(transport, "client") and hasattr(transport, "ssl_context") and hasattr(transport, "limits")):
        return False
    if transport.client is not None:
        return False

    def session() -> aiohttp.ClientSession:
        limit = transport.limits.max_connections
        connector = aiohttp.TCPConnector(keepalive_timeout=transport.limits.keepalive_expiry, ssl=transport.ssl_context,
                                         **({"limit": limit} if limit is not None else {}))
        return aiohttp.ClientSession(connector=connector, trace_configs=[_trace_config()])

    transport.client = session
    return True


class _TracedAioHttpClient(openai.DefaultAioHttpClient):  # type: ignore[misc, valid-type]
    """Every transport the SDK's client builds (the direct one, and one per proxy from the
    environment) is traced; `harness_traced` is False if any could not be."""

    def _init_transport(self, *args: Any, **kwargs: Any) -> Any:
        return self._trace(super()._init_transport(*args, **kwargs))

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> Any:
        return self._trace(super()._init_proxy_transport(*args, **kwargs))

    def _trace(self, transport: Any) -> Any:
        self.harness_traced = getattr(self, "harness_traced", True) and _traced(transport)
        return transport


def http_client(*, concurrency: int, timeout_s: float) -> tuple[httpx2.AsyncClient, bool]:
    """(the shared HTTP client of a run's OpenAI clients, whether it signals each send)."""
    # The pool must hold at least `concurrency` connections, or it, not the semaphore, becomes
    # the limit; keep-alive for all of them so bursts reuse connections instead of reopening.
    # keepalive_expiry 3 s: below the 5 s idle timeout of uvicorn (vLLM, the simulator). At the
    # same 5 s, a connection reused just as the server closes it fails ("server disconnected",
    # reported as a timeout) and the request would count as possibly billed.
    limits = httpx2.Limits(max_connections=concurrency + 16, max_keepalive_connections=concurrency,
                           keepalive_expiry=3.0)
    client = _TracedAioHttpClient(limits=limits, timeout=timeout_s)
    traced = getattr(client, "harness_traced", False)
    if not traced:
        log.info("this openai SDK builds its HTTP transport differently: every request is journaled before it is "
                 "sent, so 'possibly billed' counts may include requests that never left")
    return client, traced


__all__ = ["Sending", "http_client", "sending"]
