"""What the core's state means to someone asking: available now, an ETA, the route a request would take.

Pure functions of the core and a time; /status, /health/{model}, /events, metrics and the CLI all show these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .core import SchedulerCore
from .placement import displaces
from .policy import goes_first_in_batch, kept_out_by_gaming, may_fall_back, rank, ttl_expiry
from .state import RESIDENT, Phase

Route = Literal["local", "queued", "cloud", "rejected"]

# What stopping a model takes, for ETAs (SIGTERM to exit is milliseconds for llama-server).
STOP_ESTIMATE_S = 0.2


@dataclass(frozen=True)
class ModelView:
    """What /status shows of one model."""

    name: str
    state: str
    group: str
    pid: int | None
    port: int | None
    in_flight: int
    queued: int
    ttl_s: float
    ttl_remaining_s: float | None
    last_load_ms: int | None
    available_now: bool
    last_error: str | None
    aliases: list[str] = field(default_factory=list)
    need_mb: int = 0
    eta_ms: int | None = None
    route: Route = "queued"
    last_stop: dict[str, str] | None = None  # {"cause", "detail"} of its last stop
    load_progress: float | None = None  # while loading: 0..1 by how long its last load took; None: not known
    load_progress_basis: str | None = None  # what the figure rests on, or why there is none
    waiting_for: str | None = None  # why its requests wait, or why it is about to go, for a person
    loadable: bool = True  # what an X-Health-Check probe would answer: served now, or by a load that may start now
    unavailable_reason: str | None = None  # when not loadable: why (gaming mode, failed, cannot fit...)


def available_now(core: SchedulerCore, model: str) -> bool:
    """Would a request for this model arriving now be granted at once?"""
    state = core.models[model]
    if state.phase is not Phase.READY or state.unload_requested or kept_out_by_gaming(core.gaming, state.config, False):
        return False
    doomer = core.doomed.get(model)
    if doomer is None:
        return True
    # A new request ranks after every waiter of its class and priority; served if that is before the doomer.
    scheduler = core.config.scheduler
    first = goes_first_in_batch(scheduler.batching, False, True, 0.0, scheduler.max_batch_wait_s)
    return rank(state.config.priority, first, float("inf")) < doomer


def eta_ms(core: SchedulerCore, model: str, now: float) -> int | None:
    """Roughly how long until a request for this model could be served locally; None when unknown."""
    state = core.models[model]
    if available_now(core, model):
        return 0
    if kept_out_by_gaming(core.gaming, state.config, False) or state.last_load_s is None:
        return None
    if state.phase is Phase.LOADING and state.load_started is not None:
        return round(max(0.0, state.last_load_s - (now - state.load_started)) * 1000)
    seconds = state.last_load_s
    if state.phase is Phase.FAILED:
        seconds += max(0.0, state.retry_at - now)
    in_the_way = [o for o in core.models.values() if o.phase in RESIDENT and displaces(state, o)]
    if any(o.in_flight for o in in_the_way) or model in core.short_of_memory:
        return None  # depends on when other requests finish or memory frees
    seconds += STOP_ESTIMATE_S * (len(in_the_way) + (state.phase is Phase.UNLOADING))
    return round(seconds * 1000)


def route(core: SchedulerCore, model: str, now: float, local_only: bool = False) -> Route:
    """What a request for this model arriving now would get."""
    state = core.models[model]
    if available_now(core, model):
        return "local"
    fallback = may_fall_back(state.config, local_only)
    never_soon = (
        kept_out_by_gaming(core.gaming, state.config, False)
        or (state.phase is Phase.FAILED and state.retry_at - now >= core.config.daemon.queue_timeout_s)
        or (core.budget is not None and state.need_mb > core.budget.usable_mb)
    )
    if never_soon:
        return "cloud" if fallback else "rejected"
    eta = eta_ms(core, model, now)
    if fallback and (eta is None or eta > state.config.fallback_after_ms):
        return "cloud"
    return "queued"


def probe(core: SchedulerCore, model: str, now: float) -> tuple[bool, str, str]:
    """An availability probe (X-Health-Check): can a request for this model be served, now or by a load that may
    start now? (yes or no, a code, a reason for a person). Changes nothing."""
    state = core.models[model]
    if available_now(core, model):
        return True, "loaded", f"model {model!r} is loaded"
    if state.retiring:
        return False, "model_removed", f"model {model!r} was removed from the config"
    if kept_out_by_gaming(core.gaming, state.config, False):
        return False, "gaming_mode", f"model {model!r} is not allowed in gaming mode"
    if state.phase is Phase.FAILED and now < state.retry_at:
        return False, "model_failed", f"model {model!r} failed: {state.last_error}"
    if core.budget is not None and state.need_mb > core.budget.usable_mb:
        return False, "insufficient_memory", (f"model {model!r} needs {state.need_mb} MB but only "
                                              f"{core.budget.usable_mb} MB are usable")
    return True, "loadable", f"model {model!r} can be loaded (it is {state.phase.value})"


def load_progress(core: SchedulerCore, model: str, now: float) -> tuple[float | None, str | None]:
    """How far a load is, honestly: the time it has taken against how long this model's last load took (capped
    below 1 until it is ready); a model never loaded before has no figure, and says so."""
    state = core.models[model]
    if state.phase is not Phase.LOADING or state.load_started is None:
        return None, None
    if state.last_load_s is None:
        return None, "never loaded before: no estimate"
    elapsed = now - state.load_started
    return round(min(0.99, elapsed / max(state.last_load_s, 1e-3)), 3), \
        f"its last load took {round(state.last_load_s * 1000)} ms"


def waiting_for(core: SchedulerCore, model: str) -> str | None:
    """Why this model's requests wait (or why it is about to be stopped), in words."""
    state = core.models[model]
    queued = any(w.model == model and not w.detached for w in core.waiters.values())
    if state.phase is Phase.READY and model in core.doomed and not state.unload_requested:
        wanted = sorted({w.model for w in core.waiters.values() if w.model and w.model != model and not w.detached})
        if any(w.kind == "lease" for w in core.waiters.values()):
            wanted.append("a lease")
        what = ", ".join(wanted) or "another placement"
        return f"draining: to be swapped out for {what}" + (f" once {state.in_flight} request(s) finish"
                                                            if state.in_flight else "")
    if state.unload_requested:
        return f"draining: unloading ({state.unload_cause}) once {state.in_flight} request(s) finish"
    if not queued:
        return None
    if kept_out_by_gaming(core.gaming, state.config, False):
        return "gaming mode"
    if state.phase is Phase.LOADING:
        return "loading"
    if state.phase is Phase.UNLOADING:
        return "its previous instance is stopping"
    if state.phase is Phase.FAILED:
        return f"restart backoff after a failure: {state.last_error.splitlines()[0] if state.last_error else ''}"
    if model in core.short_of_memory:
        return "memory held by a lease" if core.leases else "memory"
    in_the_way = [o.name for o in core.models.values()
                  if o.phase in RESIDENT and o.name != model and displaces(state, o)]
    if in_the_way:
        return "draining " + ", ".join(in_the_way)
    return "queued"


def queued_requests(core: SchedulerCore) -> dict[str, int]:
    """Requests waiting per model (places kept after a cloud answer do not count)."""
    queued: dict[str, int] = {}
    for waiter in core.waiters.values():
        if waiter.kind == "request" and not waiter.detached:
            queued[waiter.model] = queued.get(waiter.model, 0) + 1
    return queued


def model_views(core: SchedulerCore, now: float) -> list[ModelView]:
    queued = queued_requests(core)
    views = []
    for state in core.models.values():
        expiry = ttl_expiry(state)
        progress, basis = load_progress(core, state.name, now)
        loadable, _, reason = probe(core, state.name, now)
        views.append(
            ModelView(
                name=state.name,
                state=state.phase.value,
                group=state.config.group,
                pid=state.pid,
                port=state.port,
                in_flight=state.in_flight,
                queued=queued.get(state.name, 0),
                ttl_s=state.config.ttl_s,
                ttl_remaining_s=None if expiry is None else round(max(0.0, expiry - now), 3),
                last_load_ms=None if state.last_load_s is None else round(state.last_load_s * 1000),
                available_now=available_now(core, state.name),
                last_error=state.last_error,
                aliases=list(state.config.aliases),
                need_mb=state.need_mb,
                eta_ms=eta_ms(core, state.name, now),
                route=route(core, state.name, now),
                last_stop=None if state.last_stop is None else {"cause": state.last_stop[0],
                                                                "detail": state.last_stop[1]},
                load_progress=progress,
                load_progress_basis=basis,
                waiting_for=waiting_for(core, state.name),
                loadable=loadable,
                unavailable_reason=None if loadable else reason,
            )
        )
    return views
