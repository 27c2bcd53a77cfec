"""Prometheus metrics: counters and histograms fed by what happens, gauges read from live state at scrape time.

Events come from the driver's observers (loads, unloads, fallbacks, leases) and the proxy's request records
(routes, statuses, tokens, waits). Gauges (state, in-flight, queue depth, memory) are not kept up to date by hand:
a collector reads them from the driver when Prometheus scrapes, so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .records import RequestRecord
from .scheduler import Phase

PREFIX = "model_supervisor"
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MB = 1024 * 1024


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, driver: Any):
        self.driver = driver
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.loads = Counter(f"{PREFIX}_loads", "Model loads started, by cause (request, admin)",
                             ["model", "cause"], registry=r)  # fmt: skip
        self.load_failures = Counter(f"{PREFIX}_load_failures", "Model loads that failed", ["model"], registry=r)
        self.unloads = Counter(f"{PREFIX}_unloads", "Models stopped, by cause (ttl, swap and memory are evictions, "
                               "lease, gaming, admin, shutdown, crash)", ["model", "cause"], registry=r)  # fmt: skip
        self.load_seconds = Histogram(f"{PREFIX}_load_seconds", "Time from spawn to ready", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)  # fmt: skip
        self.requests = Counter(f"{PREFIX}_requests", "Requests by route (local, cloud, rejected) and status",
                                ["model", "route", "status"], registry=r)  # fmt: skip
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited for its model",
                                    ["model"], buckets=WAIT_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens in (prompt) and out (completion), by provider",
                              ["model", "provider", "direction"], registry=r)  # fmt: skip
        self.fallbacks = Counter(f"{PREFIX}_fallbacks", "Requests sent to a cloud target instead of the local model",
                                 ["model", "reason"], registry=r)  # fmt: skip
        self.leases = Counter(f"{PREFIX}_lease_events", "Leases granted, and ended by reason (released, expired, "
                              "holder_died)", ["event"], registry=r)  # fmt: skip
        r.register(_LiveState(driver))

    def on_event(self, kind: str, fields: dict[str, Any]) -> None:
        """A driver observer."""
        model = fields.get("model", "")
        if kind == "starting":
            self.loads.labels(model, fields.get("cause", "request")).inc()
        elif kind == "spawned":
            self.load_seconds.labels(model).observe(fields["load_s"])
        elif kind == "load_failed":
            self.load_failures.labels(model).inc()
        elif kind in ("stopped", "exited"):
            self.unloads.labels(model, fields.get("cause", "unknown")).inc()
        elif kind == "fallback":
            self.fallbacks.labels(model, fields["reason"]).inc()
        elif kind == "lease_granted":
            self.leases.labels("granted").inc()
        elif kind == "lease_ended":
            self.leases.labels(fields["reason"]).inc()

    def on_request(self, record: RequestRecord) -> None:
        """A proxy observer."""
        self.requests.labels(record.model, record.route, str(record.status)).inc()
        if record.route != "rejected":
            self.queue_wait.labels(record.model).observe(record.wait_ms / 1000)
        if record.tokens_in:
            self.tokens.labels(record.model, record.provider, "in").inc(record.tokens_in)
        if record.tokens_out:
            self.tokens.labels(record.model, record.provider, "out").inc(record.tokens_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges read from the driver at scrape time."""

    def __init__(self, driver: Any):
        self.driver = driver

    def collect(self) -> Iterator[GaugeMetricFamily]:
        core = self.driver.core
        state = GaugeMetricFamily(f"{PREFIX}_model_state", "1 for the state each model is in", labels=["model", "state"])
        in_flight = GaugeMetricFamily(f"{PREFIX}_in_flight", "Requests being served", labels=["model"])
        queued = GaugeMetricFamily(f"{PREFIX}_queued", "Requests waiting for the model", labels=["model"])
        need = GaugeMetricFamily(f"{PREFIX}_model_memory_bytes", "What the model holds once loaded (config, "
                                 "estimate or measured)", labels=["model"])  # fmt: skip
        waiting: dict[str, int] = {}
        for waiter in core.waiters.values():
            if waiter.kind == "request" and not waiter.detached:
                waiting[waiter.model] = waiting.get(waiter.model, 0) + 1
        for name, model in core.models.items():
            for phase in Phase:
                state.add_metric([name, phase.value], 1.0 if model.phase is phase else 0.0)
            in_flight.add_metric([name], model.in_flight)
            queued.add_metric([name], waiting.get(name, 0))
            need.add_metric([name], model.need_mb * MB)
        yield from (state, in_flight, queued, need)

        yield GaugeMetricFamily(f"{PREFIX}_gaming_mode", "1 while gaming mode is on", value=float(core.gaming))
        leases = GaugeMetricFamily(f"{PREFIX}_leases", "Leases held and waiting", labels=["status"])
        leases.add_metric(["held"], len(core.leases))
        leases.add_metric(["queued"], sum(1 for w in core.waiters.values() if w.kind == "lease"))
        yield leases

        snapshot, budget = self.driver.snapshot, core.budget
        if snapshot is None or budget is None:
            return
        memory = GaugeMetricFamily(f"{PREFIX}_memory_bytes", "Device memory by kind: total, used, free (as the "
                                   "probe reads them), gtt_total, gtt_used, reserve, foreign (other programs), "
                                   "models and leases (reserved by the daemon)", labels=["device", "pool", "kind"])  # fmt: skip
        models_mb, leases_mb = core.committed_mb()
        figures = {"total": snapshot.total_mb, "used": snapshot.used_mb, "free": snapshot.free_mb,
                   "reserve": budget.reserve_mb, "foreign": budget.foreign_mb, "models": models_mb,
                   "leases": leases_mb, "gtt_total": snapshot.gtt_total_mb, "gtt_used": snapshot.gtt_used_mb}  # fmt: skip
        for kind, value in figures.items():
            if value is not None:
                memory.add_metric([snapshot.device, snapshot.pool, kind], value * MB)
        yield memory
