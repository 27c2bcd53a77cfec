"""The request path: read the model name, get a ticket from the scheduler, pass bytes through untouched.

Response bodies are never parsed or re-encoded: chunks are written to the client as they arrive, so SSE streams
stay unbuffered. The upstream connection pool is shared. When the client goes away the handler is cancelled,
which closes the upstream request (llama-server then stops generating) and returns the ticket.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from .config import Config
from .driver import Driver, Rejected, Ticket
from .process import HOST

log = structlog.get_logger("supervisor.proxy")

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those we set or must not forward.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
NOT_FORWARDED_UP = HOP_BY_HOP | {"authorization", "x-local-only", "x-force-big"}

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class ApiError(Exception):
    """An error a handler answers with: status, machine-readable code, message for a person."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, retry_after_s: int | None = None,
                   extra: dict[str, Any] | None = None) -> web.Response:
    """An OpenAI-style JSON error."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "code": code}}
    if extra:
        body.update(extra)
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response(body, status=status, headers=headers)


def rejection_response(rejected: Rejected) -> web.Response:
    return error_response(rejected.status, rejected.code, rejected.message, rejected.retry_after_s)


def unknown_model_error(config: Config, name: str) -> ApiError:
    known = ", ".join(sorted(config.models)) or "none"
    return ApiError(404, "model_not_found", f"model {name!r} does not exist (models: {known})")


class Proxy:
    def __init__(self, config: Config, driver: Driver, http: aiohttp.ClientSession):
        self.config = config
        self.driver = driver
        self.http = http

    async def openai(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""
        body = await request.read()
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error_response(400, "invalid_json", f"request body is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            return error_response(400, "invalid_request", "request body must be a JSON object")
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            return error_response(400, "missing_model", "request body needs a string 'model' naming a model or alias")
        model = self.config.resolve(name)
        if model is None:
            return self.unknown_model(name)
        return await self._serve(request, model, request.path, body)

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        """ANY /upstream/{model}/{path}: raw pass-through to that model's llama-server (loading it)."""
        name = request.match_info["model"]
        model = self.config.resolve(name)
        if model is None:
            return self.unknown_model(name)
        body = await request.read()
        return await self._serve(request, model, "/" + request.match_info["path"], body)

    def unknown_model(self, name: str) -> web.Response:
        error = unknown_model_error(self.config, name)
        return error_response(error.status, error.code, error.message)

    async def _serve(self, request: web.Request, model: str, path: str, body: bytes) -> web.StreamResponse:
        try:
            ticket = await self.driver.acquire(model)
        except Rejected as rejected:
            return rejection_response(rejected)
        try:
            return await self._forward(request, ticket, path, body)
        finally:
            self.driver.release(ticket)

    async def _forward(self, request: web.Request, ticket: Ticket, path: str, body: bytes) -> web.StreamResponse:
        url = f"http://{HOST}:{ticket.port}{path}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED_UP}
        try:
            upstream = await self.http.request(
                request.method, url, params=request.query, data=body or None, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        except (aiohttp.ClientError, OSError) as exc:
            return error_response(502, "upstream_unreachable", f"model {ticket.model!r} did not answer: {exc}")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            response.headers["X-Served-By"] = "local"
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                # The child died mid-answer: the status is already sent, so say so in the stream itself.
                log.warning("upstream_cut", model=ticket.model, error=str(exc))
                if "text/event-stream" in upstream.headers.get("Content-Type", ""):
                    event = {"error": {"message": f"model {ticket.model!r} stopped mid-answer: {exc}",
                                       "type": "server_error", "code": "upstream_failed"}}
                    await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                return response
            await response.write_eof()
            return response
