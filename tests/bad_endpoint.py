"""A server on 127.0.0.1 that answers every request the same wrong way, as a misconfigured
endpoint does: a bad key (401), a wrong path (404 page), or status 200 with an HTML login page,
bytes that are not JSON, or `{}`. For tests of what the user is told."""

from __future__ import annotations

import http.server
import json
import threading
import time

ANSWERS = {
    "401": (401, "application/json", json.dumps({"error": {"message": "Incorrect API key provided",
                                                            "type": "invalid_request_error",
                                                            "code": "invalid_api_key"}}).encode()),
    "404": (404, "text/html", b"<html><body><h1>404 Not Found</h1></body></html>"),
    "html": (200, "text/html; charset=utf-8",
             b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Company proxy login</body></html>"),
    "garbage": (200, "application/octet-stream", b"\x00\x01\x02 not json at all"),
    "empty": (200, "application/json", b"{}"),
}


class BadEndpoint:
    """`with BadEndpoint("html", delay_s=0.2) as server:` ... `server.base_url`; `server.requests`
    counts the requests it answered."""

    def __init__(self, mode: str, *, delay_s: float = 0.0):
        status, content_type, body = ANSWERS[mode]
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                time.sleep(delay_s)
                outer.requests += 1
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client hung up
                    pass

            do_GET = do_POST = _answer  # noqa: N815 - http.server's names

            def log_message(self, *args) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except OSError:
                    pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "BadEndpoint":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
