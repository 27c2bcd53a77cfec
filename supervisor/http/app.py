"""HTTP surface: routes, status documents, admin actions, and errors that are always OpenAI-style JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import structlog
from aiohttp import web
from yarl import URL

from ..config import Config, ConfigError, is_address
from ..ledger import Ledger
from ..metrics import Metrics
from ..runtime import Runtime
from .documents import StatusSnapshot, take_snapshot
from .errors import ApiError, error_response, parse_json, read_body
from .proxy import Proxy, unknown_model_error
from .site import HeadDeadlines

log = structlog.get_logger("supervisor.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DASHBOARD = Path(__file__).parent.parent / "static" / "dashboard.html"
EVENTS_KEEPALIVE_S = 15.0
EVENTS_COALESCE_S = 0.1  # a swap is several state changes in a few ms: one event for them
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
HOST_HEADER = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[^:\[\]/@\s]+))(?::(?P<port>\d{1,5}))?$")
DEFAULT_PORTS = {"http": 80, "https": 443}


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
            web.get("/v1/models/{id}", self.inference(self.get_model)),
            web.get("/health", self.health),
            web.get("/health/{model}", self.model_health),
            web.get("/status", self.status),
            web.get("/events", self.events),
            web.get("/", self.dashboard),
            web.get("/usage", self.usage),
            web.get("/metrics", self.prometheus),
            web.get("/running", self.running),
            web.get("/logs", self.admin(self.all_logs)),  # llama-swap's; a child's output can hold prompts
            web.get("/logs/stream", self.admin(self.stream_logs)),
            web.get("/logs/stream/{model}", self.admin(self.stream_logs)),
            web.get("/logs/{model}", self.admin(self.logs)),
            web.get("/unload", self.admin(self.unload_all)),  # llama-swap's spelling
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
            web.route("*", "/upstream/{model}", self.upstream_slash),
            # Anything else: a POST whose JSON body names a model goes to that model (/v1/responses, /v1/messages,
            # /v1/rerank, /infill, /tokenize, ...); the rest is 404.
            web.route("*", "/{path:.*}", self.inference(self.elsewhere)),
        ])  # fmt: skip
        return app

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def errors_as_json(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.heads.head_received(request.protocol)  # the head is in: the slow-head deadline is off
        try:
            if not self._host_allowed(request.headers.get("Host")):
                # DNS rebinding: a web page whose name now points at 127.0.0.1 would otherwise reach the API.
                message = (f"Host {request.headers.get('Host')!r} is not this daemon's address; list it in "
                           "[daemon] allowed_hosts to accept it")
                return error_response(ApiError(421, "host_not_allowed", message))
            declared = request.content_length
            if declared is not None and declared > request.client_max_size:
                # Refused from the head alone: no point waiting for (or reading) a body we will not take.
                response = error_response(ApiError(413, "body_too_large", self._too_large()))
                response.force_close()
                return response
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
            message = exc.text or exc.reason
            if exc.status == 413:
                message = self._too_large()
            elif exc.status == 404:
                message = f"no such endpoint: {request.method} {request.path}"
            return error_response(ApiError(exc.status, code, message))
        except ApiError as error:
            response = error_response(error)
            if error.status == 408 or request.content.exception() is not None:
                # The rest of a slow body is still coming, or the body is broken: this connection is done.
                response.force_close()
            return response
        except Exception:
            # Nothing a client sends may take the daemon down; the traceback goes to the log, not the client.
            log.exception("handler_failed", path=request.path, method=request.method)
            return error_response(ApiError(500, "internal_error", "internal error; see the daemon's log"))

    def _too_large(self) -> str:
        return f"request body is larger than max_body_mb ({self.config.daemon.max_body_mb:g} MB)"

    def _host_allowed(self, value: str | None) -> bool:
        """Whether a Host header names this daemon: a loopback name, the listen host, or [daemon] allowed_hosts."""
        if value is None:
            return True  # HTTP/1.0 without Host: no browser sends that (aiohttp refuses it on HTTP/1.1)
        daemon = self.config.daemon
        if "*" in daemon.allowed_hosts:
            return True
        parsed = split_host(value)
        if parsed is None:
            return False
        host = parsed[0]
        listen = normal_host(daemon.host)
        if host in LOOPBACK_NAMES or host == listen or host in {normal_host(h) for h in daemon.allowed_hosts}:
            return True
        # A wildcard bind answers on every address; an address (not a name) cannot be a rebound name.
        return listen in ("0.0.0.0", "::") and is_address(host)

    def _cross_origin(self, request: web.Request) -> str | None:
        """Why a request comes from another site's page (a browser says so in Sec-Fetch-Site and Origin), else
        None. Clients that are not browsers send neither. An Origin naming one of allowed_hosts is the operator's
        own (a reverse proxy in front)."""
        site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
        if site in ("cross-site", "same-site"):
            return f"Sec-Fetch-Site is {site}"
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        try:
            url = URL(origin.strip())
            port = url.explicit_port or DEFAULT_PORTS.get(url.scheme)
        except ValueError:
            return f"Origin {origin!r} is not a URL"
        listed = {normal_host(h) for h in self.config.daemon.allowed_hosts if h != "*"}
        if url.host is not None and normal_host(url.host) in listed:
            return None
        own = split_host(request.headers.get("Host", ""))
        if url.host is None or own is None or normal_host(url.host) != own[0] or (own[1] or port) != port:
            return f"Origin {origin!r} is not this daemon's"
        return None

    def admin(self, handler: Handler) -> Handler:
        """Admin endpoints need the admin token, when one is configured, a request from this daemon's own origin
        (no cross-site request forgery), and a JSON body if they get a body at all."""
        guarded = self._guard(self._json_only(handler), lambda: [self.admin_token] if self.admin_token else [],
                              "this endpoint needs Authorization: Bearer <admin token>")

        async def same_origin(request: web.Request) -> web.StreamResponse:
            why = self._cross_origin(request)
            if why is not None:
                message = f"admin endpoints only take requests from this daemon's own pages ({why})"
                return error_response(ApiError(403, "cross_origin", message))
            return await guarded(request)

        return same_origin

    @staticmethod
    def _json_only(handler: Handler) -> Handler:
        async def json_only(request: web.Request) -> web.StreamResponse:
            # A form or text/plain body is what a cross-site page can send without asking; an empty body (the
            # CLI's bodiless POSTs) says nothing, whatever its type.
            has_body = request.body_exists and request.content_length != 0
            if has_body and request.content_type != "application/json":
                message = f"this endpoint takes Content-Type: application/json, not {request.content_type!r}"
                return error_response(ApiError(415, "unsupported_media_type", message))
            return await handler(request)

        return json_only

    def inference(self, handler: Handler) -> Handler:
        """Inference endpoints need the API key (or the admin token), when an API key is configured."""
        return self._guard(handler, lambda: [k for k in (self.api_key, self.admin_token) if k] if self.api_key else [],
                           "this endpoint needs Authorization: Bearer <API key>")

    @staticmethod
    def _guard(handler: Handler, accepted: Callable[[], list[str]], message: str) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            keys = accepted()
            if keys and not authorized(request, keys):
                return error_response(ApiError(401, "unauthorized", message))
            return await handler(request)

        return guarded

    def _shows_ports(self, request: web.Request) -> bool:
        """With an API key, the children's pids and ports are for its holders only: a child's port takes
        requests without the key."""
        return not self.api_key or authorized(request, [k for k in (self.api_key, self.admin_token) if k])

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

    def _status_document(self, shows_ports: bool) -> dict[str, Any]:
        document = self._snapshot().document()
        if not shows_ports:
            for model in document["models"].values():
                model["pid"] = model["port"] = None
        return document

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status_document(self._shows_ports(request)))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the /status document now and after every change (bursts coalesced)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        shows_ports = self._shows_ports(request)
        await response.prepare(request)
        while not self.runtime.closing:  # a shutdown ends the stream (else the server would wait on it)
            document = json.dumps(self._status_document(shows_ports))
            await response.write(f"event: status\ndata: {document}\n\n".encode())
            with contextlib.suppress(TimeoutError):  # nothing changed for a while: send it again as a keep-alive
                await asyncio.wait_for(self.runtime.next_change(), EVENTS_KEEPALIVE_S)
            await asyncio.sleep(EVENTS_COALESCE_S)
        return response

    async def running(self, request: web.Request) -> web.Response:
        """llama-swap's /running: the models that hold a process."""
        shows = self._shows_ports(request)
        running = [
            {"model": v.name, "state": v.state, "pid": v.pid if shows else None, "port": v.port if shows else None,
             "ttl": v.ttl_s}
            for v in self._snapshot().models.values()
            if v.state in ("loading", "ready", "unloading")
        ]
        return web.json_response({"running": running})

    def _model_entries(self) -> list[dict[str, Any]]:
        data = []
        for view in self._snapshot().models.values():
            # llama-swap's word where it has one ("loaded"); /status keeps ours ("ready").
            value = "loaded" if view.state == "ready" else view.state
            entry = {"id": view.name, "object": "model", "created": self.started, "owned_by": "model-supervisor",
                     "aliases": view.aliases, "status": {"value": value, "state": view.state}}  # fmt: skip
            data.append(entry)
            for alias in view.aliases:
                data.append({**entry, "id": alias, "alias_of": view.name, "aliases": []})
        for name, target in self.config.cloud.items():
            data.append({"id": name, "object": "model", "created": self.started, "owned_by": "cloud",
                         "cloud_model": target.model, "status": {"value": "cloud"}})  # fmt: skip
        return data

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_entries()})

    async def get_model(self, request: web.Request) -> web.Response:
        wanted = request.match_info["id"]
        for entry in self._model_entries():
            if entry["id"] == wanted:
                return web.json_response(entry)
        raise unknown_model_error(self.config, wanted)

    async def upstream_slash(self, request: web.Request) -> web.Response:
        location = f"/upstream/{request.match_info['model']}/" + (f"?{request.query_string}" if request.query_string else "")
        raise web.HTTPFound(location)

    async def elsewhere(self, request: web.Request) -> web.StreamResponse:
        prefixed = self.proxy.prefixed(request.path)
        if prefixed is not None:  # a model's route_prefixes: passed through unchanged, WebSockets too
            return await self.proxy.pass_through(request, prefixed, prefixed, request.path)
        if request.method == "POST":
            return await self.proxy.openai(request)
        raise ApiError(404, "not_found", f"no such endpoint: {request.method} {request.path}")

    # ------------------------------------------------------------ gaming mode

    async def gaming_mode(self, request: web.Request) -> web.Response:
        return web.json_response({"enabled": self.runtime.gaming})

    async def set_gaming_mode(self, request: web.Request) -> web.Response:
        payload = parse_json(await read_body(request, self.config.daemon.body_timeout_s), empty=b"null")
        if not isinstance(payload, dict) or not isinstance(payload.get("enabled"), bool):
            raise ApiError(400, "invalid_request", 'body must be {"enabled": true} or {"enabled": false}')
        self.runtime.set_gaming(payload["enabled"], source="api")
        return web.json_response({"enabled": self.runtime.gaming})

    async def logs(self, request: web.Request) -> web.Response:
        model = self._model_or_404(request)
        return web.Response(text="\n".join(self.runtime.children.log_lines(model)) + "\n", content_type="text/plain")

    async def all_logs(self, request: web.Request) -> web.Response:
        """llama-swap's GET /logs: every model's recent output, one section each."""
        parts = [f"=== {name} ===\n" + "\n".join(self.runtime.children.log_lines(name)) for name in self.config.models]
        return web.Response(text="\n".join(parts) + "\n", content_type="text/plain")

    async def stream_logs(self, request: web.Request) -> web.StreamResponse:
        """llama-swap's GET /logs/stream[/{model}]: what the children print, live, as chunked text (each line
        prefixed with its model when all are followed); ?no-history skips what was printed before."""
        models = [self._model_or_404(request)] if "model" in request.match_info else list(self.config.models)
        rings = {name: self.runtime.children.log(name) for name in models}
        cursors = {name: (ring.total if "no-history" in request.query else 0) for name, ring in rings.items()}
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache",
                                               "X-Content-Type-Options": "nosniff"})
        await response.prepare(request)
        while not self.runtime.closing:
            for name, ring in rings.items():
                lines, cursors[name] = ring.since(cursors[name])
                if lines:
                    prefix = f"[{name}] " if len(rings) > 1 else ""
                    await response.write("".join(f"{prefix}{line}\n" for line in lines).encode())
            waits = [asyncio.ensure_future(ring.grown()) for ring in rings.values()]
            closing = asyncio.ensure_future(self.runtime.next_change())
            try:
                await asyncio.wait([*waits, closing], timeout=EVENTS_KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in [*waits, closing]:
                    waiter.cancel()
        return response

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


def normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header as (host, port): lower-case, IPv6 without brackets; None if it is not host[:port]."""
    match = HOST_HEADER.match(value.strip().lower())
    if match is None:
        return None
    return normal_host(match["v6"] or match["name"]), int(match["port"]) if match["port"] else None


def authorized(request: web.Request, keys: list[str]) -> bool:
    """Whether the request carries `Authorization: Bearer <one of keys>` (the scheme in any case, RFC 9110)."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    given = token.strip().encode()
    # Compare against every accepted key, in constant time each, so timing says nothing.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return scheme.lower() == "bearer" and any(matches)


LEASE_DEFAULTS = {"owner": "unnamed", "priority": 50, "pid": None, "ttl_s": 300.0, "wait_s": 30.0}
# What a client may ask for: finite, and within what a lease can mean.
LEASE_RANGES = {"vram_mb": (1, 2**31), "ttl_s": (1, 7 * 86400), "wait_s": (0, 3600), "priority": (-(2**31), 2**31)}
PID_MAX_FILE = Path("/proc/sys/kernel/pid_max")


def pid_max() -> int:
    try:
        return int(PID_MAX_FILE.read_text())
    except (OSError, ValueError):
        return 2**22  # Linux's ceiling for pid_max


def lease_fields(body: bytes) -> dict[str, Any]:
    """Validate a POST /leases body into request_lease's arguments; bad input is a 400 naming the field."""
    payload = parse_json(body, empty=b"{}")
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    unknown = set(payload) - {"vram_mb", *LEASE_DEFAULTS}
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    fields = {**LEASE_DEFAULTS, **payload}

    def number(name: str, whole: bool = False) -> None:
        value = fields[name]
        low, high = LEASE_RANGES[name]
        kind = int if whole else (int, float)
        # A range check also refuses inf (1e400 parses as inf) and NaN (no comparison holds).
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            what = "a whole number" if whole else "a number"
            raise ApiError(400, "invalid_request", f"'{name}' must be {what} from {low} to {high}")

    if "vram_mb" not in payload:
        raise ApiError(400, "invalid_request", "'vram_mb' is required: the memory to hold, in MB")
    number("vram_mb", whole=True)
    number("ttl_s")
    number("wait_s")
    number("priority", whole=True)
    if not isinstance(fields["owner"], str) or not 0 < len(fields["owner"]) <= 100:
        raise ApiError(400, "invalid_request", "'owner' must be a non-empty string of at most 100 characters")
    pid = fields["pid"]
    if pid is not None:
        highest = pid_max()
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= highest:
            raise ApiError(400, "invalid_request", f"'pid' must be a whole number from 1 to {highest} (pid_max)")
        if not psutil.pid_exists(pid):
            raise ApiError(400, "invalid_request", f"'pid' {pid} is not a running process")
    return {"owner": fields["owner"], "mb": fields["vram_mb"], "priority": fields["priority"], "pid": pid,
            "ttl_s": float(fields["ttl_s"]), "wait_s": float(fields["wait_s"])}

