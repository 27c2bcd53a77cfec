"""The one error type a client is answered with; the HTTP layer turns it into OpenAI-style JSON."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An answer that is not a success: status, machine-readable code, a message for a person, and optionally
    Retry-After and extra top-level fields. Raised by handlers and by the runtime (a refused request or lease)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s, self.extra = retry_after_s, extra
