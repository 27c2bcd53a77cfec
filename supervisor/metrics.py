"""Prometheus metrics: counters and histograms fed by what happens, gauges read from live state at scrape time.

Counters come from the runtime's typed notices (loads, unloads, fallbacks, leases) and the proxy's request
records (routes, statuses, tokens, waits). Gauges (state, in-flight, queue depth, memory) are not kept up to date
by hand: at each scrape a collector reads them from the same status snapshot /status shows, so they can never
drift from the truth.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .notices import ChildExited, ChildStopped, FellBack, LeaseFinished, LeaseGranted, LoadFailedNotice, LoadReady
from .notices import LoadStarting, Notice, PromptCacheRestored, PromptCacheSaved
from .records import RequestRecord
from .scheduler import Phase

if TYPE_CHECKING:
    from .http.documents import StatusSnapshot

PREFIX = "model_supervisor"
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MB = 1024 * 1024


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, snapshot: Callable[[], StatusSnapshot]):
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
        self.cache_ops = Counter(f"{PREFIX}_prompt_cache_operations", "Prompt-cache saves (before a stop) and restores "
                                 "(after a load)", ["model", "operation"], registry=r)  # fmt: skip
        self.cache_tokens = Counter(f"{PREFIX}_prompt_cache_tokens", "Tokens of prompt cache saved and restored",
                                    ["model", "operation"], registry=r)  # fmt: skip
        self.cache_bytes = Counter(f"{PREFIX}_prompt_cache_bytes", "Bytes of prompt cache written and read",
                                   ["model", "operation"], registry=r)  # fmt: skip
        self.cache_seconds = Histogram(f"{PREFIX}_prompt_cache_seconds", "Time spent saving or restoring slots",
                                       ["model", "operation"], buckets=WAIT_BUCKETS, registry=r)  # fmt: skip
        self.health_checks = Counter(f"{PREFIX}_health_checks", "X-Health-Check probes answered (they load nothing "
                                     "and are not requests), by result (ok, unavailable)", ["model", "result"],
                                     registry=r)  # fmt: skip
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "Arrival to the last response byte, by route",
                                  ["model", "route"], buckets=DURATION_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram(f"{PREFIX}_time_to_first_byte_seconds", "Arrival to the first response byte (the first "
                              "token of a stream), by route", ["model", "route"], buckets=DURATION_BUCKETS,
                              registry=r)  # fmt: skip
        build = Info(f"{PREFIX}_build", "The daemon's version and Python", registry=r)
        build.info({"version": _version(), "python": platform.python_version()})
        r.register(_LiveState(snapshot))
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def on_probe(self, model: str, ok: bool) -> None:
        """A proxy probe observer."""
        self.health_checks.labels(model, "ok" if ok else "unavailable").inc()

    def on_notice(self, notice: Notice) -> None:
        """A runtime observer."""
        match notice:
            case LoadStarting():
                self.loads.labels(notice.model, notice.cause).inc()
            case LoadReady():
                self.load_seconds.labels(notice.model).observe(notice.load_s)
            case LoadFailedNotice():
                self.load_failures.labels(notice.model).inc()
            case ChildStopped() | ChildExited():
                self.unloads.labels(notice.model, notice.cause).inc()
            case FellBack():
                self.fallbacks.labels(notice.model, notice.reason).inc()
            case LeaseGranted():
                self.leases.labels("granted").inc()
            case LeaseFinished():
                self.leases.labels(notice.reason).inc()
            case PromptCacheSaved() | PromptCacheRestored():
                operation = "save" if isinstance(notice, PromptCacheSaved) else "restore"
                self.cache_ops.labels(notice.model, operation).inc()
                self.cache_tokens.labels(notice.model, operation).inc(notice.tokens)
                self.cache_bytes.labels(notice.model, operation).inc(notice.bytes)
                self.cache_seconds.labels(notice.model, operation).observe(notice.seconds)

    def on_request(self, record: RequestRecord) -> None:
        """A proxy observer."""
        series = self._series
        model, route = record.model, record.route
        series(self.requests, model, route, str(record.status)).inc()
        if route != "rejected":
            series(self.queue_wait, model).observe(record.wait_ms / 1000)
            series(self.duration, model, route).observe(record.total_ms / 1000)
            if record.ttft_ms is not None:
                series(self.ttft, model, route).observe(record.ttft_ms / 1000)
        if record.tokens_in:
            series(self.tokens, model, record.provider, "in").inc(record.tokens_in)
        if record.tokens_out:
            series(self.tokens, model, record.provider, "out").inc(record.tokens_out)

    def _series(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), looked up once: labels() validates and locks on every call, which was most of
        this observer's time per request."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges read from a status snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], StatusSnapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot()
        state = GaugeMetricFamily(f"{PREFIX}_model_state", "1 for the state each model is in", labels=["model", "state"])
        in_flight = GaugeMetricFamily(f"{PREFIX}_in_flight", "Requests being served", labels=["model"])
        queued = GaugeMetricFamily(f"{PREFIX}_queued", "Requests waiting for the model", labels=["model"])
        need = GaugeMetricFamily(f"{PREFIX}_model_memory_bytes", "What the model holds once loaded (config, "
                                 "estimate or measured)", labels=["model"])  # fmt: skip
        for name, view in snap.models.items():
            for phase in Phase:
                state.add_metric([name, phase.value], 1.0 if view.state == phase.value else 0.0)
            in_flight.add_metric([name], view.in_flight)
            queued.add_metric([name], view.queued)
            need.add_metric([name], view.need_mb * MB)
        yield from (state, in_flight, queued, need)

        yield GaugeMetricFamily(f"{PREFIX}_gaming_mode", "1 while gaming mode is on", value=float(snap.gaming))
        leases = GaugeMetricFamily(f"{PREFIX}_leases", "Leases held and waiting", labels=["status"])
        leases.add_metric(["held"], len(snap.leases))
        leases.add_metric(["queued"], snap.leases_queued)
        yield leases

        if not snap.memory:
            return
        memory = GaugeMetricFamily(f"{PREFIX}_memory_bytes", "Device memory by kind: total, used, free (as the "
                                   "probe reads them), gtt_total, gtt_used, reserve, foreign (other programs), "
                                   "models and leases (reserved by the daemon)", labels=["device", "pool", "kind"])  # fmt: skip
        for device in snap.memory:
            for kind in ("total", "used", "free", "reserve", "foreign", "models", "leases", "gtt_total", "gtt_used"):
                value = device.get(f"{kind}_mb")
                if value is not None:
                    memory.add_metric([device["device"], device["pool"], kind], value * MB)
        yield memory


def _version() -> str:
    try:
        return importlib.metadata.version("model-supervisor")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
