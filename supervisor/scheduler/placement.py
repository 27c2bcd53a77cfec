"""Where a load or a lease may go: the group rules and the memory budget. Pure: no probes, clocks or processes.

usable = total - reserve_mb - foreign, where foreign is what processes the daemon does not know hold.
What the daemon has committed (resident models' needs + granted leases) must stay within usable; a load or lease
that does not fit first frees memory by stopping models, chosen by ``eviction_order``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .events import Prewarm, StopCause
from .state import Phase

if TYPE_CHECKING:
    from .core import Rank, SchedulerCore
    from .events import Action
    from .state import ModelState, Waiter


@dataclass(frozen=True)
class Budget:
    total_mb: int
    used_mb: int
    reserve_mb: int
    foreign_mb: int

    @property
    def usable_mb(self) -> int:
        return max(0, self.total_mb - self.reserve_mb - self.foreign_mb)


def foreign_usage(
    used_mb: int,
    committed_mb: int,
    process_mb: Mapping[int, int] | None,
    model_pids: Iterable[int],
    lease_pids: Mapping[int, int],
) -> int:
    """Memory held by processes the daemon does not know.

    With per-process figures, subtract what our children hold and what lease holders hold (up to their lease:
    beyond it their use is as foreign as anyone's). Without them, subtract everything we committed, which
    cannot over-count foreign use (a model still loading holds less than its need).
    """
    if process_mb is None:
        return max(0, used_mb - committed_mb)
    ours = sum(process_mb.get(pid, 0) for pid in model_pids)
    ours += sum(min(process_mb.get(pid, 0), leased) for pid, leased in lease_pids.items())
    return max(0, used_mb - ours)


@dataclass(frozen=True)
class Candidate:
    """A resident model that could be stopped to make room."""

    name: str
    need_mb: int
    priority: int
    last_used: float
    busy: bool


def eviction_order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Idle before busy (a busy one only drains), then lowest priority, then least recently used."""
    return sorted(candidates, key=lambda c: (c.busy, c.priority, c.last_used, c.name))


def choose_victims(deficit_mb: int, candidates: Iterable[Candidate]) -> list[Candidate] | None:
    """The shortest prefix of eviction order that frees deficit_mb, or None if all of them would not."""
    if deficit_mb <= 0:
        return []
    chosen: list[Candidate] = []
    freed = 0
    for candidate in eviction_order(candidates):
        chosen.append(candidate)
        freed += candidate.need_mb
        if freed >= deficit_mb:
            return chosen
    return None


def displaces(loading: ModelState, other: ModelState) -> bool:
    """Must `other` be stopped before `loading` may load? (the group rules of API.md)"""
    if loading.name == other.name:
        return False
    if loading.config.group == other.config.group:
        return loading.group.swap
    return loading.group.exclusive and not other.group.persistent


@dataclass
class Placement:
    """What trying to place a load or a lease came to, and the actions that takes (stops, the start, the grant).

    placed: started or granted. wait: memory is short and nothing we may stop frees enough yet (lower-ranked
    placements must not take memory before it). waiting_for_group: its group's residents are being stopped.
    rejected: it can never fit; the waiter has been answered."""

    outcome: Literal["placed", "wait", "waiting_for_group", "rejected"]
    actions: list[Action] = field(default_factory=list)


# ---------------------------------------------------------------- placing a load or a lease


def place(core: SchedulerCore, state: ModelState | None, waiter: Waiter, claimed: list[str], doomed: dict[str, Rank],
           now: float) -> Placement:
    """Make room for a model load (state) or a lease (state None), and place it once there is room."""
    placement = Placement("placed")
    actions = placement.actions
    lease = waiter.lease
    need = state.need_mb if state is not None else lease.mb  # type: ignore[union-attr]
    group_victims = [] if state is None else [o for o in core._resident() if displaces(state, o)]
    memory_victims: list[ModelState] = []
    if core.budget is not None:
        if need > core.budget.usable_mb:
            what = f"model {state.name!r}" if state is not None else f"lease for {lease.owner!r}"  # type: ignore[union-attr]
            message = (f"{what} needs {need} MB but only {core.budget.usable_mb} MB are usable "
                       f"(total {core.budget.total_mb}, reserve {core.budget.reserve_mb}, "
                       f"used by other programs {core.budget.foreign_mb})")  # fmt: skip
            if state is None:
                actions.append(core._reject(waiter, 503, "insufficient_memory", message, retry_after_s=10))
            else:
                actions += core._give_up(waiter, 503, "insufficient_memory", message, retry_after_s=10)
            placement.outcome = "rejected"
            return placement
        # What is already on its way out (unloading, or displaced by the group rules) will be free soon.
        leaving = {o.name: o.need_mb for o in core._resident() if o.phase is Phase.UNLOADING or o in group_victims}
        deficit = need - (core.free_mb() or 0) - sum(leaving.values())
        if deficit > 0:
            chosen = choose_victims(deficit, candidates(core, state, waiter, claimed, group_victims))
            if chosen is None:
                placement.outcome = "wait"  # nothing we may stop frees enough: wait for leases, drains or others
                return placement
            memory_victims = [core.models[c.name] for c in chosen]
    victims = group_victims + memory_victims
    waiter_rank = core._rank_key(waiter, now)
    for victim in victims:
        doomed.setdefault(victim.name, waiter_rank)
        resident_for = now - victim.ready_since
        if victim.phase is Phase.READY and resident_for < core.config.scheduler.min_residency_s:
            continue  # too recently loaded to swap out: stopped once min_residency_s has passed
        if victim.phase is Phase.LOADING or (victim.phase is Phase.READY and not victim.in_flight):
            cause: StopCause = "swap" if victim in group_victims else ("lease" if state is None else "memory")
            actions.append(core._stop(victim, cause))
    if victims:
        if state is not None:
            state.displaced = tuple(sorted({*state.displaced, *(v.name for v in victims)}))
            if state.swap_started is None:
                state.swap_started = now
            if not memory_victims and may_overlap(core, state, group_victims, need):
                actions.append(core._start(state, now, "admin" if waiter.kind == "load" else "request"))
                return placement
            if not state.prewarmed:  # the disk works while the others drain and stop
                state.prewarmed = True
                actions.append(Prewarm(state.name))
        placement.outcome = "wait" if memory_victims else "waiting_for_group"
        return placement
    if core.budget is not None and (core.free_mb() or 0) < need:
        placement.outcome = "wait"  # room is promised by models still unloading
        return placement
    if state is None:
        actions.append(core._grant_lease(waiter, now))
    else:
        actions.append(core._start(state, now, "admin" if waiter.kind == "load" else "request"))
    return placement


def may_overlap(core: SchedulerCore, state: ModelState, group_victims: list[ModelState], need: int) -> bool:
    """May this load start while the models its group displaces are still stopping? Only when every one of them
    is already on its way out (none still serving or kept by min_residency_s), the memory budget is known and holds
    the newcomer beside them (they count as held until their stops complete), and all are llama-servers (a `cmd`
    server may hold a fixed port or memory the daemon cannot see), and every need involved is known."""
    if not core.config.scheduler.overlap_swaps or core.budget is None:
        return False
    if state.need_mb <= 0 or any(v.need_mb <= 0 for v in group_victims):
        return False  # a need that is not known (no estimate) cannot be said to fit beside anything
    if state.config.cmd is not None or any(v.phase is not Phase.UNLOADING or v.config.cmd is not None
                                           for v in group_victims):
        return False
    return (core.free_mb() or 0) >= need


def candidates(core: SchedulerCore, state: ModelState | None, waiter: Waiter, claimed: list[str],
                already: list[ModelState]) -> list[Candidate]:
    """Resident models that may be stopped to free memory for this placement."""
    out = []
    for other in core._resident():
        if other.phase is Phase.UNLOADING or other.name in claimed or other in already or other is state:
            continue
        if state is None:  # a lease displaces only what matters less than it does, and no persistent model
            if other.group.persistent or other.config.priority >= waiter.priority:
                continue
        elif other.group.persistent and other.config.group != state.config.group:
            continue
        out.append(Candidate(other.name, other.need_mb, other.config.priority, other.last_used,
                             busy=other.in_flight > 0 or other.phase is Phase.LOADING))  # fmt: skip
    return out


def group_blocked(core: SchedulerCore, state: ModelState, claimed: list[str]) -> bool:
    """Would loading this model displace a claimed one, or be displaced by a claimed one still to load?"""
    for name in claimed:
        other = core.models[name]
        if name == state.name:
            continue
        if displaces(state, other):
            return True
        if other.phase is not Phase.READY and displaces(other, state):
            return True
    return False
