"""OpenAI-style errors, request parsing helpers and the "this is simulated" marking."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

SIMULATED_HEADER = ("x-simulated", "true")
FINGERPRINT = "simulated"


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def not_found(what: str, ident: str, code: str | None = None) -> ApiError:
    return ApiError(404, f"No such {what}: '{ident}'.", code=code, param="id")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        return ApiError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # A simulator bug should still look like an API error to the client, and say what broke.
        return ApiError(500, f"Simulator internal error: {type(exc).__name__}: {exc}", type="server_error").response()


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    where = f"'{param}'" if param else "request"
    return ApiError(400, f"Invalid {where}: {first.get('msg')}.", param=param)


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body validated against `model`, or a 400 in OpenAI's shape."""
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. The body must be a JSON object.",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


class SimulatedMarker:
    """ASGI middleware adding `x-simulated: true` to every response. Plain ASGI rather than a
    BaseHTTPMiddleware, which would add a task per request on the hot path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def marked_send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((SIMULATED_HEADER[0].encode(), SIMULATED_HEADER[1].encode()))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, marked_send)


_DISPOSITION = re.compile(r'(\w+)="([^"]*)"')


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """A multipart/form-data body as (fields, files {name: (filename, bytes)}). Small and
    dependency-free: uploads here are training files of a few megabytes at most."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if "multipart/form-data" not in content_type or not m:
        raise ApiError(400, "Expected a multipart/form-data body with a 'file' and a 'purpose'.")
    delimiter = b"--" + m.group(1).encode()
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        part = part[2:] if part.startswith(b"\r\n") else part
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = head.decode("utf-8", "replace")
        params = dict(_DISPOSITION.findall(headers))
        name = params.get("name")
        if name is None:
            continue
        if "filename" in params:
            files[name] = (params["filename"], content)
        else:
            fields[name] = content.decode("utf-8", "replace")
    return fields, files
