"""HTTP pieces shared by the routes, the local proxy and the cloud client: OpenAI-style errors, reading a body,
and byte-for-byte streaming."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from ..errors import ApiError
from ..records import ResponseTail

log = structlog.get_logger("supervisor.proxy")

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those we set or must not forward.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
NOT_FORWARDED_UP = HOP_BY_HOP | {"authorization", "x-local-only", "x-force-big"}

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


__all__ = ["ApiError", "HOP_BY_HOP", "NOT_FORWARDED_UP", "error_response", "read_body", "stream_through"]


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole request body, or a 408 for a client too slow to send it (it holds a connection meanwhile)."""
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s") from None


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


async def stream_through(request: web.Request, upstream: aiohttp.ClientResponse, extra_headers: dict[str, str],
                         label: str, tail: ResponseTail | None = None) -> web.StreamResponse:
    """Copy an upstream response to the client as it arrives: status, headers (less hop-by-hop), body chunks.

    The body is never parsed. If the upstream breaks off mid-body, an SSE stream gets a final error event (the
    status line is long gone), so a client sees an error rather than a silent cut.
    """
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        response.headers.update(extra_headers)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                if tail is not None:
                    tail.add(chunk, time.monotonic())
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            log.warning("upstream_cut", upstream=label, error=str(exc))
            if "text/event-stream" in upstream.headers.get("Content-Type", ""):
                event = {"error": {"message": f"{label} stopped mid-answer: {exc}",
                                   "type": "server_error", "code": "upstream_failed"}}  # fmt: skip
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            return response
        await response.write_eof()
        return response
