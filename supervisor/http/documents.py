"""The status documents, built once per look from one snapshot of the runtime.

/status, /events (and so the dashboard), /health/{model}, /running, /v1/models, the Prometheus gauges and the CLI
(through /status) all read a `StatusSnapshot`, so they can never disagree about what they show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..scheduler import ModelView, model_views

if TYPE_CHECKING:
    from ..config import Config
    from ..runtime import Runtime


@dataclass(frozen=True)
class StatusSnapshot:
    config: Config
    gaming: bool
    models: dict[str, ModelView]
    need_source: dict[str, str]
    memory: list[dict[str, Any]]  # one document per device (one today: [gpu] device)
    leases: list[dict[str, Any]]
    leases_queued: int
    prompt_cache: dict[str, dict[str, Any] | None]  # model -> saved tokens, bytes, slots, age_s (None: nothing)
    latency: dict[str, dict[str, Any]]  # model -> recent p50 time to first byte, tokens per second
    timeline: list[dict[str, Any]]  # the last loads, unloads and failures, newest last

    def document(self) -> dict[str, Any]:
        """GET /status."""
        return {
            "gaming_mode": self.gaming,
            "memory": self.memory,
            "models": {name: self.model_document(view) for name, view in self.models.items()},
            "leases": self.leases,
            "timeline": self.timeline,
        }

    def model_document(self, view: ModelView) -> dict[str, Any]:
        model = self.config.models.get(view.name)
        return {
            "state": view.state,
            "group": view.group,
            "aliases": view.aliases,
            "pid": view.pid,
            "port": view.port,
            "vram_mb": view.need_mb,
            "vram_source": self.need_source.get(view.name, "unknown"),
            "in_flight": view.in_flight,
            "queued": view.queued,
            "ttl_s": view.ttl_s,
            "ttl_remaining_s": view.ttl_remaining_s,
            "last_load_ms": view.last_load_ms,
            "available_now": view.available_now,
            "eta_ms": view.eta_ms,
            "route": view.route,
            "fallback": model.fallback if model is not None else None,
            "allow_in_gaming": model.allow_in_gaming if model is not None else False,
            "last_error": view.last_error,
            "prompt_cache": self.prompt_cache.get(view.name),
            "last_stop": view.last_stop,
            "load_progress": view.load_progress,
            "load_progress_basis": view.load_progress_basis,
            "waiting_for": view.waiting_for,
            "loadable": view.loadable,
            "unavailable_reason": view.unavailable_reason,
            "latency": self.latency.get(view.name),
        }


def take_snapshot(runtime: Runtime) -> StatusSnapshot:
    core, now = runtime.core, runtime.now()
    return StatusSnapshot(
        config=runtime.config,
        gaming=core.gaming,
        models={view.name: view for view in model_views(core, now)},
        need_source=dict(runtime.memory.need_source),
        memory=_memory_documents(runtime),
        leases=[
            {"id": lease.lease_id, "owner": lease.owner, "vram_mb": lease.mb, "priority": lease.priority,
             "pid": lease.pid, "expires_in_s": round(lease.expires_at - now, 3), "ttl_s": lease.ttl_s}
            for lease in core.leases.values()
        ],  # fmt: skip
        leases_queued=sum(1 for w in core.waiters.values() if w.kind == "lease"),
        prompt_cache={name: runtime.children.saved_prompts(name) for name in core.models},
        latency=runtime.history.latency(),
        timeline=runtime.history.timeline(),
    )


def _memory_documents(runtime: Runtime) -> list[dict[str, Any]]:
    """What the probe read last and how the daemon divides it."""
    core = runtime.core
    snapshot, budget = core.memory, core.budget
    if snapshot is None or budget is None:
        return []
    models_mb, leases_mb = core.committed_mb()
    document: dict[str, Any] = {
        "device": snapshot.device, "backend": snapshot.backend, "pool": snapshot.pool,
        "total_mb": snapshot.total_mb, "used_mb": snapshot.used_mb, "free_mb": snapshot.free_mb,
        "reserve_mb": budget.reserve_mb, "foreign_mb": budget.foreign_mb,
        "models_mb": models_mb, "leases_mb": leases_mb, "usable_mb": budget.usable_mb,
        "available_mb": core.free_mb(),
    }  # fmt: skip
    for key in ("vram_total_mb", "vram_used_mb", "gtt_total_mb", "gtt_used_mb"):
        if getattr(snapshot, key) is not None:
            document[key] = getattr(snapshot, key)
    return [document]
