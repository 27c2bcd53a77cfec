"""What the core does when nobody asks: come home, and make room for programs outside the daemon.

Pure functions over the core's state, called at the end of each queue walk: `come_home` loads the home models
(and those predicted to be wanted soon) when nothing waits and they fit without displacing anything;
`yield_to_others` unloads models when other programs grew so that what is resident no longer fits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .events import Action
from .placement import displaces
from .policy import kept_out_by_gaming
from .state import Phase

if TYPE_CHECKING:
    from .core import SchedulerCore


def home_models(core: SchedulerCore) -> list[str]:
    """The daemon's home model and each group's, that exist. (Asked several times per event: kept until the config
    or the set of models changes. Not to be modified.)"""
    cached = core._homes
    if cached is not None and cached[0] is core.config and cached[1] == len(core.models):
        return cached[2]
    homes = [core.config.daemon.home] if core.config.daemon.home else []
    homes += [group.home for group in core.config.groups.values() if group.home]
    found = [name for name in dict.fromkeys(homes) if name in core.models]
    core._homes = (core.config, len(core.models), found)
    return found


def come_home(core: SchedulerCore, now: float) -> list[Action]:
    """Nothing is wanted: load the home models (and those predicted to be wanted soon) that fit in free memory
    without displacing anything."""
    core._predicted = {name: until for name, until in core._predicted.items() if until > now}
    if core.waiters or core._closing:
        return []
    actions: list[Action] = []
    homes = home_models(core)
    for name in [*homes, *(p for p in core._predicted if p not in homes)]:
        state = core.models[name]
        if name in core._home_suspended or state.retiring or kept_out_by_gaming(core.gaming, state.config, False):
            continue
        if state.phase is not Phase.UNLOADED and not (state.phase is Phase.FAILED and now >= state.retry_at):
            continue
        resident = core._resident()
        if any(displaces(state, other) or displaces(other, state) for other in resident):
            continue  # a home never displaces anything, nor loads where a resident model would push it out
        if core.budget is not None and state.need_mb > (core.free_mb() or 0):
            continue
        if name not in homes:
            del core._predicted[name]  # loaded once per prediction; then it lives by its TTL like any model
        actions.append(core._start(state, now, "home" if name in homes else "predicted"))
    return actions


def yield_to_others(core: SchedulerCore, now: float) -> list[Action]:
    """Other programs grew so that what is resident no longer fits: unload models, in eviction order (idle
    before busy, persistent last), until it fits again. A busy one drains first."""
    gpu = core.config.gpu
    if not gpu.yield_to_others or core.budget is None or now - core._last_yield < gpu.yield_interval_s:
        return []
    resident = core._resident()
    leaving = sum(s.need_mb for s in resident if s.phase is Phase.UNLOADING or s.unload_requested)
    models_mb, leases_mb = core.committed_mb()
    overflow = models_mb + leases_mb - leaving - core.budget.usable_mb
    if overflow <= 0 or overflow < gpu.yield_margin_mb:
        return []
    candidates = [s for s in resident if s.phase is Phase.READY and not s.unload_requested]
    candidates.sort(key=lambda s: (s.group.persistent, s.in_flight > 0, s.config.priority, s.last_used, s.name))
    detail = (f"other programs hold {core.budget.foreign_mb} MB: {models_mb + leases_mb} MB committed, "
              f"{core.budget.usable_mb} MB usable")  # fmt: skip
    actions: list[Action] = []
    freed = 0
    for state in candidates:
        if freed >= overflow:
            break
        freed += state.need_mb
        if state.in_flight:
            state.unload_requested, state.unload_cause = True, "memory_pressure"
            state.last_stop = ("memory_pressure", detail)
        else:
            actions.append(core._stop(state, "memory_pressure", detail))
    if candidates:
        core._last_yield = now
    return actions
