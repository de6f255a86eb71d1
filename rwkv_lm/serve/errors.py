"""Every error the server gives, in OpenAI's JSON ({"error": {"message", "type", "param", "code"}}), with the
field named as the client named it: FastAPI's and Starlette's own errors (405, a body that is not UTF-8, JSON
nested too deeply, a body sent without a JSON content type) and pydantic's (whose locations name the union
branches it tried, `messages.0.content.str`, which no client wrote)."""
from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .openai_api import ApiError


class AsciiJSONResponse(JSONResponse):
    """JSON in ASCII: a reply that quotes a client's text stays encodable whatever that text holds."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(e: ApiError, headers: dict | None = None) -> AsciiJSONResponse:
    headers = {**({"Retry-After": "1"} if e.status == 503 else {}), **(headers or {})}
    return AsciiJSONResponse(e.body(), status_code=e.status, headers=headers or None)


def client_path(loc, body) -> str | None:
    """pydantic's error location as the client wrote it: without the leading "body" and without the names of
    the union branches pydantic tried (a key the body does not have, unless it is the missing field)."""
    path, node = [], body
    keys = list(loc[1:] if loc and loc[0] == "body" else loc)
    for depth, key in enumerate(keys):
        if isinstance(node, dict) and key in node:
            path.append(str(key))
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            path.append(str(key))
            node = node[key]
        elif depth == len(keys) - 1 and isinstance(node, dict) and isinstance(key, str) and not _is_branch(key):
            path.append(key)  # a missing field
    return ".".join(path) or None


def _is_branch(key: str) -> bool:
    return any(c in key for c in "[]()-") or key in {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(e: RequestValidationError) -> ApiError:
    """The most specific of pydantic's errors (the one deepest in the body) as a 400 naming its field."""
    errors = e.errors()
    body = getattr(e, "body", None)
    if any(err.get("type") == "json_invalid" for err in errors):
        first = next(err for err in errors if err.get("type") == "json_invalid")
        return ApiError(400, f"the body is not valid JSON ({first.get('msg')})")
    if not isinstance(body, dict):  # (FastAPI hands over the raw bytes of a body sent as another content type)
        return ApiError(400, "the body must be a JSON object, sent with 'Content-Type: application/json'")
    ranked = [(client_path(err.get("loc", ()), body), err) for err in errors]
    field, first = max(ranked, key=lambda r: len((r[0] or "").split(".")) if r[0] else 0)
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return ApiError(400, f"{field}: {message}" if field else message, param=field)


def http_error(request, e: HTTPException) -> ApiError:
    """Starlette's HTTPException (no such route or method, a body FastAPI could not parse) as an ApiError."""
    cause = e.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(400, f"the body is not valid UTF-8 (byte {cause.object[cause.start]:#04x} at offset {cause.start})")
    if isinstance(cause, RecursionError):
        return ApiError(400, "the body's JSON nests too deeply to parse")
    if e.status_code == 404:
        return ApiError(404, f"no such endpoint: {request.method} {request.url.path}")
    if e.status_code == 405:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}")
    return ApiError(e.status_code, str(e.detail))


def install(app: FastAPI) -> None:
    """Answer every error `app` can raise in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error_response(validation_error(e))

    @app.exception_handler(HTTPException)
    async def http(request, e: HTTPException):
        return error_response(http_error(request, e), headers=e.headers)
