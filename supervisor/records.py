"""What the request path reports about each request it handled, for the usage ledger and the metrics."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

TAIL_BYTES = 8192  # enough for the last SSE event or the end of a JSON body, where usage figures sit
_USAGE = re.compile(rb'"(usage|timings)"\s*:\s*')


@dataclass(frozen=True)
class RequestRecord:
    started_at: float  # unix time the request arrived
    requested: str  # the name the client used (a model, an alias, or a cloud target)
    model: str  # the configured model it resolved to, or the cloud target asked for by name
    provider: str  # "local", or the [cloud.*] target that served it
    route: str  # "local" | "cloud" | "rejected"
    endpoint: str  # e.g. /v1/chat/completions
    status: int  # HTTP status sent to the client (499: the client went away)
    fallback_reason: str | None
    tokens_in: int | None
    tokens_out: int | None
    wait_ms: float  # waiting for the model (queue, load, swap)
    ttft_ms: float | None  # arrival to the first response byte
    total_ms: float


RequestObserver = Callable[[RequestRecord], None]


class ResponseTail:
    """Keeps the first-byte time and the last few KB of a response body as it streams through, without copying
    or parsing the body: usage figures are read from the tail once the response is complete."""

    def __init__(self) -> None:
        self.first_byte_at: float | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0

    def add(self, chunk: bytes, now: float) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = now
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._chunks and self._size - len(self._chunks[0]) >= TAIL_BYTES:
            self._size -= len(self._chunks.popleft())

    def tokens(self) -> tuple[int | None, int | None]:
        return tokens_from_tail(b"".join(self._chunks))


_DECODER = json.JSONDecoder()
_OBJECT_BYTES = 2048  # a usage or timings object is a few hundred bytes


def _last_object(tail: bytes, starts: list[int]) -> dict | None:
    """The JSON object at the last of these offsets that holds one (a cut-off last one yields to the one before)."""
    for start in reversed(starts):
        for end in (start + _OBJECT_BYTES, len(tail)):  # a short slice first: decoding it is most of the cost
            try:
                value, _ = _DECODER.raw_decode(tail[start:end].decode("utf-8", errors="replace"))
            except ValueError:
                if end >= len(tail):
                    break
                continue
            if isinstance(value, dict):
                return value
            break
    return None


def tokens_from_tail(tail: bytes) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) from the last OpenAI `usage` object, else llama.cpp's `timings`."""
    starts: dict[bytes, list[int]] = {b"usage": [], b"timings": []}
    for match in _USAGE.finditer(tail):
        starts[match.group(1)].append(match.end())
    usage = _last_object(tail, starts[b"usage"])
    if usage is not None:
        return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    timings = _last_object(tail, starts[b"timings"])
    if timings is not None:
        prompt = _int(timings.get("prompt_n"))
        cached = _int(timings.get("cache_n")) or 0
        return (None if prompt is None else prompt + cached), _int(timings.get("predicted_n"))
    return None, None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
