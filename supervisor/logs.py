"""structlog setup: readable lines on a terminal, JSON lines otherwise (journald, files, pipes).

Libraries that log through the standard logging module (aiohttp) go through the same renderer, so the log is one
format. A malformed request is the client's fault, not the daemon's: it is one line, never a traceback.
"""

from __future__ import annotations

import logging
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError

log = structlog.get_logger("supervisor.http")


class ClientErrorsInOneLine(logging.Filter):
    """aiohttp logs a traceback for every request it cannot parse; a hostile client could fill the journal."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            log.info("bad_http_request", status=error.code, error=str(error.message).splitlines()[0][:200])
            return False
        return True


def configure(level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    renderer = (
        structlog.dev.ConsoleRenderer(colors=False)
        if stream.isatty()
        else structlog.processors.JSONRenderer()
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))  # fmt: skip
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level.upper()))
    logging.getLogger("aiohttp.server").addFilter(ClientErrorsInOneLine())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # per-request lines: the ledger has them
