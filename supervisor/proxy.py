"""The request path: read the model name, get a ticket from the scheduler, pass bytes through untouched.

Response bodies are never parsed or re-encoded: chunks are written to the client as they arrive, so SSE streams
stay unbuffered. The upstream connection pool is shared. When the client goes away the handler is cancelled,
which closes the upstream request (llama-server then stops generating) and returns the ticket.
"""

from __future__ import annotations

import json

import aiohttp
import structlog
from aiohttp import web

from .config import Config
from .driver import Driver, Rejected, Ticket
from .fallback import CloudClient
from .process import HOST
from .responses import NOT_FORWARDED_UP, ApiError, error_response, stream_through

log = structlog.get_logger("supervisor.proxy")

TRUE_VALUES, FALSE_VALUES = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def flag_header(request: web.Request, name: str) -> bool:
    """A true/false request header; anything else is the client's mistake, answered with 400."""
    value = request.headers.get(name, "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ApiError(400, "invalid_header", f"header {name} must be true or false")


def rejection_response(rejected: Rejected) -> web.Response:
    return error_response(rejected.status, rejected.code, rejected.message, rejected.retry_after_s)


def unknown_model_error(config: Config, name: str) -> ApiError:
    known = ", ".join(sorted(config.models)) or "none"
    return ApiError(404, "model_not_found", f"model {name!r} does not exist (models: {known})")


class Proxy:
    def __init__(self, config: Config, driver: Driver, http: aiohttp.ClientSession, cloud: CloudClient):
        self.config = config
        self.driver = driver
        self.http = http
        self.cloud = cloud

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
        local_only, force = flag_header(request, "X-Local-Only"), flag_header(request, "X-Force-Big")
        model = self.config.resolve(name)
        if model is None:
            if name in self.config.cloud and not local_only:  # asked for the cloud target itself
                return await self.cloud.forward(request, body, name, None, reason="requested")
            return self.unknown_model(name)
        return await self._serve(request, model, request.path, body, local_only, force)

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        """ANY /upstream/{model}/{path}: raw pass-through to that model's llama-server (loading it)."""
        name = request.match_info["model"]
        model = self.config.resolve(name)
        if model is None:
            return self.unknown_model(name)
        body = await request.read()
        # Raw paths mean nothing to a cloud target: this route is local only.
        force = flag_header(request, "X-Force-Big")
        return await self._serve(request, model, "/" + request.match_info["path"], body, True, force)

    def unknown_model(self, name: str) -> web.Response:
        error = unknown_model_error(self.config, name)
        return error_response(error.status, error.code, error.message)

    async def _serve(self, request: web.Request, model: str, path: str, body: bytes, local_only: bool,
                     force: bool) -> web.StreamResponse:
        try:
            ticket = await self.driver.acquire(model, local_only=local_only, force=force)
        except Rejected as rejected:
            return rejection_response(rejected)
        if ticket.target is not None:
            return await self.cloud.forward(request, body, ticket.target, model, ticket.reason or "unavailable")
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
        return await stream_through(request, upstream, {"X-Served-By": "local"}, label=f"model {ticket.model!r}")
