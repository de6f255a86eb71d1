"""The checks that hold requests to the server's `Limits` before they cost anything: a body is refused by its
Content-Length before it is read, a prompt by its character count before it is tokenized, where that count
already proves it too long."""
from __future__ import annotations

import asyncio

from .errors import error_response
from .limits import Limits
from .openai_api import ApiError


def check_prompt_chars(text: str, limits: Limits, token_bytes: int, param: str) -> None:
    """413 for a text whose length alone proves it has more tokens than the limit (characters <= bytes)."""
    if len(text) > limits.max_prompt_tokens * token_bytes:
        raise ApiError(413, f"{param} has {len(text):,} characters: more than the {limits.max_prompt_tokens:,} "
                            "tokens this server takes, whatever they encode to", code="context_length_exceeded")


def check_request(body, limits: Limits) -> None:
    """400 for stop strings or a max_tokens beyond the limits, naming the field the client sent."""
    for stop in body.stop or ():
        if len(stop) > limits.max_stop_chars:
            raise ApiError(400, f"stop: a stop string has {len(stop):,} characters; this server takes at most "
                                f"{limits.max_stop_chars:,}", param="stop")
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(body, name)
        if value is not None and value > limits.max_tokens:
            raise ApiError(400, f"{name}: {value:,} is more than this server generates for one request "
                                f"({limits.max_tokens:,})", param=name)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 (by its Content-Length, before any of it is read), a
    body not all in within `timeout_s` gets 408; the body read is handed on to the app whole."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(413, scope, receive, send)
        chunks, size, last = [], 0, None
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        last = message
                        break
                    size += len(message.get("body", b""))
                    if size > self.max_bytes:
                        return await self._refuse(413, scope, receive, send)
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await self._refuse(408, scope, receive, send)
        pending = [last or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, status: int, scope, receive, send):
        if status == 413:
            error = ApiError(413, f"the body is larger than this server takes ({self.max_bytes / 2**20:g} MB)")
        else:
            error = ApiError(408, f"the body did not arrive within {self.timeout_s:g} s")
        await error_response(error, headers={"Connection": "close"})(scope, receive, send)
