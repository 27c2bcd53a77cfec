"""Small pure rules the queue walk and the views share: rank, restart backoff, fallback, gaming, TTL."""

from __future__ import annotations

import math

from ..config import ModelConfig
from .state import ModelState, Phase

# Backoff before a failed model is started again: 0.5 s, 1 s, 2 s ... capped at 30 s.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0


def restart_delay(failures: int) -> float:
    return min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (max(1, failures) - 1))


def rank(priority: int, batch_first: bool, seq: float) -> tuple[int, int, float]:
    """Queue order, smallest first: priority, then (with batching) requests that cost no swap, then arrival."""
    return (-priority, 0 if batch_first else 1, seq)


def goes_first_in_batch(batching: bool, is_lease: bool, model_ready: bool, waited_s: float,
                        max_batch_wait_s: float) -> bool:
    """With batching, a request for a loaded model goes before those that would swap it out, unless one of those
    has waited max_batch_wait_s (then it competes by arrival, so nothing starves)."""
    return batching and not is_lease and (model_ready or waited_s >= max_batch_wait_s)


def may_fall_back(config: ModelConfig, local_only_requested: bool) -> bool:
    return config.fallback is not None and not config.local_only and not local_only_requested


def kept_out_by_gaming(gaming: bool, config: ModelConfig, force: bool) -> bool:
    return gaming and not config.allow_in_gaming and not force


def ttl_expiry(state: ModelState) -> float | None:
    """When an idle, ready model unloads by TTL; None when it does not (busy, not ready, ttl_s 0)."""
    if state.phase is not Phase.READY or state.in_flight or not state.config.ttl_s:
        return None
    return state.last_used + state.config.ttl_s


def retry_after_s(state: ModelState, now: float) -> int:
    """Retry-After for a model that cannot serve yet: about when it will (what is left of its load, else a load
    as long as its last one), within 1..60 s so a router comes back rather than giving up on it."""
    expected = state.last_load_s or 1.0
    if state.phase is Phase.LOADING and state.load_started is not None:
        expected = max(0.0, expected - (now - state.load_started))
    elif state.phase is Phase.FAILED:
        expected += max(0.0, state.retry_at - now)
    return max(1, min(60, math.ceil(expected)))


def fallback_reason(state: ModelState, doomed: bool, short_of_memory: bool, leases_held: bool) -> str:
    """Why a request went to the cloud instead (X-Fallback-Reason)."""
    if state.phase is Phase.FAILED:
        return "model_failed"
    if state.phase is Phase.LOADING:
        return "loading"
    if state.phase is Phase.UNLOADING or state.displaced or doomed:
        return "swapping"
    if short_of_memory:
        return "lease" if leases_held else "memory"
    return "queued"
