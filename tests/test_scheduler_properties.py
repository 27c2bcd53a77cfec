"""Random interleavings of everything that can happen, checked against the rules that must always hold."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from model_supervisor.config import diff_configs, parse_config
from model_supervisor.scheduler import (
    RESIDENT,
    Fallback,
    ConfigReloaded,
    GamingChanged,
    Grant,
    GrantLease,
    LeaseEnded,
    LeaseReleased,
    LeaseRequested,
    LoadFailed,
    MemoryMeasured,
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
)

MODELS = ["a", "b", "c", "e"]
RAW = {
    "daemon": {"queue_timeout_s": 5},
    "scheduler": {"max_batch_wait_s": 2, "min_residency_s": 0.5},
    "cloud": {"frontier": {"base_url": "http://127.0.0.1:9", "model": "big"}},
    "groups": {
        "main": {"swap": True, "exclusive": True},
        "side": {"swap": True, "exclusive": False, "home": "c"},
        "keep": {"swap": True, "exclusive": False, "persistent": True},
    },
    "models": {
        "a": {"model": "/a", "group": "main", "ttl_s": 3, "fallback": "frontier", "fallback_after_ms": 1500},
        "b": {"model": "/b", "group": "main", "priority": 2},
        "c": {"model": "/c", "group": "side", "ttl_s": 1, "allow_in_gaming": True, "fallback": "frontier",
              "fallback_after_ms": 0},
        "e": {"model": "/e", "group": "keep"},
    },
}  # fmt: skip
CONFIG = parse_config(RAW)
# What a reload may bring: the same config, one without b, one where a's args changed.
RELOADS = [
    CONFIG,
    parse_config({**RAW, "models": {k: v for k, v in RAW["models"].items() if k != "b"}}),
    parse_config({**RAW, "models": {**RAW["models"], "a": {**RAW["models"]["a"], "args": ["-c", "99"]}}}),
]


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = SchedulerCore(CONFIG, {"a": 5000, "b": 5000, "c": 3000, "e": 2000})
        reading = MemorySnapshot("fixed", "test device", "vram", total_mb=11_000, used_mb=0)
        self.core.handle(MemoryMeasured(reading, now=0.0))  # reserve 1024: 9976 usable
        self.leases: set[int] = set()
        self.orphaned: set[int] = set()
        self.now = 0.0
        self.ids = 0
        self.answers: dict[int, str] = {}  # request id -> "grant" | "reject"
        self.waiting: set[int] = set()
        self.granted: dict[int, str] = {}
        self.starting: dict[str, int] = {}  # model -> instance being started
        self.stopping: dict[str, int] = {}
        self.forced = False

    def apply(self, event) -> None:
        self.forced = isinstance(event, UnloadRequested) and event.force
        for action in self.core.handle(event):
            match action:
                case Grant():
                    assert action.request_id not in self.answers, "answered twice"
                    self.answers[action.request_id] = "grant"
                    self.waiting.discard(action.request_id)
                    self.granted[action.request_id] = action.model
                case GrantLease():
                    assert action.lease_id not in self.answers, "answered twice"
                    self.answers[action.lease_id] = "lease"
                    self.waiting.discard(action.lease_id)
                    self.leases.add(action.lease_id)
                case LeaseEnded():
                    self.leases.discard(action.lease_id)
                case Fallback():
                    assert action.request_id not in self.answers, "answered twice"
                    self.answers[action.request_id] = "cloud"
                    self.waiting.discard(action.request_id)
                case Reject():
                    assert action.request_id not in self.answers, "answered twice"
                    self.answers[action.request_id] = "reject"
                    self.waiting.discard(action.request_id)
                case StartProcess():
                    assert action.model not in self.starting and action.model not in self.stopping
                    if self.core.gaming and not self.core.models[action.model].config.allow_in_gaming:
                        assert any(w.model == action.model and w.force for w in self.core.waiters.values()), \
                            f"{action.model} started in gaming mode without X-Force-Big"
                    self.starting[action.model] = action.instance
                case StopProcess():
                    busy = sum(1 for r, m in self.granted.items() if m == action.model and r not in self.orphaned)
                    assert busy == 0 or self.forced, f"{action.model} stopped with {busy} requests in flight"
                    self.starting.pop(action.model, None)
                    self.stopping[action.model] = action.instance

    @rule(config=st.sampled_from(RELOADS))
    def reload(self, config):
        self.apply(ConfigReloaded(config, diff_configs(self.core.config, config), {}, self.now))

    @rule(model=st.sampled_from(MODELS), local_only=st.booleans(), force=st.booleans())
    def request(self, model, local_only, force):
        if model not in self.core.models:
            return  # the proxy answers 404 for a model the config no longer has
        self.ids += 1
        self.waiting.add(self.ids)
        self.apply(RequestArrived(self.ids, model, self.now, self.now + 5, local_only=local_only, force=force))

    @rule(enabled=st.booleans())
    def gaming(self, enabled):
        self.apply(GamingChanged(enabled, self.now))

    @rule(mb=st.sampled_from([1000, 3000, 6000, 12000]), priority=st.sampled_from([-1, 1, 10]))
    def lease(self, mb, priority):
        self.ids += 1
        self.waiting.add(self.ids)
        self.apply(LeaseRequested(self.ids, "job", mb, priority, None, 4, self.now, self.now + 5))

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release_lease(self, data):
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        self.apply(LeaseReleased(lease_id, self.now))

    @precondition(lambda self: self.granted)
    @rule(data=st.data())
    def finish(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.granted)))
        del self.granted[request_id]
        self.apply(RequestFinished(request_id, self.now))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def cancel(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.waiting)))
        self.waiting.discard(request_id)
        self.answers[request_id] = "cancelled"
        self.apply(RequestCancelled(request_id, self.now))

    @precondition(lambda self: self.starting)
    @rule(data=st.data(), ok=st.booleans())
    def load_result(self, data, ok):
        model = data.draw(st.sampled_from(sorted(self.starting)))
        instance = self.starting.pop(model)
        if ok:
            self.apply(LoadSucceeded(model, instance, Upstream("http://127.0.0.1:7000", 1, 7000), 0.1, self.now))
        else:
            self.apply(LoadFailed(model, instance, "boom", self.now))

    @precondition(lambda self: self.stopping)
    @rule(data=st.data())
    def stop_done(self, data):
        model = data.draw(st.sampled_from(sorted(self.stopping)))
        # Whatever a (forced) stop cut off still finishes, with an error, but holds nothing any more.
        self.orphaned |= {r for r, m in self.granted.items() if m == model}
        self.apply(StopCompleted(model, self.stopping.pop(model), self.now))

    @rule(model=st.sampled_from(MODELS))
    def crash(self, model):
        state = self.core.models.get(model)
        if state is not None and state.phase is Phase.READY and model not in self.stopping:
            self.apply(ProcessExited(model, state.instance, "crash", self.now))
            # Its requests fail with it: they still finish (with an error) but no longer hold the model.
            self.orphaned |= {rid for rid, m in self.granted.items() if m == model}

    @rule(model=st.sampled_from([*MODELS, None]), force=st.booleans())
    def unload(self, model, force):
        self.apply(UnloadRequested(model, self.now, force=force))

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 3.0, 6.0]))
    def advance(self, dt):
        self.now += dt
        self.apply(Tick(self.now))

    @invariant()
    def one_member_of_the_swap_group_at_a_time(self):
        # An outgoing member may still be stopping while the incoming one loads (overlap_swaps, when memory holds
        # both: the budget invariant below), but never two that load or serve.
        live = [m for m in ("a", "b") if m in self.core.models
                and self.core.models[m].phase in (Phase.LOADING, Phase.READY)]
        assert len(live) <= 1, live

    @invariant()
    def memory_committed_never_exceeds_the_budget(self):
        models_mb, leases_mb = self.core.committed_mb()
        assert models_mb + leases_mb <= self.core.budget.usable_mb, (models_mb, leases_mb)

    @invariant()
    def gaming_mode_keeps_disallowed_models_from_loading_for_plain_requests(self):
        if not self.core.gaming:
            return
        plain = [w for w in self.core.waiters.values() if w.kind == "request" and not w.force and not w.detached]
        assert all(self.core.models[w.model].config.allow_in_gaming for w in plain)

    @invariant()
    def in_flight_matches_what_was_granted(self):
        for name, state in self.core.models.items():
            assert state.in_flight == sum(1 for r, m in self.granted.items() if m == name and r not in self.orphaned)

    @invariant()
    def persistent_model_is_only_stopped_by_ttl_admin_or_crash(self):
        # 'e' has no TTL, so only an unload or a crash may take it down; never a swap for another group.
        assert self.core.models["e"].phase is not Phase.UNLOADING or "e" in self.stopping

    @invariant()
    def nobody_waits_past_their_deadline(self):
        for waiter in self.core.waiters.values():
            assert waiter.deadline > self.now or waiter.deadline == self.now

    def teardown(self):
        # Let every effect finish and time run out: each request must have had exactly one answer.
        for _ in range(50):
            if self.starting:
                model, instance = next(iter(self.starting.items()))
                del self.starting[model]
                self.apply(LoadSucceeded(model, instance, Upstream("http://127.0.0.1:7000", 1, 7000), 0.1, self.now))
            elif self.stopping:
                model, instance = next(iter(self.stopping.items()))
                del self.stopping[model]
                self.orphaned |= {r for r, m in self.granted.items() if m == model}
                self.apply(StopCompleted(model, instance, self.now))
            elif self.granted:
                self.apply(RequestFinished(self.granted.popitem()[0], self.now))
            elif self.leases:
                self.apply(LeaseReleased(next(iter(self.leases)), self.now))
            else:
                self.now += 40
                self.apply(Tick(self.now))
        assert not self.core.waiters
        assert set(self.answers) == set(range(1, self.ids + 1))


SchedulerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestScheduler = SchedulerMachine.TestCase
