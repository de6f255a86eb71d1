"""The app under uvicorn with the connection limits uvicorn lacks and a shutdown with an end.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) but waits forever for the head of a request
and takes any number of connections; its connection limit (`limit_concurrency`) answers in plain text. The
protocol here (uvicorn's own, with a `Config(http=...)` class) closes a connection whose request head is not in
within `header_timeout_s`, answers a connection beyond `max_connections` with OpenAI's 503 JSON, and a request
HTTP cannot parse with OpenAI's 400 JSON (uvicorn's is plain text). (The body's deadline and size are the
app's: `guards.BodyLimit`.)

Shutdown (`Server`): the first SIGTERM or SIGINT stops taking connections; running requests go on for
`shutdown_timeout_s`, then the engine ends them (a stream's last chunk has finish_reason "abort", then
`[DONE]`) and the process exits. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import json
import os

import uvicorn

from .limits import Limits
from .openai_api import ApiError

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornProtocol
except ImportError:  # httptools is optional in uvicorn: its pure-Python protocol then
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornProtocol


class _GuardedProtocol(_UvicornProtocol):
    limits: Limits  # set on the subclass `config` makes

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._not_reading = len(self.connections) > self.limits.max_connections
        if self._not_reading:
            self._turn_away()
        else:
            self._await_head()

    def data_received(self, data: bytes) -> None:
        if not self._not_reading:
            super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:  # (uvicorn's hook for a request its parser refuses)
        self._answer_and_close(ApiError(400, f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})"))

    def _turn_away(self) -> None:
        self._answer_and_close(ApiError(503, f"the server has {self.limits.max_connections:,} connections open, the "
                                             "most it takes; retry in a moment", code="too_many_connections"))

    def _answer_and_close(self, error: ApiError) -> None:
        body = json.dumps(error.body()).encode()
        reason = {400: b"Bad Request", 503: b"Service Unavailable"}[error.status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n%sconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (error.status, reason,
                             b"retry-after: 1\r\n" if error.status == 503 else b"", len(body), body))
        # the client reads the answer, then the end; closing at once could reset the connection under it
        self._not_reading = True  # anything more the client sends is dropped
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.limits.header_timeout_s, self.transport.close)


def config(app, host: str, port: int, limits: Limits, **kwargs) -> uvicorn.Config:
    """uvicorn's Config for `app` under `limits`."""
    protocol = type("GuardedProtocol", (_GuardedProtocol,), {"limits": limits})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=limits.keep_alive_s,
                          # a backstop: the engine ends every request at shutdown_timeout_s already
                          timeout_graceful_shutdown=limits.shutdown_timeout_s + 5, **kwargs)


class Server(uvicorn.Server):
    """uvicorn's Server whose shutdown ends `engine`'s requests after `shutdown_timeout_s`."""

    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine, self.shutdown_timeout_s = engine, shutdown_timeout_s

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            os.write(2, b"rwkv-lm: a second signal: exiting now\n")
            os._exit(128 + sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        async def end_requests():
            await asyncio.sleep(self.shutdown_timeout_s)
            await asyncio.to_thread(self.engine.stop)  # every request ends now: finish reason "abort"

        ending = asyncio.ensure_future(end_requests())
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()
