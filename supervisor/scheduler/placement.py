"""Where a load or a lease may go: the group rules and the memory budget. Pure: no probes, clocks or processes.

usable = total - reserve_mb - foreign, where foreign is what processes the daemon does not know hold.
What the daemon has committed (resident models' needs + granted leases) must stay within usable; a load or lease
that does not fit first frees memory by stopping models, chosen by ``eviction_order``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .events import Action
    from .state import ModelState


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
