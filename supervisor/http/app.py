"""HTTP surface: routes, status documents, admin actions, and errors that are always OpenAI-style JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import structlog
from aiohttp import web

from ..config import Config, ConfigError
from ..ledger import Ledger
from ..metrics import Metrics
from ..runtime import Runtime
from .documents import StatusSnapshot, take_snapshot
from .errors import ApiError, error_response, read_body
from .proxy import Proxy, unknown_model_error
from .site import HeadDeadlines

log = structlog.get_logger("supervisor.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DASHBOARD = Path(__file__).parent.parent / "static" / "dashboard.html"
EVENTS_KEEPALIVE_S = 15.0
EVENTS_COALESCE_S = 0.1  # a swap is several state changes in a few ms: one event for them


class Api:
    def __init__(self, runtime: Runtime, proxy: Proxy, metrics: Metrics, ledger: Ledger | None,
                 heads: HeadDeadlines):
        self.runtime = runtime
        self.proxy = proxy
        self.metrics = metrics
        self.ledger = ledger  # None when state_dir is unusable
        self.heads = heads  # the slow-head deadline of each new connection, called off once its head is in
        self.started = int(time.time())
        daemon = runtime.config.daemon  # the token variables need a restart to change (see reload)
        self.admin_token = os.environ.get(daemon.admin_token_env, "") if daemon.admin_token_env else ""
        self.api_key = os.environ.get(daemon.api_key_env, "") if daemon.api_key_env else ""

    @property
    def config(self) -> Config:
        return self.runtime.config  # the live config: a reload replaces it

    def app(self) -> web.Application:
        limit = int(self.config.daemon.max_body_mb * 1024 * 1024)
        app = web.Application(client_max_size=limit, middlewares=[self.errors_as_json])
        p = self.proxy
        app.add_routes([
            web.post("/v1/chat/completions", self.inference(p.openai)),
            web.post("/v1/completions", self.inference(p.openai)),
            web.post("/v1/embeddings", self.inference(p.openai)),
            web.get("/v1/models", self.inference(self.list_models)),
            web.get("/health", self.health),
            web.get("/health/{model}", self.model_health),
            web.get("/status", self.status),
            web.get("/events", self.events),
            web.get("/", self.dashboard),
            web.get("/usage", self.usage),
            web.get("/metrics", self.prometheus),
            web.get("/running", self.running),
            web.get("/logs/{model}", self.logs),
            web.post("/models/{model}/load", self.admin(self.load)),
            web.post("/models/{model}/unload", self.admin(self.unload)),
            web.post("/unload", self.admin(self.unload_all)),
            web.post("/stop-all", self.admin(self.stop_all)),
            web.post("/reload", self.admin(self.reload)),
            web.get("/gaming-mode", self.gaming_mode),
            web.post("/gaming-mode", self.admin(self.set_gaming_mode)),
            web.get("/leases", self.list_leases),
            web.post("/leases", self.admin(self.create_lease)),
            web.post("/leases/{id}/renew", self.admin(self.renew_lease)),
            web.delete("/leases/{id}", self.admin(self.delete_lease)),
            web.route("*", "/upstream/{model}/{path:.*}", self.inference(p.upstream)),
        ])  # fmt: skip
        return app

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def errors_as_json(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.heads.head_received(request.protocol)  # the head is in: the slow-head deadline is off
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
            message = exc.text or exc.reason
            if exc.status == 413:
                message = f"request body is larger than max_body_mb ({self.config.daemon.max_body_mb:g} MB)"
            elif exc.status == 404:
                message = f"no such endpoint: {request.method} {request.path}"
            return error_response(ApiError(exc.status, code, message))
        except ApiError as error:
            response = error_response(error)
            if error.status == 408:
                response.force_close()  # the rest of a slow body is still coming: this connection is done
            return response
        except Exception:
            # Nothing a client sends may take the daemon down; the traceback goes to the log, not the client.
            log.exception("handler_failed", path=request.path, method=request.method)
            return error_response(ApiError(500, "internal_error", "internal error; see the daemon's log"))

    def admin(self, handler: Handler) -> Handler:
        """Admin endpoints need the admin token, when one is configured."""
        return self._guard(handler, lambda: [self.admin_token] if self.admin_token else [],
                           "this endpoint needs Authorization: Bearer <admin token>")

    def inference(self, handler: Handler) -> Handler:
        """Inference endpoints need the API key (or the admin token), when an API key is configured."""
        return self._guard(handler, lambda: [k for k in (self.api_key, self.admin_token) if k] if self.api_key else [],
                           "this endpoint needs Authorization: Bearer <API key>")

    @staticmethod
    def _guard(handler: Handler, accepted: Callable[[], list[str]], message: str) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            keys = accepted()
            if keys:
                given = request.headers.get("Authorization", "").encode()
                # Compare against every accepted key, in constant time each, so timing says nothing.
                matches = [hmac.compare_digest(given, f"Bearer {key}".encode()) for key in keys]
                if not any(matches):
                    return error_response(ApiError(401, "unauthorized", message))
            return await handler(request)

        return guarded

    # ------------------------------------------------------------ status

    def _model_or_404(self, request: web.Request) -> str:
        name = request.match_info["model"]
        model = self.config.resolve(name)
        if model is None:
            raise unknown_model_error(self.config, name)
        return model

    def _snapshot(self) -> StatusSnapshot:
        return take_snapshot(self.runtime)

    async def prometheus(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = self.metrics.content_type
        return response

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=DASHBOARD.read_bytes(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def usage(self, request: web.Request) -> web.Response:
        """Requests, tokens, local share and money over the last `days` days (the ledger's figures)."""
        try:
            days = float(request.query.get("days", "7"))
        except ValueError:
            raise ApiError(400, "invalid_request", "'days' must be a number") from None
        if not 0 < days <= 3660:
            raise ApiError(400, "invalid_request", "'days' must be between 0 and 3660")
        if self.ledger is None:
            raise ApiError(503, "ledger_unavailable", "the usage ledger is not available (state_dir not writable)")
        document = await asyncio.to_thread(self.ledger.usage, days)
        document["local_share_target"] = self.config.ledger.local_share_target
        return web.json_response(document)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def model_health(self, request: web.Request) -> web.Response:
        model = self._model_or_404(request)
        view = self._snapshot().models[model]
        body = {"model": model, "state": view.state, "eta_ms": view.eta_ms, "route": view.route}
        if view.available_now:
            return web.json_response({"status": "ok", **body})
        message = f"model {model!r} cannot be served locally now (it is {view.state})"
        return error_response(ApiError(503, "model_not_ready", message, extra=body))

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._snapshot().document())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the /status document now and after every change (bursts coalesced)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        while not self.runtime.closing:  # a shutdown ends the stream (else the server would wait on it)
            document = json.dumps(self._snapshot().document())
            await response.write(f"event: status\ndata: {document}\n\n".encode())
            with contextlib.suppress(TimeoutError):  # nothing changed for a while: send it again as a keep-alive
                await asyncio.wait_for(self.runtime.next_change(), EVENTS_KEEPALIVE_S)
            await asyncio.sleep(EVENTS_COALESCE_S)
        return response

    async def running(self, request: web.Request) -> web.Response:
        """llama-swap's /running: the models that hold a process."""
        running = [
            {"model": v.name, "state": v.state, "pid": v.pid, "port": v.port, "ttl": v.ttl_s}
            for v in self._snapshot().models.values()
            if v.state in ("loading", "ready", "unloading")
        ]
        return web.json_response({"running": running})

    async def list_models(self, request: web.Request) -> web.Response:
        data = []
        for view in self._snapshot().models.values():
            entry = {"id": view.name, "object": "model", "created": self.started, "owned_by": "model-supervisor",
                     "aliases": view.aliases, "status": {"value": view.state}}  # fmt: skip
            data.append(entry)
            for alias in view.aliases:
                data.append({**entry, "id": alias, "alias_of": view.name, "aliases": []})
        for name, target in self.config.cloud.items():
            data.append({"id": name, "object": "model", "created": self.started, "owned_by": "cloud",
                         "cloud_model": target.model, "status": {"value": "cloud"}})  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    # ------------------------------------------------------------ gaming mode

    async def gaming_mode(self, request: web.Request) -> web.Response:
        return web.json_response({"enabled": self.runtime.gaming})

    async def set_gaming_mode(self, request: web.Request) -> web.Response:
        try:
            payload = json.loads(await read_body(request, self.config.daemon.body_timeout_s) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("enabled"), bool):
            raise ApiError(400, "invalid_request", 'body must be {"enabled": true} or {"enabled": false}')
        self.runtime.set_gaming(payload["enabled"], source="api")
        return web.json_response({"enabled": self.runtime.gaming})

    async def logs(self, request: web.Request) -> web.Response:
        model = self._model_or_404(request)
        return web.Response(text="\n".join(self.runtime.children.log_lines(model)) + "\n", content_type="text/plain")

    # ------------------------------------------------------------ admin

    async def load(self, request: web.Request) -> web.Response:
        model = self._model_or_404(request)
        await self.runtime.load(model)
        view = self._snapshot().models[model]
        return web.json_response({"model": model, "state": view.state, "load_ms": view.last_load_ms})

    async def unload(self, request: web.Request) -> web.Response:
        model = self._model_or_404(request)
        await self.runtime.unload(model)
        return web.json_response({"model": model, "state": self._snapshot().models[model].state})

    async def unload_all(self, request: web.Request) -> web.Response:
        await self.runtime.unload(None)
        return web.json_response({"unloaded": sorted(self.config.models)})

    async def reload(self, request: web.Request) -> web.Response:
        try:
            summary = await self.runtime.reload()
        except ConfigError as exc:
            # The old config stays in force; say why the new one was refused, key by key.
            log.error("config_reload_refused", path=self.runtime.live.path, problems=exc.problems)
            raise ApiError(400, "invalid_config", str(exc), extra={"problems": exc.problems}) from None
        return web.json_response(summary)

    async def stop_all(self, request: web.Request) -> web.Response:
        await self.runtime.stop_all("stop-all was requested by an administrator")
        return web.json_response({"unloaded": sorted(self.config.models)})

    # ------------------------------------------------------------ leases

    async def list_leases(self, request: web.Request) -> web.Response:
        return web.json_response({"leases": self._snapshot().leases})

    async def create_lease(self, request: web.Request) -> web.Response:
        fields = lease_fields(await read_body(request, self.config.daemon.body_timeout_s))
        grant = await self.runtime.request_lease(**fields)
        return web.json_response({"id": grant.lease_id, "vram_mb": grant.mb, "expires_at": grant.expires_at},
                                 status=201)

    def _lease_id(self, request: web.Request) -> int:
        try:
            return int(request.match_info["id"])
        except ValueError:
            raise ApiError(404, "lease_not_found", f"no lease {request.match_info['id']!r}") from None

    async def renew_lease(self, request: web.Request) -> web.Response:
        lease_id = self._lease_id(request)
        expires_at = self.runtime.renew_lease(lease_id)
        if expires_at is None:
            raise ApiError(404, "lease_not_found", f"no lease {lease_id} (released or expired)")
        return web.json_response({"id": lease_id, "expires_at": expires_at})

    async def delete_lease(self, request: web.Request) -> web.Response:
        lease_id = self._lease_id(request)
        if not self.runtime.release_lease(lease_id):
            raise ApiError(404, "lease_not_found", f"no lease {lease_id} (released or expired)")
        return web.json_response({"id": lease_id, "released": True})


LEASE_DEFAULTS = {"owner": "unnamed", "priority": 50, "pid": None, "ttl_s": 300.0, "wait_s": 30.0}


def lease_fields(body: bytes) -> dict[str, Any]:
    """Validate a POST /leases body into request_lease's arguments; bad input is a 400 naming the field."""
    try:
        payload = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    unknown = set(payload) - {"vram_mb", *LEASE_DEFAULTS}
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    fields = {**LEASE_DEFAULTS, **payload}

    def number(name: str, minimum: float, whole: bool = False) -> None:
        value = fields[name]
        kind = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
            what = "a whole number" if whole else "a number"
            raise ApiError(400, "invalid_request", f"'{name}' must be {what} >= {minimum:g}")

    if "vram_mb" not in payload:
        raise ApiError(400, "invalid_request", "'vram_mb' is required: the memory to hold, in MB")
    number("vram_mb", 1, whole=True)
    number("ttl_s", 1)
    number("wait_s", 0)
    if isinstance(fields["priority"], bool) or not isinstance(fields["priority"], int):
        raise ApiError(400, "invalid_request", "'priority' must be a whole number")
    if not isinstance(fields["owner"], str) or not 0 < len(fields["owner"]) <= 100:
        raise ApiError(400, "invalid_request", "'owner' must be a non-empty string of at most 100 characters")
    pid = fields["pid"]
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ApiError(400, "invalid_request", "'pid' must be a positive whole number")
        if not psutil.pid_exists(pid):
            raise ApiError(400, "invalid_request", f"'pid' {pid} is not a running process")
    return {"owner": fields["owner"], "mb": fields["vram_mb"], "priority": fields["priority"], "pid": pid,
            "ttl_s": float(fields["ttl_s"]), "wait_s": float(fields["wait_s"])}

