"""What happened lately, for people: the last loads, unloads and failures (the swap timeline) and each model's
recent latency. Fed by the runtime's notices and the request path's records; bounded; read by the status
documents (dashboard, CLI)."""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any

from .notices import ChildExited, ChildStopped, LoadFailedNotice, LoadReady, LoadStarting, Notice
from .records import RequestRecord

TIMELINE_LENGTH = 50
LATENCY_WINDOW = 100  # requests per model


class History:
    def __init__(self) -> None:
        self._timeline: collections.deque[dict[str, Any]] = collections.deque(maxlen=TIMELINE_LENGTH)
        self._causes: dict[str, str] = {}  # model -> cause of the load in progress
        self._records: dict[str, collections.deque[RequestRecord]] = {}

    def on_notice(self, notice: Notice) -> None:
        at = round(time.time(), 3)
        match notice:
            case LoadStarting():
                self._causes[notice.model] = notice.cause
            case LoadReady():
                entry: dict[str, Any] = {"at": at, "model": notice.model, "event": "loaded",
                                         "cause": self._causes.pop(notice.model, "request"),
                                         "ms": round(notice.load_s * 1000)}
                if notice.displaced:
                    entry["displaced"] = list(notice.displaced)
                    entry["swap_ms"] = round((notice.swap_s or 0) * 1000)
                self._timeline.append(entry)
            case LoadFailedNotice():
                self._causes.pop(notice.model, None)
                self._timeline.append({"at": at, "model": notice.model, "event": "load_failed",
                                       "cause": notice.error.splitlines()[0][:200]})
            case ChildStopped():
                self._timeline.append({"at": at, "model": notice.model, "event": "unloaded", "cause": notice.cause,
                                       "ms": round(notice.seconds * 1000)})
            case ChildExited():
                self._timeline.append({"at": at, "model": notice.model, "event": "crashed",
                                       "cause": f"exit code {notice.code}"})

    def on_request(self, record: RequestRecord) -> None:
        if record.route != "local":
            return
        self._records.setdefault(record.model, collections.deque(maxlen=LATENCY_WINDOW)).append(record)

    def timeline(self) -> list[dict[str, Any]]:
        return list(self._timeline)

    def latency(self) -> dict[str, dict[str, Any]]:
        """Per model, over its last requests served locally: p50 time to first byte and tokens per second."""
        out: dict[str, dict[str, Any]] = {}
        for model, records in self._records.items():
            ttfts = [r.ttft_ms for r in records if r.ttft_ms is not None]
            rates = [r.tokens_out / ((r.total_ms - r.ttft_ms) / 1000) for r in records
                     if r.tokens_out and r.ttft_ms is not None and r.total_ms - r.ttft_ms > 1]
            out[model] = {"requests": len(records),
                          "ttft_p50_ms": round(statistics.median(ttfts), 1) if ttfts else None,
                          "tokens_per_s": round(statistics.median(rates), 1) if rates else None}
        return out
