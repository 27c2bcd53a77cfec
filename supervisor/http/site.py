"""The listening site: a TCP site whose new connections must send a complete request head in time.

aiohttp has no such timeout: a client trickling header bytes (slowloris) would hold a connection forever. Each
new connection gets a deadline, keyed by its protocol object (never by id(), which a later connection may
reuse); the API's middleware calls it off when a head arrives. A connection still without a head at its deadline
gets a 408 and is closed. (A slow head on a later keep-alive request is bounded by keepalive_timeout_s.)

Requests aiohttp cannot parse (a bad request line or header) never reach the application's middleware; their
connections get a `JsonErrorHandler`, so those answers are OpenAI-style JSON too.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from ..errors import ApiError
from .errors import error_response

_HEAD_TIMEOUT_BODY = json.dumps({"error": {"message": "the request head did not arrive in time",
                                           "type": "invalid_request_error", "code": "header_timeout"}}).encode()
REQUEST_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_HEAD_TIMEOUT_BODY), _HEAD_TIMEOUT_BODY)
)


class HeadDeadlines:
    """Pending head deadlines, one per connection that has not sent its first head yet."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._pending: dict[asyncio.BaseProtocol, asyncio.TimerHandle] = {}

    def connected(self, handler: asyncio.BaseProtocol) -> None:
        loop = asyncio.get_running_loop()
        self._pending[handler] = loop.call_later(self.timeout_s, self._expired, handler)

    def head_received(self, handler: object) -> None:
        timer = self._pending.pop(handler, None)  # type: ignore[call-overload]
        if timer is not None:
            timer.cancel()

    def pending(self) -> int:
        return len(self._pending)

    def _expired(self, handler: asyncio.BaseProtocol) -> None:
        if self._pending.pop(handler, None) is None:
            return
        transport = getattr(handler, "transport", None)
        if transport is not None and not transport.is_closing():
            transport.write(REQUEST_TIMEOUT_408)
            transport.close()

    def close(self) -> None:
        for timer in self._pending.values():
            timer.cancel()
        self._pending.clear()


class JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses as JSON instead of text/plain."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises if a response is already going out
        if status >= 500:
            error = ApiError(status, "internal_error", "internal error; see the daemon's log")
        else:
            reason = message or "bad request"
            error = ApiError(status, "bad_http_request", f"the request could not be parsed: {reason}")
        response = error_response(error)
        response.force_close()
        return response


def new_handler(server: web.Server) -> web.RequestHandler:
    """What `server()` returns, as a JsonErrorHandler. It needs the server's handler settings, which aiohttp keeps
    in private attributes: if they are not there, the plain handler (text/plain parse errors) is no worse."""
    kwargs, loop = getattr(server, "_kwargs", None), getattr(server, "_loop", None)
    if isinstance(kwargs, dict) and loop is not None:
        try:
            return JsonErrorHandler(server, loop=loop, **kwargs)
        except TypeError:
            pass
    return server()


class HeadDeadlineSite(web.BaseSite):
    def __init__(self, runner: web.BaseRunner, host: str, port: int, deadlines: HeadDeadlines):
        super().__init__(runner)
        self._host, self._port, self._deadlines = host, port, deadlines

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        factory = self._runner.server
        assert factory is not None

        def connection() -> asyncio.Protocol:
            handler = new_handler(factory)
            self._deadlines.connected(handler)
            return handler

        self._server = await loop.create_server(connection, self._host, self._port, reuse_address=True)
