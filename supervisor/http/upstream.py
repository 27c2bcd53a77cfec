"""The request path's own HTTP/1.1 client: a POST to a model's server, its answer relayed to the client as it comes.

aiohttp's client cost the relay ~0.12 ms per request (building the request and the response objects) and, for a
stream, a task wake-up and two layers of Python per chunk. Here the request goes out in one send on a pooled
connection; the answer is parsed by llhttp (httptools); once its head has gone to the client, each body chunk is
written to the client's socket from the upstream connection's own data callback, with no task in between (a
token of a stream is one read and one write). When the client reads slower than the model writes, reading from
the model pauses until the client's socket drains.

Only POSTs to a plain http:// server take this path (every inference request); the rest (GET and HEAD pass-through,
WebSockets, an https `proxy` of a `cmd` model, the cloud) keeps using aiohttp's client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import httptools
import yarl
from aiohttp import web

from ..records import ResponseTail
from .errors import ClientGone, answer_response, upstream_cut

CONNECT_TIMEOUT_S = 10.0
# llama-server closes a connection idle for 5 s; one idle this long is not used again (it might be closing).
IDLE_S = 4.0
# Client send buffer above which reading from the model pauses until it drains: the transports' own high-water
# mark (asyncio's and uvloop's default), past which aiohttp's drain() waits.
HIGH_WATER = 64 * 1024


class UpstreamUnreachable(Exception):
    """No response byte came back from the model's server (refused, reset or closed first)."""


class UpstreamCut(Exception):
    """The answer broke off after its head."""


class Answer(asyncio.Protocol):
    """One connection to a model's server, and the answer being read on it."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.idle_since = 0.0
        self.active = False  # a request is out on it (else it is idle in the pool)
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.status, self.reason = 0, ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.buffered: list[bytes] = []  # body bytes that came before a sink was set
        self.sink: Any = None  # callable(bytes) once the relay writes straight to its client
        self.got_bytes = False
        self.keep_alive = False
        self.unasked = False  # bytes came after the answer was complete
        self.interim = False  # reading a 1xx (100 Continue): not the answer
        self.paused = False
        self._wake: asyncio.Future[None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes on an idle pooled connection answer nothing we asked: it is broken
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(UpstreamCut(f"malformed answer: {exc}") if self.head.done()
                      else UpstreamUnreachable(f"malformed answer: {exc}"))  # fmt: skip
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        if not self.finished.done():
            if self.head.done() and exc is None and self._ends_at_close():
                self.keep_alive = False
                self._end(None)  # an answer with neither a length nor chunks ends where the connection does
            elif self.head.done():
                why = str(exc) if exc else "the server closed the connection mid-answer"
                self._end(UpstreamCut(why))
            else:
                self._end(UpstreamUnreachable(str(exc) if exc else "the server closed the connection"))
        self.transport = None

    def _ends_at_close(self) -> bool:
        chunked = b"chunked" in (self.header(b"transfer-encoding") or b"").lower()
        return self.header(b"content-length") is None and not chunked and self.status not in (204, 304)

    # -- httptools callbacks

    def on_status(self, reason: bytes) -> None:
        if not self.unasked:
            self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.unasked:
            self.headers.append((name, value))

    def on_message_begin(self) -> None:
        if self.finished.done():  # a second answer to one request: never pass it on, never reuse the connection
            self.keep_alive = False
            self.unasked = True

    def on_headers_complete(self) -> None:
        if self.unasked:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows on the same connection.
            self.interim, self.reason, self.headers = True, "", []
            return
        self.status = status
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.unasked or self.interim:
            return
        if self.sink is not None:
            self.sink(body)
        else:
            self.buffered.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.unasked:
            return
        self.keep_alive = self.parser.should_keep_alive()
        self._end(None)

    # -- the relay's side

    def _end(self, error: Exception | None) -> None:
        for future in (self.head, self.finished):
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
                    future.exception()  # retrieved: the relay may have stopped waiting for it
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait(self) -> None:
        """Until the answer is complete (or cut) or reading has been paused for the client to catch up."""
        if self.finished.done() or self.paused:
            return
        self._wake = self.loop.create_future()
        await self._wake

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
            self._wakeup()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def reusable(self) -> bool:
        # Not after a stream: llama-server may close such a connection although it says keep-alive, and a request
        # sent on it in that instant would fail (or be sent twice).
        streamed = b"text/event-stream" in (self.header(b"content-type") or b"")
        return (self.finished.done() and self.finished.exception() is None and self.keep_alive and not streamed
                and not self.unasked and self.transport is not None and not self.transport.is_closing()
                and not self.transport.get_write_buffer_size())  # an early answer left request bytes unsent  # fmt: skip

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Kept-alive connections to the models' servers, per address."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[Answer]] = {}
        self._addresses: dict[str, tuple[tuple[str, int], str]] = {}

    async def post(self, base_url: str, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> Answer:
        """Send a POST; the answer once its head is in. Raises UpstreamUnreachable when nothing came back. A pooled
        connection the server closed before answering is tried once more on a fresh one (as aiohttp does)."""
        key, prefix = self._address(base_url)
        host = f"[{key[0]}]" if ":" in key[0] else key[0]
        lines = [f"POST {prefix}{target} HTTP/1.1\r\nHost: {host}:{key[1]}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        message = "".join(lines).encode("utf-8", "surrogateescape") + body
        for attempt in (1, 2):
            answer = self._take(key) if attempt == 1 else None  # the retry: a fresh connection
            reused = answer is not None
            if answer is None:
                answer = await self._connect(key)
            assert answer.transport is not None
            answer.active = True
            answer.transport.write(message)
            try:
                await answer.head
            except UpstreamUnreachable:
                if reused and attempt == 1 and not answer.got_bytes:
                    continue
                raise
            except BaseException:  # cancelled (the client left): this connection is mid-request, not reusable
                answer.close()
                raise
            return answer
        raise AssertionError("unreachable")

    def _address(self, base_url: str) -> tuple[tuple[str, int], str]:
        """(host, port) and path prefix of a child's base URL (parsed once: a child keeps its URL)."""
        known = self._addresses.get(base_url)
        if known is None:
            url = yarl.URL(base_url)
            known = self._addresses[base_url] = ((url.host or "127.0.0.1", url.port or 80), url.raw_path.rstrip("/"))
            if len(self._addresses) > 1024:  # ports are reused; old ones need not stay
                self._addresses.pop(next(iter(self._addresses)))
        return known

    def release(self, answer: Answer) -> None:
        """Done with the answer: its connection goes back to the pool if it can carry another request."""
        if answer.reusable:
            answer.resume()
            answer.active = False
            answer._reset()
            answer.idle_since = time.monotonic()
            self._idle.setdefault(answer.key, []).append(answer)
        else:
            answer.close()

    def forget(self, answer: Answer) -> None:
        idle = self._idle.get(answer.key)
        if idle and answer in idle:
            idle.remove(answer)

    def _take(self, key: tuple[str, int]) -> Answer | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            answer = idle.pop()  # the most recently used: the least likely to be closing
            if answer.transport is not None and not answer.transport.is_closing() and now - answer.idle_since < IDLE_S:
                return answer
            answer.close()
        return None

    async def _connect(self, key: tuple[str, int]) -> Answer:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, answer = await loop.create_connection(lambda: Answer(self, key), *key)
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachable(str(exc) or type(exc).__name__) from None
        return answer

    def close(self) -> None:
        for idle in self._idle.values():
            for answer in idle:
                answer.close()
        self._idle.clear()


async def relay(request: web.Request, answer: Answer, extra_headers: dict[str, str], label: str,
                tail: ResponseTail | None = None) -> web.StreamResponse:
    """Pass the answer to the client as it arrives: status, headers (less hop-by-hop), body chunks, never parsed.

    The same contract as errors.stream_through: an SSE stream the model breaks off gets a final error event, any
    other body is cut off by closing the connection; a client that goes away raises ClientGone."""
    length = answer.header(b"content-length")
    complete = answer.finished.done() and answer.finished.exception() is None
    first = b"".join(answer.buffered)
    answer.buffered = []
    # A whole short answer (the usual case: it came in the same read as its head) goes out in one write.
    # UTF-8 as sent; invalid bytes cannot crash the head's encoding.
    headers = ((name.decode("latin-1"), value.decode("utf-8", "replace")) for name, value in answer.headers)
    response = answer_response(bool(first) or complete, answer.status, answer.reason or None, headers,
                               len(first) if complete else None if length is None else int(length), extra_headers)
    if tail is not None and first:
        tail.add(first, time.monotonic())
    try:
        await response.prepare(request)
        if complete:
            await response.write_eof(first)
            return response
        if first:
            await response.write(first)
    except (ConnectionError, OSError) as exc:
        raise ClientGone(response, str(exc) or "the client went away") from None

    writer, transport = request.writer, request.transport
    chunked = bool(getattr(writer, "chunked", False))
    gone: list[str] = []

    def sink(data: bytes) -> None:
        if tail is not None:
            tail.add(data, time.monotonic())
        if transport is None or transport.is_closing():
            if not gone:
                gone.append("the client went away")
                answer.close()  # the model stops generating for nobody
            return
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        if transport.get_write_buffer_size() > HIGH_WATER:
            answer.pause()

    answer.sink = sink
    late, answer.buffered = answer.buffered, []  # what came while the head went out
    for data in late:
        sink(data)
    try:
        while True:
            await answer.wait()
            if gone:
                raise ClientGone(response, gone[0])
            if answer.paused:
                try:
                    await writer.drain()
                except (ConnectionError, OSError) as exc:
                    answer.close()
                    raise ClientGone(response, str(exc) or "the client went away") from None
                answer.resume()
                continue
            break
        error = answer.finished.exception()
        if error is not None:
            await upstream_cut(request, response, (answer.header(b"content-type") or b"").decode("latin-1"), label,
                               error)
            return response
        try:
            await response.write_eof()
        except (ConnectionError, OSError) as exc:
            raise ClientGone(response, str(exc) or "the client went away") from None
        return response
    finally:
        answer.sink = None
        if not answer.finished.done():
            answer.close()  # cancelled (the client left) or gone: the connection is mid-answer
