"""A new config for the core: what changes in place, what restarts once idle, what goes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .events import Action, ConfigReloaded, UnloadRequested
from .state import RESIDENT, ModelState, Phase

if TYPE_CHECKING:
    from .core import SchedulerCore


def apply_reload(core: SchedulerCore, event: ConfigReloaded) -> list[Action]:
    """Apply a new config. Settings that do not change the process (aliases, TTL, priority, groups, fallback)
    apply at once; a model whose file or args changed is restarted once idle; removed models go once idle."""
    config, now = event.config, event.now
    core.config = config
    actions: list[Action] = []
    for name in event.diff.removed:
        state = core.models.get(name)
        if state is None:
            continue
        state.retiring = True
        for waiter in [w for w in core.waiters.values() if w.model == name]:
            if waiter.detached:  # already answered from the cloud
                del core.waiters[waiter.request_id]
            else:
                message = f"model {name!r} was removed from the config"
                actions.append(core._reject(waiter, 503, "model_removed", message, retry_after_s=1))
        if state.phase in (Phase.UNLOADED, Phase.FAILED):
            del core.models[name]
        else:
            actions += core._unload(UnloadRequested(name, now, cause="reload"))
    for name, new in config.models.items():
        state = core.models.get(name)
        need = new.vram_mb if isinstance(new.vram_mb, int) else event.needs_mb.get(name)
        if state is None:
            core.models[name] = ModelState(name=name, config=new, group=config.group_of(name), need_mb=need or 0)
            continue
        state.config, state.group = new, config.group_of(name)
        state.retiring = False  # back in the config after an earlier reload removed it
        if need is not None:
            state.need_mb = need
        if name in event.diff.process_changed:
            state.last_load_s = None  # another file or other args: the last load says nothing of the next one
            if state.phase is Phase.FAILED:
                state.phase, state.failures, state.retry_at, state.last_error = Phase.UNLOADED, 0, 0.0, None
            elif state.phase in RESIDENT:
                actions += core._unload(UnloadRequested(name, now, cause="reload"))
    return actions
