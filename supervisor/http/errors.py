"""HTTP pieces shared by the routes, the local proxy and the cloud client: OpenAI-style errors, reading a body,
and byte-for-byte streaming."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, PayloadEncodingError

from ..errors import ApiError
from ..records import ResponseTail

log = structlog.get_logger("supervisor.proxy")

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those we set or must not forward.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
# content-encoding: aiohttp has already decoded the body we send on (gzip, deflate, br, zstd; read_body refuses any
# other coding), so the header would describe bytes that are not there (llama-server answers 415).
# expect: the whole body is read before anything is sent up, so a 100 Continue would be asked for nothing.
NOT_FORWARDED_UP = HOP_BY_HOP | {"authorization", "x-local-only", "x-force-big", "content-encoding", "x-health-check",
                                 "x-max-wait-ms", "expect"}
# Response headers kept from the client: llama-server reflects any Origin in its CORS headers, which would let any
# web page read answers from a daemon on loopback.
NOT_FORWARDED_DOWN = HOP_BY_HOP | {
    "access-control-allow-origin", "access-control-allow-credentials", "access-control-allow-methods",
    "access-control-allow-headers", "access-control-expose-headers", "access-control-max-age",
}  # fmt: skip

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


__all__ = ["ApiError", "ClientGone", "HOP_BY_HOP", "NOT_FORWARDED_DOWN", "NOT_FORWARDED_UP", "answer_response",
           "error_response", "parse_json", "read_body", "stream_through", "upstream_cut"]


DECODED_ENCODINGS = {"gzip", "deflate", "br", "zstd"}  # what aiohttp's request parser decompresses


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole request body, or a 408 for a client too slow to send it (it holds a connection meanwhile)."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in DECODED_ENCODINGS | {"", "identity"}:
        raise ApiError(415, "unsupported_content_encoding",
                       f"Content-Encoding {coding!r} is not supported (use gzip, deflate, br or zstd, or none)")
    try:
        if request.content.is_eof():  # all of it came with the head (most requests): nothing to wait for
            return await request.read()
        async with asyncio.timeout(timeout_s):  # not wait_for: that runs the read in a task of its own
            return await request.read()
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s") from None
    except web.RequestPayloadError as exc:  # the client's mistake, not a 500
        # Nothing more is read from this body (aiohttp's lingering read would raise it again and log a traceback);
        # the answer closes the connection (see the API's middleware).
        request.content.feed_eof()
        cause = exc.__cause__
        if isinstance(cause, PayloadEncodingError):  # bad gzip/deflate data
            raise ApiError(400, "invalid_content_encoding",
                           f"the request body is not valid {coding} data: {cause.message}") from None
        detail = cause.message if isinstance(cause, BadHttpMessage) else str(exc)  # a broken chunked body...
        raise ApiError(400, "invalid_body", f"the request body is malformed: {detail}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)  # one for all: json.loads builds one per call


def parse_json(body: bytes, empty: bytes = b"") -> Any:
    """A request body as JSON, else 400 invalid_json: strict JSON (no NaN or Infinity), not nested past Python's
    recursion limit (which would otherwise be a 500)."""
    data = body or empty
    try:
        return _STRICT_JSON.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


def error_response(error: ApiError) -> web.Response:
    """An OpenAI-style JSON error: the one place an ApiError becomes an answer."""
    status, code, message, retry_after_s, extra = (error.status, error.code, error.message, error.retry_after_s,
                                                    error.extra)
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "code": code}}
    if extra:
        body.update(extra)
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response(body, status=status, headers=headers)


class _HeadWithBody(web.StreamResponse):
    """A response whose head is held back until its first body bytes are written, and sent with them (aiohttp's
    own Response does the same; a StreamResponse sends its head on prepare)."""

    _send_headers_immediately = False


def answer_response(with_body: bool, status: int, reason: str | None, headers: Iterable[tuple[str, str]],
                    content_length: int | None, extra_headers: dict[str, str]) -> web.StreamResponse:
    """The client's response to a model's answer (both relays): its status and headers, less hop-by-hop ones and
    llama-server's CORS, plus ours. with_body: the head waits for the first body bytes and goes out with them."""
    response = (_HeadWithBody if with_body else web.StreamResponse)(status=status, reason=reason)
    for key, value in headers:
        if key.lower() not in NOT_FORWARDED_DOWN:
            response.headers.add(key, value)
    if content_length is not None:
        response.content_length = content_length
    response.headers.update(extra_headers)
    return response


class ClientGone(Exception):
    """The client went away while its answer was being written; the upstream is not to blame. Carries the
    response already started, which is all a handler can still return."""

    def __init__(self, response: web.StreamResponse, reason: str):
        super().__init__(reason)
        self.response = response


async def stream_through(request: web.Request, upstream: aiohttp.ClientResponse, extra_headers: dict[str, str],
                         label: str, tail: ResponseTail | None = None) -> web.StreamResponse:
    """Copy an upstream response to the client as it arrives: status, headers (less hop-by-hop), body chunks.

    The body is never parsed. If the upstream breaks off mid-body, an SSE stream gets a final error event (the
    status line is long gone), and any other body is cut off by closing the connection, so the client sees a short
    answer at once instead of waiting for the bytes its Content-Length promised. A client that goes away raises
    ClientGone (logged by the caller as the client's doing, not the model's).
    """
    async with upstream:
        content = upstream.content
        # The body bytes already here (all of a short answer, which mostly comes in one read with its head) go out
        # in the same write as the head: one send and one wake-up of the client instead of two. A head whose body
        # is not here yet (a stream before its first token) goes out at once, as before.
        try:
            chunk = content.read_nowait()
        except Exception:  # a broken body: the loop below meets the same error and handles it
            chunk = b""
        response = answer_response(bool(chunk), upstream.status, upstream.reason, upstream.headers.items(),
                                   upstream.content_length, extra_headers)
        try:
            await response.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise ClientGone(response, str(exc)) from None
        while True:
            if chunk:
                if tail is not None:
                    tail.add(chunk, time.monotonic())
                try:
                    await response.write(chunk)
                except (ConnectionError, aiohttp.ClientConnectionError) as exc:
                    raise ClientGone(response, str(exc)) from None
            try:
                chunk = await content.readany()  # whatever has arrived, as one chunk; b"" at the end
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                await upstream_cut(request, response, upstream.headers.get("Content-Type", ""), label, exc)
                return response
            if not chunk:
                break
        try:
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise ClientGone(response, str(exc)) from None
        return response


async def upstream_cut(request: web.Request, response: web.StreamResponse, content_type: str, label: str,
                       exc: BaseException) -> None:
    """The model's answer broke off after its head went to the client (both relays)."""
    log.warning("upstream_cut", upstream=label, error=str(exc))
    if "text/event-stream" in content_type and response.content_length is None:
        event = {"error": {"message": f"{label} stopped mid-answer: {exc}", "type": "server_error",
                           "code": "upstream_failed"}}  # fmt: skip
        try:
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await response.write_eof()
            return
        except (ConnectionError, aiohttp.ClientConnectionError):
            pass
    # A body with a declared length (or one we could not finish): the only honest end is closing the connection.
    if request.transport is not None:
        request.transport.close()
