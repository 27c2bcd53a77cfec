"""The pure scheduler core: events in, actions out. No processes, no sockets, no sleeps; time is a number."""

from __future__ import annotations

import pytest

from model_supervisor.config import diff_configs, parse_config
from model_supervisor.scheduler import (
    ConfigReloaded,
    DropWaiters,
    Fallback,
    GamingChanged,
    Prewarm,
    Grant,
    GrantLease,
    LeaseEnded,
    LeaseReleased,
    LeaseRenewed,
    LeaseRequested,
    MemoryMeasured,
    NeedLearned,
    LoadFailed,
    LoadSucceeded,
    Phase,
    ProcessExited,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    SchedulerCore,
    StartProcess,
    StopCompleted,
    StopProcess,
    Tick,
    MemorySnapshot,
    UnloadRequested,
    Upstream,
    available_now,
    eta_ms,
    model_views,
    restart_delay,
    route,
)


class Sim:
    """Drives a SchedulerCore the way the driver would, with a hand-moved clock."""

    def __init__(self, models: dict, groups: dict | None = None, queue_timeout_s: float = 30,
                 needs: dict[str, int] | None = None, reserve_mb: int = 0, scheduler: dict | None = None,
                 gpu: dict | None = None):
        config = parse_config(
            {
                "daemon": {"queue_timeout_s": queue_timeout_s},
                "scheduler": scheduler or {},
                "cloud": {"frontier": {"base_url": "http://127.0.0.1:9/v1", "model": "big-model"}},
                "gpu": {"reserve_mb": reserve_mb, **(gpu or {})},
                "groups": groups or {},
                "models": {name: {"model": f"/m/{name}.gguf", **spec} for name, spec in models.items()},
            }
        )
        self.core = SchedulerCore(config, needs)
        self.now = 0.0
        self.next_id = 0
        self.log: list = []
        self.prewarmed: list[str] = []

    def send(self, event) -> list:
        actions = self.core.handle(event)
        # Read-aheads are advice, not decisions: kept apart so the other tests compare decisions only.
        self.prewarmed += [a.model for a in actions if isinstance(a, Prewarm)]
        actions = [a for a in actions if not isinstance(a, Prewarm)]
        self.log += actions
        return actions

    def request(self, model: str, wait_s: float | None = None, **flags) -> tuple[int, list]:
        self.next_id += 1
        deadline = self.now + (self.core.config.daemon.queue_timeout_s if wait_s is None else wait_s)
        return self.next_id, self.send(RequestArrived(self.next_id, model, self.now, deadline, **flags))

    def loaded(self, model: str, port: int = 6000) -> list:
        instance = self.core.models[model].instance
        upstream = Upstream(f"http://127.0.0.1:{port}", 4242, port)
        return self.send(LoadSucceeded(model, instance, upstream, 0.05, self.now))

    def stopped(self, model: str) -> list:
        return self.send(StopCompleted(model, self.core.models[model].instance, self.now))

    def finish(self, request_id: int) -> list:
        return self.send(RequestFinished(request_id, self.now))

    def advance(self, seconds: float) -> list:
        self.now += seconds
        return self.send(Tick(self.now))

    def measure(self, total_mb: int, used_mb: int = 0, process_mb: dict | None = None) -> list:
        snapshot = MemorySnapshot("fixed", "test device", "vram", total_mb, used_mb, process_mb=process_mb)
        return self.send(MemoryMeasured(snapshot, self.now))

    def lease(self, mb: int, priority: int = 50, owner: str = "tts", wait_s: float = 10, ttl_s: float = 60,
              pid: int | None = None) -> tuple[int, list]:
        self.next_id += 1
        event = LeaseRequested(self.next_id, owner, mb, priority, pid, ttl_s, self.now, self.now + wait_s)
        return self.next_id, self.send(event)

    def serve(self, model: str) -> int:
        """Request, load if needed, and finish: leaves the model idle and resident."""
        request_id, actions = self.request(model)
        if not any(isinstance(a, Grant) for a in actions):
            self.loaded(model)
        self.finish(request_id)
        return request_id

    def phase(self, model: str) -> Phase:
        return self.core.models[model].phase


def kinds(actions: list) -> list[tuple]:
    out = []
    for a in actions:
        if isinstance(a, StartProcess):
            out.append(("start", a.model))
        elif isinstance(a, StopProcess):
            out.append(("stop", a.model, a.cause))
        elif isinstance(a, Grant):
            out.append(("grant", a.request_id, a.model))
        elif isinstance(a, Reject):
            out.append(("reject", a.request_id, a.code))
        elif isinstance(a, Fallback):
            out.append(("cloud", a.request_id, a.target, a.reason))
        elif isinstance(a, GrantLease):
            out.append(("lease", a.lease_id))
        elif isinstance(a, LeaseEnded):
            out.append(("lease_ended", a.lease_id, a.reason))
    return out


SWAP_PAIR = {"a": {"group": "main"}, "b": {"group": "main"}}
MAIN_SWAP = {"main": {"swap": True, "exclusive": True}}


def test_cold_request_starts_the_model_once_and_concurrent_requests_join_the_load():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    first, actions = sim.request("a")
    assert kinds(actions) == [("start", "a")]
    second, actions = sim.request("a")
    assert actions == []  # joins the load in progress
    assert kinds(sim.loaded("a")) == [("grant", first, "a"), ("grant", second, "a")]


def test_swap_in_one_group_stops_the_idle_model_first():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    ra, _ = sim.request("a")
    sim.loaded("a")
    sim.finish(ra)
    rb, actions = sim.request("b")
    assert kinds(actions) == [("stop", "a", "swap")]
    assert sim.phase("b") is Phase.UNLOADED  # not started while a is still resident
    start = sim.stopped("a")
    assert kinds(start) == [("start", "b")]
    assert start[0].displaced == ("a",)
    assert kinds(sim.loaded("b")) == [("grant", rb, "b")]


def test_swap_starts_the_incoming_model_while_the_outgoing_one_stops_when_memory_holds_both():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, needs={"a": 4000, "b": 4000})
    sim.measure(total_mb=10000)
    sim.serve("a")
    rb, actions = sim.request("b")
    assert kinds(actions) == [("stop", "a", "swap"), ("start", "b")]  # the stop is off the swap's path
    assert actions[1].displaced == ("a",)
    assert sim.phase("a") is Phase.UNLOADING
    assert sim.core.committed_mb() == (8000, 0)  # a holds its memory until its stop completes
    ra2, actions = sim.request("a")
    assert actions == []  # a may not start again while it is still stopping, nor displace b while it loads
    assert kinds(sim.loaded("b")) == [("grant", rb, "b")]
    assert sim.stopped("a") == []
    assert kinds(sim.finish(rb)) == [("stop", "b", "swap"), ("start", "a")]


@pytest.mark.parametrize("why", ["memory holds one", "memory unknown", "turned off", "need unknown"])
def test_swap_waits_for_the_outgoing_model_to_stop_unless_memory_holds_both(why):
    needs = {"a": 7000 if why == "memory holds one" else 4000, "b": 0 if why == "need unknown" else 4000}
    sim = Sim(SWAP_PAIR, MAIN_SWAP, needs=needs, scheduler={"overlap_swaps": why != "turned off"})
    if why != "memory unknown":
        sim.measure(total_mb=10000)
    sim.serve("a")
    rb, actions = sim.request("b")
    assert kinds(actions) == [("stop", "a", "swap")]
    assert kinds(sim.stopped("a")) == [("start", "b")]
    assert kinds(sim.loaded("b")) == [("grant", rb, "b")]


def test_overlapping_swap_never_starts_beside_a_model_that_still_serves():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, needs={"a": 4000, "b": 4000}, scheduler={"batching": False})
    sim.measure(total_mb=10000)
    ra, _ = sim.request("a")
    sim.loaded("a")
    rb, actions = sim.request("b")
    assert actions == []  # a drains first, memory or not
    assert kinds(sim.finish(ra)) == [("stop", "a", "swap"), ("start", "b")]


def test_overlap_counts_the_outgoing_model_against_foreign_use_and_leases():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, needs={"a": 4000, "b": 4000})
    sim.measure(total_mb=10000, used_mb=6000)  # a's 4000 and 2000 held by another program
    sim.serve("a")
    rb, actions = sim.request("b")
    assert kinds(actions) == [("stop", "a", "swap")]  # 10000 - 2000 foreign - 4000 a < 4000 for b
    assert kinds(sim.stopped("a")) == [("start", "b")]


def loaded_after(sim: Sim, model: str, load_s: float) -> list:
    upstream = Upstream("http://127.0.0.1:6000", 4242, 6000)
    return sim.send(LoadSucceeded(model, sim.core.models[model].instance, upstream, load_s, sim.now))


def test_a_request_whose_wait_ends_well_before_the_load_is_answered_at_once_and_the_load_goes_on():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, needs={"a": 4000, "b": 4000})
    sim.measure(total_mb=10000)
    sim.serve("a")
    rb, _ = sim.request("b")
    sim.stopped("a")
    sim.advance(1)
    loaded_after(sim, "b", 3.0)  # b's loads take 3 s
    sim.finish(rb)
    sim.serve("a")  # b goes (a swap back)
    sim.stopped("b")
    r1, actions = sim.request("b", wait_s=0.5)
    assert kinds(actions) == [("stop", "a", "swap"), ("start", "b"), ("reject", r1, "queue_timeout")]
    assert actions[2].retry_after_s == 3 and "about 3.0 s to go" in actions[2].message
    r2, actions = sim.request("b", wait_s=2.5)  # 3 s of load against 2.5 s of wait: worth waiting for, for now
    assert actions == []
    due = sim.now + 1.5  # when 1.5 s of load is left for 1 s of wait
    assert sim.core.next_wakeup() == pytest.approx(due, abs=1e-3)
    sim.advance(1.4)
    assert sim.core.next_wakeup() == pytest.approx(due, abs=1e-3)
    assert kinds(sim.advance(0.11)) == [("reject", r2, "queue_timeout")]
    r3, actions = sim.request("b")  # the default 30 s wait: served once the load completes
    assert actions == []
    assert kinds(loaded_after(sim, "b", 3.0)) == [("grant", r3, "b")]


def test_without_batching_a_busy_model_drains_before_a_swap_and_takes_no_new_requests():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, scheduler={"batching": False})
    ra, _ = sim.request("a")
    sim.loaded("a")
    rb, actions = sim.request("b")
    assert actions == []  # a is busy: nothing is stopped
    ra2, actions = sim.request("a")
    assert actions == []  # a is draining for b: the new request waits its turn
    assert not available_now(sim.core, "a")
    assert kinds(sim.finish(ra)) == [("stop", "a", "swap")]
    assert kinds(sim.stopped("a")) == [("start", "b")]
    assert kinds(sim.loaded("b")) == [("grant", rb, "b")]
    assert kinds(sim.finish(rb)) == [("stop", "b", "swap")]
    sim.stopped("b")
    assert kinds(sim.loaded("a")) == [("grant", ra2, "a")]


def test_models_of_different_non_exclusive_groups_stay_loaded_together():
    groups = {"chat": {"swap": True, "exclusive": False}, "embed": {"swap": True, "exclusive": False}}
    sim = Sim({"a": {"group": "chat"}, "e": {"group": "embed"}}, groups)
    ra, _ = sim.request("a")
    sim.loaded("a")
    sim.finish(ra)
    re_, actions = sim.request("e")
    assert kinds(actions) == [("start", "e")]
    assert kinds(sim.loaded("e", port=6001)) == [("grant", re_, "e")]
    assert sim.phase("a") is Phase.READY


def test_exclusive_group_displaces_other_groups_but_never_a_persistent_one():
    groups = {
        "big": {"swap": True, "exclusive": True},
        "small": {"swap": True, "exclusive": False},
        "always": {"swap": True, "exclusive": False, "persistent": True},
    }
    sim = Sim({"heavy": {"group": "big"}, "task": {"group": "small"}, "embed": {"group": "always"}}, groups)
    for model in ("task", "embed"):
        rid, _ = sim.request(model)
        sim.loaded(model)
        sim.finish(rid)
    rh, actions = sim.request("heavy")
    assert kinds(actions) == [("stop", "task", "swap")]
    assert kinds(sim.stopped("task")) == [("start", "heavy")]
    sim.loaded("heavy")
    assert sim.phase("embed") is Phase.READY


def test_loading_a_non_exclusive_model_leaves_an_exclusive_one_alone():
    groups = {"big": {"swap": True, "exclusive": True}, "small": {"swap": True, "exclusive": False}}
    sim = Sim({"heavy": {"group": "big"}, "task": {"group": "small"}}, groups)
    rh, _ = sim.request("heavy")
    sim.loaded("heavy")
    rt, actions = sim.request("task")
    assert kinds(actions) == [("start", "task")]
    # heavy keeps serving while task is there: its own load already happened.
    rh2, actions = sim.request("heavy")
    assert kinds(actions) == [("grant", rh2, "heavy")]


def test_swap_false_lets_group_members_run_together():
    sim = Sim(SWAP_PAIR, {"main": {"swap": False, "exclusive": False}})
    ra, _ = sim.request("a")
    sim.loaded("a")
    rb, actions = sim.request("b")
    assert kinds(actions) == [("start", "b")]


def test_higher_priority_waiter_is_served_first():
    sim = Sim({"a": {"group": "main"}, "b": {"group": "main", "priority": 5}, "c": {"group": "main"}}, MAIN_SWAP)
    ra, _ = sim.request("a")
    sim.loaded("a")
    rc, _ = sim.request("c")
    rb, _ = sim.request("b")  # later but more important
    assert kinds(sim.finish(ra)) == [("stop", "a", "swap")]
    assert kinds(sim.stopped("a")) == [("start", "b")]
    assert kinds(sim.loaded("b")) == [("grant", rb, "b")]


def test_queue_timeout_rejects_with_503_and_a_short_retry_after():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, queue_timeout_s=2)
    ra, _ = sim.request("a")
    sim.loaded("a")
    rb, _ = sim.request("b")
    assert sim.core.next_wakeup() == pytest.approx(2.0)
    assert sim.advance(1.9) == []
    (reject,) = sim.advance(0.1)
    assert isinstance(reject, Reject)
    assert (reject.request_id, reject.status, reject.code) == (rb, 503, "queue_timeout")
    assert 1 <= reject.retry_after_s <= 10
    assert "'b'" in reject.message
    # Answered, but its place stays: the swap it asked for goes on once a drains, so the next request finds b.
    assert [w.detached for w in sim.core.waiters.values()] == [True]
    assert kinds(sim.finish(ra)) == [("stop", "a", "swap")]
    assert kinds(sim.stopped("a")) == [("start", "b")]
    assert sim.core.waiters == {}


def test_a_request_that_may_not_wait_is_answered_at_once_and_its_load_goes_on():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    sim.serve("a")
    rb, actions = sim.request("b", wait_s=0)
    assert kinds(actions) == [("stop", "a", "swap"), ("reject", rb, "queue_timeout")]
    assert kinds(sim.stopped("a")) == [("start", "b")]
    assert kinds(sim.loaded("b")) == []
    rc, actions = sim.request("b", wait_s=0)
    assert kinds(actions) == [("grant", rc, "b")]  # the next request finds it ready


def test_ttl_counts_from_the_last_finished_request():
    sim = Sim({"a": {"ttl_s": 10}})
    ra, _ = sim.request("a")
    sim.loaded("a")
    sim.advance(50)  # in flight: never expires
    assert sim.phase("a") is Phase.READY
    sim.finish(ra)
    assert sim.core.next_wakeup() == pytest.approx(60)
    assert sim.advance(9.9) == []
    assert kinds(sim.advance(0.1)) == [("stop", "a", "ttl")]


def test_ttl_zero_never_unloads():
    sim = Sim({"a": {"ttl_s": 0}})
    ra, _ = sim.request("a")
    sim.loaded("a")
    sim.finish(ra)
    assert sim.core.next_wakeup() is None
    assert sim.advance(1e9) == []
    assert sim.phase("a") is Phase.READY


def test_failed_load_answers_every_waiter_at_once_with_the_cause():
    sim = Sim({"a": {}})
    r1, _ = sim.request("a")
    r2, _ = sim.request("a")
    actions = sim.send(LoadFailed("a", 1, "llama-server exited with code 1: error: invalid argument: --bogus", 0.0))
    assert kinds(actions) == [("reject", r1, "model_load_failed"), ("reject", r2, "model_load_failed")]
    assert "'a'" in actions[0].message and "--bogus" in actions[0].message
    assert sim.phase("a") is Phase.FAILED


def test_failed_model_restarts_on_the_next_request_after_backoff():
    sim = Sim({"a": {}}, queue_timeout_s=30)
    sim.request("a")
    sim.send(LoadFailed("a", 1, "boom", sim.now))
    r, actions = sim.request("a")
    assert actions == []  # waits for the backoff, which ends before its deadline
    assert sim.core.next_wakeup() == pytest.approx(restart_delay(1))
    assert kinds(sim.advance(restart_delay(1))) == [("start", "a")]
    assert kinds(sim.loaded("a")) == [("grant", r, "a")]
    assert sim.core.models["a"].failures == 0


def test_request_that_would_time_out_during_backoff_is_told_at_once():
    sim = Sim({"a": {}}, queue_timeout_s=0.1)
    for failures in range(3):
        sim.request("a")
        sim.advance(restart_delay(failures))
        sim.send(LoadFailed("a", sim.core.models["a"].instance, "boom", sim.now))
    r, actions = sim.request("a")
    assert kinds(actions) == [("reject", r, "model_failed")]
    assert "boom" in actions[0].message


def test_crash_of_a_ready_model_marks_it_failed_and_the_next_request_restarts_it():
    sim = Sim({"a": {}})
    r, _ = sim.request("a")
    sim.loaded("a")
    sim.finish(r)
    assert sim.send(ProcessExited("a", 1, "killed by SIGKILL", sim.now)) == []
    assert sim.phase("a") is Phase.FAILED
    sim.now += restart_delay(1)
    r2, actions = sim.request("a")
    assert kinds(actions) == [("start", "a")]


def test_stale_events_from_an_older_instance_are_ignored():
    sim = Sim({"a": {}})
    r, _ = sim.request("a")
    sim.loaded("a")
    sim.finish(r)
    sim.send(ProcessExited("a", 1, "x", sim.now))
    sim.now += 10
    sim.request("a")  # instance 2 starts
    assert sim.send(ProcessExited("a", 1, "late news", sim.now)) == []
    assert sim.phase("a") is Phase.LOADING


def test_cancelled_waiter_does_not_keep_a_swap_pending():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    ra, _ = sim.request("a")
    sim.loaded("a")
    rb, _ = sim.request("b")
    sim.send(RequestCancelled(rb, sim.now))
    ra2, actions = sim.request("a")
    assert kinds(actions) == [("grant", ra2, "a")]


def test_admin_unload_waits_for_in_flight_then_stops_and_force_stops_at_once():
    sim = Sim({"a": {}})
    r, _ = sim.request("a")
    sim.loaded("a")
    assert sim.send(UnloadRequested("a", sim.now)) == []
    assert kinds(sim.finish(r)) == [("stop", "a", "admin")]
    sim.stopped("a")
    r2, _ = sim.request("a")
    sim.loaded("a")
    assert kinds(sim.send(UnloadRequested(None, sim.now, force=True))) == [("stop", "a", "admin")]


def test_drop_waiters_answers_everyone_with_503():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    ra, _ = sim.request("a")
    rb, _ = sim.request("b")
    actions = sim.send(DropWaiters("stopping", sim.now))
    assert {a.request_id for a in actions if isinstance(a, Reject)} == {ra, rb}
    assert all(a.status == 503 for a in actions if isinstance(a, Reject))


def test_views_report_state_queue_and_ttl():
    sim = Sim({"a": {"ttl_s": 30, "aliases": ["fast"]}})
    sim.request("a")
    (view,) = model_views(sim.core, sim.now)
    assert (view.state, view.queued, view.available_now, view.aliases) == ("loading", 1, False, ["fast"])
    sim.loaded("a")
    (view,) = model_views(sim.core, sim.now)
    assert (view.state, view.in_flight, view.available_now, view.last_load_ms) == ("ready", 1, True, 50)


# ---------------------------------------------------------------- memory and leases

INDEPENDENT = {"x": {"swap": True, "exclusive": False}, "y": {"swap": True, "exclusive": False},
               "z": {"swap": True, "exclusive": False}}  # fmt: skip
THREE = {"p": {"group": "x"}, "q": {"group": "y", "priority": 5}, "r": {"group": "z"}}


def memory_sim(total_mb: int = 10_000, **kwargs) -> Sim:
    sim = Sim(kwargs.pop("models", THREE), kwargs.pop("groups", INDEPENDENT),
              needs=kwargs.pop("needs", {"p": 4000, "q": 4000, "r": 4000}), **kwargs)  # fmt: skip
    sim.measure(total_mb)
    return sim


def test_loads_that_fit_run_side_by_side():
    sim = memory_sim()
    sim.serve("p")
    sim.serve("q")
    assert sim.phase("p") is sim.phase("q") is Phase.READY
    assert sim.core.free_mb() == 2000


def test_a_load_that_does_not_fit_stops_the_lowest_priority_idle_model_first():
    sim = memory_sim()
    sim.serve("q")  # priority 5
    sim.serve("p")  # priority 0, used after q
    r, actions = sim.request("r")
    assert kinds(actions) == [("stop", "p", "memory")]
    assert kinds(sim.stopped("p")) == [("start", "r")]


def test_among_equal_priorities_the_least_recently_used_goes():
    sim = memory_sim(models={"p": {"group": "x"}, "q": {"group": "y"}, "r": {"group": "z"}})
    sim.serve("p")
    sim.now += 1
    sim.serve("q")
    sim.now += 1
    sim.serve("p")  # p is now the most recent
    r, actions = sim.request("r")
    assert kinds(actions) == [("stop", "q", "memory")]


def test_a_busy_model_is_never_stopped_for_memory_it_drains_first():
    sim = memory_sim(needs={"p": 6000, "q": 6000, "r": 6000}, scheduler={"batching": False})
    busy, _ = sim.request("p")
    sim.loaded("p")
    r, actions = sim.request("r")
    assert actions == []
    p2, actions = sim.request("p")
    assert actions == []  # p drains for r: it takes no new requests meanwhile
    assert not available_now(sim.core, "p")
    assert kinds(sim.finish(busy)) == [("stop", "p", "memory")]
    assert kinds(sim.stopped("p")) == [("start", "r")]


def test_a_persistent_member_of_another_group_is_never_stopped_for_memory():
    groups = {**INDEPENDENT, "x": {"swap": True, "exclusive": False, "persistent": True}}
    sim = memory_sim(groups=groups, needs={"p": 6000, "q": 6000, "r": 6000})
    sim.serve("p")
    r, actions = sim.request("r")
    assert actions == []  # waits: nothing it may stop would make room
    assert sim.advance(31) and kinds(sim.log[-1:]) == [("reject", r, "queue_timeout")]
    assert sim.phase("p") is Phase.READY


def test_a_model_that_can_never_fit_is_refused_at_once_with_the_numbers():
    sim = memory_sim(total_mb=8000, reserve_mb=1000, needs={"p": 7500, "q": 10, "r": 10})
    r, actions = sim.request("p")
    assert kinds(actions) == [("reject", r, "insufficient_memory")]
    assert "7500 MB" in actions[0].message and "7000 MB are usable" in actions[0].message


def test_memory_used_by_other_programs_shrinks_the_budget():
    sim = memory_sim()
    sim.serve("p")
    # 3000 MB appear that are not ours (a game, say): 4000 (p) + 3000 foreign of 10000 used.
    sim.measure(10_000, used_mb=7000)
    assert sim.core.budget.foreign_mb == 3000
    q, actions = sim.request("q")
    assert kinds(actions) == [("stop", "p", "memory")]


def test_per_process_figures_attribute_usage_to_our_children():
    sim = memory_sim()
    sim.serve("p")
    pid = sim.core.models["p"].pid
    sim.measure(10_000, used_mb=5000, process_mb={pid: 4500, 999: 500})
    assert sim.core.budget.foreign_mb == 500


def test_a_lease_is_granted_at_once_when_memory_is_free_and_counts_against_loads():
    sim = memory_sim()
    lease, actions = sim.lease(7000)
    assert kinds(actions) == [("lease", lease)]
    p, actions = sim.request("p")
    assert actions == []  # 4000 does not fit next to the lease, and a lease is never evicted
    assert kinds(sim.send(LeaseReleased(lease, sim.now))) == [("lease_ended", lease, "released"), ("start", "p")]


def test_a_lease_displaces_idle_models_of_lower_priority_only():
    sim = memory_sim()
    sim.serve("p")  # priority 0
    sim.serve("q")  # priority 5
    lease, actions = sim.lease(5000, priority=3)
    assert kinds(actions) == [("stop", "p", "lease")]
    assert kinds(sim.stopped("p")) == [("lease", lease)]
    assert sim.phase("q") is Phase.READY


def test_a_lease_blocked_by_an_in_flight_request_is_granted_when_it_finishes():
    sim = memory_sim(needs={"p": 8000, "q": 1, "r": 1})
    busy, _ = sim.request("p")
    sim.loaded("p")
    lease, actions = sim.lease(5000)
    assert actions == []
    assert kinds(sim.finish(busy)) == [("stop", "p", "lease")]
    assert kinds(sim.stopped("p")) == [("lease", lease)]


def test_a_lease_that_cannot_be_placed_in_time_gets_503():
    sim = memory_sim()
    sim.serve("q")  # priority 5: a priority-1 lease may not displace it
    sim.serve("p")
    lease, actions = sim.lease(9000, priority=1, wait_s=2)
    # Stopping p (priority 0) alone would not make 9000 MB, and q may not be displaced: nothing is stopped in vain.
    assert actions == []
    assert kinds(sim.advance(2)) == [("reject", lease, "lease_timeout")]
    assert sim.phase("p") is sim.phase("q") is Phase.READY


def test_queued_leases_are_served_in_priority_order():
    sim = memory_sim()
    first, _ = sim.lease(8000)
    low, actions = sim.lease(6000, priority=1)
    high, actions = sim.lease(6000, priority=90)
    assert actions == []
    assert kinds(sim.send(LeaseReleased(first, sim.now))) == [("lease_ended", first, "released"), ("lease", high)]


def test_a_lease_expires_unless_renewed():
    sim = memory_sim()
    lease, _ = sim.lease(1000, ttl_s=10)
    sim.advance(8)
    sim.send(LeaseRenewed(lease, sim.now))
    assert sim.advance(9) == []
    assert kinds(sim.advance(1)) == [("lease_ended", lease, "expired")]
    assert sim.core.leases == {}


def test_a_waiting_load_holds_its_place_against_later_smaller_loads():
    sim = memory_sim(needs={"p": 7000, "q": 2000, "r": 2000})
    lease, _ = sim.lease(5000)
    p, actions = sim.request("p")  # needs 7000: waits for the lease
    r, actions = sim.request("r")  # 2000 would fit now, but would take memory p is waiting for
    assert actions == []
    ended = sim.send(LeaseReleased(lease, sim.now))
    assert kinds(ended) == [("lease_ended", lease, "released"), ("start", "p"), ("start", "r")]


def test_learned_need_replaces_the_estimate():
    sim = memory_sim()
    sim.send(NeedLearned("p", 9000, sim.now))
    sim.serve("q")
    p, actions = sim.request("p")
    assert kinds(actions) == [("stop", "q", "memory")]


# ---------------------------------------------------------------- cloud fallback, gaming mode, routes

FALLBACK_PAIR = {
    "a": {"group": "main", "fallback": "frontier", "fallback_after_ms": 2000},
    "b": {"group": "main", "fallback": "frontier", "fallback_after_ms": 2000},
}


def test_a_request_that_waits_past_fallback_after_ms_goes_to_the_cloud_and_the_load_goes_on():
    sim = Sim(FALLBACK_PAIR, MAIN_SWAP)
    ra, _ = sim.request("a")
    sim.loaded("a")  # a busy: b must wait for the swap
    rb, actions = sim.request("b")
    assert sim.core.next_wakeup() == pytest.approx(2.0)
    assert kinds(sim.advance(2.0)) == [("cloud", rb, "frontier", "swapping")]
    assert route(sim.core, "b", sim.now) == "cloud"
    # The swap it asked for still happens: a drains and stops, b loads, for the next request.
    assert kinds(sim.finish(ra)) == [("stop", "a", "swap")]
    assert kinds(sim.stopped("a")) == [("start", "b")]
    assert sim.core.waiters == {}  # the detached place is gone once b loads; nobody is answered twice
    rb2, _ = sim.request("b")
    assert kinds(sim.loaded("b")) == [("grant", rb2, "b")]


def test_x_local_only_and_local_only_models_never_go_to_the_cloud():
    sim = Sim({**FALLBACK_PAIR, "c": {"group": "main", "fallback": "frontier", "local_only": True}}, MAIN_SWAP)
    ra, _ = sim.request("a")
    sim.loaded("a")
    rb, _ = sim.request("b", local_only=True)
    rc, _ = sim.request("c")
    assert sim.advance(5) == []
    assert route(sim.core, "b", sim.now, local_only=True) == "queued"
    assert kinds(sim.advance(25)) == [("reject", rb, "queue_timeout"), ("reject", rc, "queue_timeout")]


def test_a_failed_load_sends_fallback_waiters_to_the_cloud_at_once():
    sim = Sim(FALLBACK_PAIR, MAIN_SWAP)
    r, _ = sim.request("a")
    assert kinds(sim.send(LoadFailed("a", 1, "boom", sim.now))) == [("cloud", r, "frontier", "model_load_failed")]


def test_gaming_mode_drains_and_stops_disallowed_models_and_sends_their_requests_away():
    models = {**FALLBACK_PAIR, "small": {"allow_in_gaming": True, "group": "side"}, "plain": {"group": "main"}}
    groups = {**MAIN_SWAP, "side": {"exclusive": False}}
    sim = Sim(models, groups)
    busy, _ = sim.request("a")
    sim.loaded("a")
    rs, _ = sim.request("small")
    sim.loaded("small", port=6001)
    sim.finish(rs)
    assert sim.send(GamingChanged(True, sim.now)) == []  # a has a request in flight: it finishes first
    assert not available_now(sim.core, "a") and available_now(sim.core, "small")
    r2, actions = sim.request("a")
    assert kinds(actions) == [("cloud", r2, "frontier", "gaming_mode")]
    rp, actions = sim.request("plain")
    assert kinds(actions) == [("reject", rp, "gaming_mode")]
    assert kinds(sim.finish(busy)) == [("stop", "a", "gaming")]
    sim.stopped("a")
    assert route(sim.core, "a", sim.now) == "cloud" and route(sim.core, "plain", sim.now) == "rejected"
    assert route(sim.core, "small", sim.now) == "local"


def test_x_force_big_loads_a_model_in_gaming_mode_which_then_stops_when_done():
    sim = Sim({"plain": {}})
    sim.send(GamingChanged(True, sim.now))
    r, actions = sim.request("plain", force=True)
    assert kinds(actions) == [("start", "plain")]
    assert kinds(sim.loaded("plain")) == [("grant", r, "plain")]
    assert kinds(sim.finish(r)) == [("stop", "plain", "gaming")]


def test_gaming_off_lets_models_load_again():
    sim = Sim({"plain": {}})
    sim.send(GamingChanged(True, sim.now))
    sim.send(GamingChanged(False, sim.now))
    r, actions = sim.request("plain")
    assert kinds(actions) == [("start", "plain")]


def test_eta_comes_from_the_last_load_and_what_must_stop_first():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    assert eta_ms(sim.core, "b", sim.now) is None  # never loaded: unknown
    sim.serve("b")  # load time 50 ms (Sim.loaded)
    ra, _ = sim.request("a")
    sim.stopped("b")
    sim.loaded("a")
    sim.finish(ra)
    assert eta_ms(sim.core, "a", sim.now) == 0
    assert eta_ms(sim.core, "b", sim.now) == 50 + 200  # its load, after stopping a
    busy, _ = sim.request("a")
    assert eta_ms(sim.core, "b", sim.now) is None  # a is busy: depends on when that finishes


# ---------------------------------------------------------------- swap-aware batching, residency

def test_batching_serves_what_is_queued_for_the_loaded_model_before_swapping_away():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, scheduler={"max_batch_wait_s": 10})
    busy, _ = sim.request("a")
    sim.loaded("a")
    rb, _ = sim.request("b")  # would swap a out...
    ra2, actions = sim.request("a")  # ...but a is loaded: this one goes first, no swap needed for it
    assert kinds(actions) == [("grant", ra2, "a")]
    assert available_now(sim.core, "a")
    sim.finish(busy)
    assert kinds(sim.finish(ra2)) == [("stop", "a", "swap")]  # nothing left for a: now b gets its turn
    assert kinds(sim.stopped("a")) == [("start", "b")]


def test_batching_is_bounded_so_a_waiting_swap_is_not_starved():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, scheduler={"max_batch_wait_s": 5})
    busy, _ = sim.request("a")
    sim.loaded("a")
    rb, _ = sim.request("b")
    assert sim.core.next_wakeup() == pytest.approx(5)
    sim.advance(4.9)
    r_early, actions = sim.request("a")
    assert kinds(actions) == [("grant", r_early, "a")]
    sim.advance(0.1)  # b has now waited max_batch_wait_s: it competes by arrival and comes first
    r_late, actions = sim.request("a")
    assert actions == [] and not available_now(sim.core, "a")
    sim.finish(busy)
    assert kinds(sim.finish(r_early)) == [("stop", "a", "swap")]
    assert kinds(sim.stopped("a")) == [("start", "b")]


def test_min_residency_keeps_a_fresh_model_loaded_for_a_while():
    sim = Sim(SWAP_PAIR, MAIN_SWAP, scheduler={"min_residency_s": 3})
    sim.serve("a")
    rb, actions = sim.request("b")
    assert actions == []  # a was loaded just now
    assert sim.core.next_wakeup() == pytest.approx(3)
    assert kinds(sim.advance(3)) == [("stop", "a", "swap")]


def test_the_next_model_is_read_ahead_once_while_the_one_in_its_way_drains():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    busy, _ = sim.request("a")
    sim.loaded("a")
    sim.request("b")
    assert sim.prewarmed == ["b"]
    sim.request("b")
    assert sim.prewarmed == ["b"]  # once per start, not per waiter
    sim.finish(busy)
    sim.stopped("a")
    sim.loaded("b")
    assert sim.prewarmed == ["b"]  # b did not have to wait again


# ---------------------------------------------------------------- config reload

def reloaded(sim: Sim, models: dict, groups: dict | None = None, needs: dict | None = None) -> list:
    config = parse_config({"groups": groups or {},
                           "models": {name: {"model": f"/m/{name}.gguf", **spec} for name, spec in models.items()}})
    return sim.send(ConfigReloaded(config, diff_configs(sim.core.config, config), needs or {}, sim.now))


def test_reload_keeps_unchanged_models_and_applies_settings_in_place():
    sim = Sim({"a": {"ttl_s": 100}, "b": {}}, {})
    sim.serve("a")
    pid = sim.core.models["a"].pid
    assert reloaded(sim, {"a": {"ttl_s": 5, "aliases": ["fast"]}, "b": {}}) == []
    assert sim.phase("a") is Phase.READY and sim.core.models["a"].pid == pid
    assert kinds(sim.advance(5)) == [("stop", "a", "ttl")]  # the new TTL counts


def test_reload_restarts_a_model_whose_args_changed_once_it_is_idle():
    sim = Sim({"a": {"args": ["-c", "512"]}}, {})
    busy, _ = sim.request("a")
    sim.loaded("a")
    assert reloaded(sim, {"a": {"args": ["-c", "1024"]}}) == []  # busy: drains first
    assert kinds(sim.finish(busy)) == [("stop", "a", "reload")]
    r, actions = sim.request("a")
    sim.stopped("a")
    assert sim.core.models["a"].config.args == ["-c", "1024"]
    assert kinds(sim.log[-1:]) == [("start", "a")]


def test_reload_removes_models_and_answers_their_waiters():
    sim = Sim(SWAP_PAIR, MAIN_SWAP)
    ra, _ = sim.request("a")
    sim.loaded("a")
    rb, _ = sim.request("b")
    actions = reloaded(sim, {"b": {"group": "main"}}, MAIN_SWAP)
    assert actions == []  # a is busy: it goes once done; b still waits for it
    actions = reloaded(sim, {"a": {"group": "main"}}, MAIN_SWAP)
    assert kinds(actions) == [("reject", rb, "model_removed")]
    assert "b" not in sim.core.models
    sim.finish(ra)
    sim.stopped("a")
    assert "a" in sim.core.models  # restored by the second reload: not dropped when it stops


def test_reload_adds_models():
    sim = Sim({"a": {}}, {})
    reloaded(sim, {"a": {}, "n": {"vram_mb": 10}})
    r, actions = sim.request("n")
    assert kinds(actions) == [("start", "n")]
    assert sim.core.models["n"].need_mb == 10


# ---------------------------------------------------------------- yielding to other programs' memory


def test_when_other_programs_grow_the_lowest_priority_idle_model_yields():
    sim = memory_sim()
    sim.serve("p")
    sim.serve("q")
    actions = sim.measure(10_000, used_mb=8000 + 3000)  # another program took 3000 MB: 1000 MB too many
    assert kinds(actions) == [("stop", "p", "memory_pressure")]
    assert "3000 MB" in sim.core.models["p"].last_stop[1]
    sim.stopped("p")
    assert sim.phase("q") is Phase.READY
    (view,) = [v for v in model_views(sim.core, sim.now) if v.name == "p"]
    assert view.last_stop["cause"] == "memory_pressure"


def test_an_overflow_below_the_margin_changes_nothing():
    sim = memory_sim(gpu={"yield_margin_mb": 500})
    sim.serve("p")
    sim.serve("q")
    assert sim.measure(10_000, used_mb=8000 + 2400) == []  # 400 MB over: within the margin


def test_yielding_can_be_turned_off():
    sim = memory_sim(gpu={"yield_to_others": False})
    sim.serve("p")
    sim.serve("q")
    assert sim.measure(10_000, used_mb=8000 + 5000) == []


def test_decisions_are_at_least_yield_interval_apart_so_models_do_not_flap():
    sim = memory_sim(gpu={"yield_interval_s": 10})
    sim.serve("p")
    sim.serve("q")
    assert kinds(sim.measure(10_000, used_mb=8000 + 3000)) == [("stop", "p", "memory_pressure")]
    sim.stopped("p")
    sim.now += 1
    assert sim.measure(10_000, used_mb=4000 + 7000) == []  # grew again, 1 s later: not yet
    sim.now += 10
    assert kinds(sim.measure(10_000, used_mb=4000 + 7000)) == [("stop", "q", "memory_pressure")]


def test_a_busy_model_drains_before_it_yields_and_idle_ones_go_first():
    sim = memory_sim()
    busy, _ = sim.request("p")
    sim.loaded("p")
    sim.serve("q")  # idle, higher priority: still goes before the busy one
    assert kinds(sim.measure(10_000, used_mb=8000 + 3000)) == [("stop", "q", "memory_pressure")]
    sim.stopped("q")
    sim.now += 11
    actions = sim.measure(10_000, used_mb=4000 + 7000)
    assert actions == [] and sim.core.models["p"].unload_requested  # drains: its request finishes first
    assert kinds(sim.finish(busy)) == [("stop", "p", "memory_pressure")]


def test_a_persistent_model_yields_last():
    groups = {**INDEPENDENT, "keep": {"swap": True, "exclusive": False, "persistent": True}}
    models = {"p": {"group": "keep"}, "q": {"group": "y", "priority": 5}, "r": {"group": "z"}}
    sim = memory_sim(models=models, groups=groups)
    sim.serve("p")
    sim.serve("q")
    assert kinds(sim.measure(10_000, used_mb=8000 + 3000)) == [("stop", "q", "memory_pressure")]


# ---------------------------------------------------------------- home models


HOME_GROUPS = {"main": {"swap": True, "exclusive": True, "home": "small"}}
HOME_MODELS = {"small": {"group": "main"}, "big": {"group": "main", "ttl_s": 60}}


def test_the_home_model_loads_when_nothing_is_wanted_and_comes_back_after_the_big_one_idles_out():
    sim = Sim(HOME_MODELS, HOME_GROUPS)
    assert [(a.model, a.cause) for a in sim.advance(0) if isinstance(a, StartProcess)] == [("small", "home")]
    sim.loaded("small")
    request_id, actions = sim.request("big")
    assert kinds(actions) == [("stop", "small", "swap")]  # a request wins over the home model
    sim.stopped("small")
    sim.loaded("big")
    sim.finish(request_id)
    assert sim.core.next_wakeup() == pytest.approx(60)
    actions = sim.advance(60)
    assert kinds(actions) == [("stop", "big", "ttl")]
    actions = sim.stopped("big")
    assert kinds(actions) == [("start", "small")]  # home again
    sim.loaded("small")
    sim.advance(3600)
    assert sim.phase("small") is Phase.READY  # no TTL for a home model, and no busy timer either
    assert sim.core.next_wakeup() is None


def test_a_home_model_never_displaces_anything_nor_loads_while_requests_wait():
    sim = Sim(HOME_MODELS, HOME_GROUPS)
    request_id, actions = sim.request("big")
    assert kinds(actions) == [("start", "big")]
    sim.loaded("big")
    sim.finish(request_id)
    assert not any(isinstance(a, StartProcess) for a in sim.advance(10))  # big is resident (idle): it stays


def test_a_home_model_that_does_not_fit_in_free_memory_is_not_loaded():
    sim = Sim({"small": {"group": "side"}, "other": {"group": "side2"}},
              {"side": {"swap": True, "exclusive": False, "home": "small"}, "side2": {"swap": True, "exclusive": False}},
              needs={"small": 3000, "other": 8000})
    sim.measure(10_000)  # the first reading: small fits, and loads
    assert [a.model for a in sim.log if isinstance(a, StartProcess)] == ["small"]
    sim.loaded("small")
    sim.send(UnloadRequested("small", sim.now))
    sim.stopped("small")
    sim.serve("other")  # a request clears the administrator's unload, but 8000 + 3000 > 10000: no room
    assert sim.phase("small") is Phase.UNLOADED


def test_an_administrator_unload_of_the_home_model_holds_until_the_next_request():
    sim = Sim(HOME_MODELS, HOME_GROUPS)
    sim.advance(0)
    sim.loaded("small")
    sim.send(UnloadRequested("small", sim.now))
    assert not any(isinstance(a, StartProcess) for a in sim.stopped("small"))
    sim.serve("big")
    sim.send(UnloadRequested("big", sim.now, cause="ttl"))
    assert kinds(sim.stopped("big")) == [("start", "small")]


def test_no_home_load_during_shutdown():
    sim = Sim(HOME_MODELS, HOME_GROUPS)
    sim.advance(0)
    sim.loaded("small")
    sim.send(UnloadRequested(None, sim.now, force=True, cause="shutdown"))
    assert kinds(sim.stopped("small")) == []


def test_what_fell_due_is_never_a_wakeup_again():
    """An overdue batching waiter (or a retry held back) stays in the queue; its time must not keep the timer
    firing: the daemon would spin and starve the models of CPU."""
    sim = Sim(SWAP_PAIR, MAIN_SWAP, scheduler={"max_batch_wait_s": 1})
    held, _ = sim.request("a")
    sim.loaded("a")
    sim.request("b")  # waits for a to drain; overdue for batching after 1 s
    assert sim.core.next_wakeup() == pytest.approx(1.0)
    sim.advance(1.0)
    wakeup = sim.core.next_wakeup()
    assert wakeup is None or wakeup > sim.now


def test_a_reload_that_changes_a_models_file_forgets_how_long_its_last_load_took():
    sim = Sim({"a": {}})
    ra, _ = sim.request("a")
    loaded_after(sim, "a", 3.0)
    sim.finish(ra)
    reloaded(sim, {"a": {"args": ["-c", "8192"]}})  # restarts once idle: its next load is another one
    sim.stopped("a")
    r1, actions = sim.request("a", wait_s=0.5)
    assert kinds(actions) == [("start", "a")]  # not answered at once: nothing says this load takes 3 s
    assert sim.core.models["a"].last_load_s is None
