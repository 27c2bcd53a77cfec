"""The usage ledger: one SQLite row per request, in STATE_DIR/ledger.sqlite3.

- `Ledger.record()` is a proxy observer called on the event loop: it only appends the record to a list, which
  goes to the writer thread HAND_OVER_S later, with whatever followed it (one wake-up of the writer and one
  transaction per batch, not per request: a commit per request cost ~0.13 ms of CPU, the GIL held meanwhile).
  One writer thread, with its own connection, inserts each batch in one transaction. Reads flush first.
- WAL journal with `synchronous=NORMAL`: a committed batch survives the daemon being killed (only a power loss can
  lose the last commits), and readers never wait for the writer.
- Costs are computed when a row is written, with the prices then in the config, so a later price change does not
  rewrite history: `cost_usd` is what a cloud target charged (0 for local rows), `cost_if_cloud_usd` what the same
  tokens cost at the reference target's prices (see `reference_target`).
- The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[n]` takes a file from version n to n + 1.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from .config import Config
from .records import RequestRecord

log = structlog.get_logger("supervisor.ledger")

FILE_NAME = "ledger.sqlite3"
MAX_BATCH = 500
MAX_QUEUED = 100_000  # ~20 MB of records: a writer stuck that long is logged, and further records dropped
HAND_OVER_S = 0.25  # how long a record waits on the loop for others to share its transaction
WRITE_ATTEMPTS = 5
BUSY_TIMEOUT_MS = 5000
FLUSH_BEFORE_READ_S = 2.0

MIGRATIONS: list[list[str]] = [
    # 0 -> 1
    [
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,              -- unix time the request arrived
            requested TEXT NOT NULL,         -- the name the client used
            model TEXT NOT NULL,             -- configured model, or the cloud target asked for by name
            provider TEXT NOT NULL,          -- 'local' or the [cloud.*] target that served it
            route TEXT NOT NULL,             -- 'local' | 'cloud' | 'rejected'
            endpoint TEXT NOT NULL,
            status INTEGER NOT NULL,
            fallback_reason TEXT,
            tokens_in INTEGER,               -- NULL: not reported (counted as 0)
            tokens_out INTEGER,
            wait_ms REAL,
            ttft_ms REAL,                    -- arrival to first response byte
            total_ms REAL NOT NULL,
            cost_usd REAL NOT NULL,
            cost_if_cloud_usd REAL NOT NULL
        )""",
        "CREATE INDEX requests_time ON requests (time)",
        "CREATE INDEX requests_model_time ON requests (model, time)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('created_at', CAST(strftime('%s', 'now') AS TEXT))",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

COLUMNS = ("time", "requested", "model", "provider", "route", "endpoint", "status", "fallback_reason", "tokens_in",
           "tokens_out", "wait_ms", "ttft_ms", "total_ms", "cost_usd", "cost_if_cloud_usd")  # fmt: skip
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class LedgerError(Exception):
    pass


def ledger_path(config: Config) -> Path:
    return config.daemon.state_dir / FILE_NAME


# ---------------------------------------------------------------------------------------------------- costs


def reference_target(config: Config, model: str) -> str | None:
    """The [cloud.*] target whose prices say what a request for `model` would have cost in the cloud."""
    if config.ledger.reference_target:
        return config.ledger.reference_target
    configured = config.models.get(model)
    if configured is not None and configured.fallback:
        return configured.fallback
    if model in config.cloud:  # a cloud target asked for by name stands for itself
        return model
    return next(iter(config.cloud), None)


def price(config: Config, target: str | None, tokens_in: int | None, tokens_out: int | None) -> float:
    cloud = config.cloud.get(target) if target else None
    if cloud is None:  # no target, or one removed from the config since
        return 0.0
    return ((tokens_in or 0) * cloud.input_usd_per_mtok + (tokens_out or 0) * cloud.output_usd_per_mtok) / 1e6


def costs(config: Config, record: RequestRecord) -> tuple[float, float]:
    """(cost_usd, cost_if_cloud_usd) of one request."""
    cost = price(config, record.provider, record.tokens_in, record.tokens_out) if record.route == "cloud" else 0.0
    return cost, price(config, reference_target(config, record.model), record.tokens_in, record.tokens_out)


def row(record: RequestRecord, cost: float, if_cloud: float) -> tuple[Any, ...]:
    return (record.started_at, record.requested, record.model, record.provider, record.route, record.endpoint,
            record.status, record.fallback_reason, record.tokens_in, record.tokens_out, record.wait_ms,
            record.ttft_ms, record.total_ms, cost, if_cloud)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- files


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise LedgerError(f"{path} has schema version {version}, newer than this daemon's {SCHEMA_VERSION}")
    for number in range(version, SCHEMA_VERSION):
        with connection:  # each step and its version bump commit together
            for statement in MIGRATIONS[number]:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number + 1}")


def _connect_writable(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        connection.close()
        raise LedgerError(f"{path}: cannot switch to WAL journal mode (got {mode})")
    # NORMAL in WAL mode: commits survive a crash of the process; fsync only at checkpoints.
    connection.execute("PRAGMA synchronous = NORMAL")
    # A checkpoint every 100 pages, and the WAL truncated back to 1 MiB after one: left alone it keeps its largest
    # size (4 MB and more), which on a small state_dir is the disk the learned figures and prompt cache need.
    connection.execute("PRAGMA wal_autocheckpoint = 100")
    connection.execute("PRAGMA journal_size_limit = 1048576")
    return connection


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to a ledger file, for the CLI. FileNotFoundError when there is none.

    With a -wal file beside it (the daemon runs, or was killed) it is opened mode=ro, which reads the WAL. Without
    one the daemon closed it cleanly and it is opened immutable: mode=ro would create -wal/-shm files owned by
    whoever runs the CLI (root, say), which the daemon's user could then not open."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(str(path))
    wal = path.with_name(path.name + "-wal")
    flag = "mode=ro" if wal.exists() else "immutable=1"
    connection = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?{flag}", uri=True)
    # A newer schema only adds columns and tables: reading the ones known here still works.
    if connection.execute("PRAGMA user_version").fetchone()[0] < 1:
        connection.close()
        raise LedgerError(f"{path} is not a usage ledger (schema version 0)")
    return connection


# ---------------------------------------------------------------------------------------------------- queries


def _local_midnight(day: datetime.date) -> float:
    return datetime.datetime.combine(day, datetime.time.min).timestamp()  # naive: local time, DST included


def usage_from(connection: sqlite3.Connection, days: float, now: float | None = None) -> dict[str, Any]:
    """Totals over today and the days before it (local calendar days; a fractional `days` rounds up)."""
    now = time.time() if now is None else now
    count = max(1, math.ceil(days))
    today = datetime.date.fromtimestamp(now)
    first = today - datetime.timedelta(days=count - 1)
    since, until = _local_midnight(first), _local_midnight(today + datetime.timedelta(days=1))
    daily = {(first + datetime.timedelta(days=i)).isoformat(): {"local": 0, "cloud": 0, "rejected": 0}
             for i in range(count)}  # fmt: skip
    totals = {"requests": 0, "local": 0, "cloud": 0, "rejected": 0, "tokens_in": 0, "tokens_out": 0}
    cloud_cost = saved = 0.0
    rows = connection.execute(
        """SELECT date(time, 'unixepoch', 'localtime'), route, COUNT(*), COALESCE(SUM(tokens_in), 0),
                  COALESCE(SUM(tokens_out), 0), TOTAL(cost_usd), TOTAL(cost_if_cloud_usd)
           FROM requests WHERE time >= ? AND time < ? GROUP BY 1, 2""",
        (since, until),
    )
    for day, route, n, tokens_in, tokens_out, cost, if_cloud in rows:
        totals["requests"] += n
        totals["tokens_in"] += tokens_in
        totals["tokens_out"] += tokens_out
        cloud_cost += cost
        if route in ("local", "cloud", "rejected"):
            totals[route] += n
            if day in daily:
                daily[day][route] += n
        if route == "local":
            saved += if_cloud
    # A refused request was still asked of this host (a router then sent it elsewhere): it counts as not local.
    served = totals["local"] + totals["cloud"] + totals["rejected"]
    return {
        "days": int(days) if float(days).is_integer() else days,
        **totals,
        "local_share": round(totals["local"] / served, 4) if served else None,
        "cloud_cost_usd": round(cloud_cost, 6),
        "saved_usd": round(saved, 6),
        "daily": [{"date": day, **counts} for day, counts in daily.items()],
    }


def last_used_from(connection: sqlite3.Connection) -> dict[str, float]:
    """Each model's last request (any route: a request that had to be rejected or sent away still wanted it)."""
    return dict(connection.execute("SELECT model, MAX(time) FROM requests GROUP BY model"))


def created_at_from(connection: sqlite3.Connection) -> float | None:
    """When the ledger began: a model with no row has not been asked for since."""
    found = connection.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchone()
    return float(found[0]) if found else None


# ---------------------------------------------------------------------------------------------------- the ledger


class Ledger:
    """The daemon's ledger. `record` may be called from the event loop; the other methods from any thread.

    `config` is a Config, or a function returning the live one (a reload may change prices)."""

    def __init__(self, path: str | Path, config: Config | Callable[[], Config]):
        self.path = Path(path)
        self._config = config if callable(config) else (lambda: config)
        self.dropped = 0
        self._queue: queue.Queue[list[RequestRecord] | threading.Event | None] = queue.Queue()
        self._lock = threading.Lock()  # the pending list and the backlog count: flush() may come from any thread
        self._pending: list[RequestRecord] = []
        self._backlog = 0  # records handed to the writer and not written yet
        self._hand_over_timer: asyncio.TimerHandle | None = None
        self._closed = False
        connection = _connect_writable(self.path)
        try:
            _migrate(connection, self.path)
        finally:
            connection.close()
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        # A daemon thread: a daemon that crashes without close() must still be able to exit.
        self._writer.start()

    @property
    def config(self) -> Config:
        return self._config()

    @classmethod
    def open(cls, config: Config | Callable[[], Config]) -> Ledger | None:
        """The ledger in state_dir, or None (logged) when it cannot be used: requests are served either way."""
        path = ledger_path(config() if callable(config) else config)
        try:
            return cls(path, config)
        except (sqlite3.Error, LedgerError, OSError) as exc:
            log.warning("ledger_unusable", path=str(path), error=str(exc), effect="requests are not recorded")
            return None

    # -------------------------------------------------------------- writing

    def record(self, record: RequestRecord) -> None:
        """Keep one request for the writer; never waits."""
        with self._lock:  # under the lock: a record either makes close()'s last batch or is refused
            if self._closed:
                return
            self._pending.append(record)
            if self._hand_over_timer is not None:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on a loop (a script, a test): straight to the writer
                loop = None
            if loop is not None:
                self._hand_over_timer = loop.call_later(HAND_OVER_S, self._hand_over)
                return
        self._hand_over()

    def _hand_over(self) -> None:
        """Give what is pending to the writer as one batch (from the loop's timer, flush() or close())."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._hand_over_timer = None
            if not batch:
                return
            before = self.dropped
            if self._backlog + len(batch) > MAX_QUEUED:  # the writer is stuck: keep memory bounded
                self.dropped += len(batch)
            else:
                self._backlog += len(batch)
                self._queue.put(batch)  # under the lock: never behind close()'s end marker
        if self.dropped != before and (before == 0 or before // 10_000 != self.dropped // 10_000):
            log.error("ledger_queue_full", dropped=self.dropped, path=str(self.path))  # now and then, not per batch

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything recorded before this call is committed. False if that took longer than timeout."""
        self._hand_over()
        if not self._writer.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer (its connection's close checkpoints the WAL)."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
        self._hand_over()
        with self._lock:
            self._queue.put(None)
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.warning("ledger_close_timeout", path=str(self.path), queued=self._queue.qsize())

    def _write_loop(self) -> None:
        try:
            connection = _connect_writable(self.path)
        except (sqlite3.Error, LedgerError) as exc:
            log.error("ledger_unusable", path=str(self.path), error=str(exc), effect="requests are not recorded")
            self._closed = True
            self._drain_markers()
            return
        try:
            stopping = False
            while not stopping:
                batch: list[tuple[Any, ...]] = []
                markers: list[threading.Event] = []
                item = self._queue.get()
                while True:
                    if item is None:
                        stopping = True
                    elif isinstance(item, threading.Event):
                        markers.append(item)
                    else:
                        batch += [self._row(record) for record in item]
                    if stopping or len(batch) >= MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._insert(connection, batch)
                    with self._lock:
                        self._backlog -= len(batch)
                for marker in markers:
                    marker.set()
        finally:
            connection.close()
            self._drain_markers()

    def _row(self, record: RequestRecord) -> tuple[Any, ...]:
        try:
            cost, if_cloud = costs(self.config, record)
        except Exception:  # a malformed record must not stop the writer: keep the request, without costs
            log.exception("ledger_cost_failed", model=record.model)
            cost = if_cloud = 0.0
        return row(record, cost, if_cloud)

    def _insert(self, connection: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with connection:  # one transaction per batch
                    connection.executemany(INSERT, batch)
                return
            except sqlite3.Error as exc:
                log.warning("ledger_write_failed", path=str(self.path), rows=len(batch), error=str(exc),
                            attempt=attempt + 1)  # fmt: skip
                # A lock held elsewhere or a full disk can clear up; this is the writer thread, not the loop.
                time.sleep(min(0.1 * 2**attempt, 2.0))
        self.dropped += len(batch)
        log.error("ledger_rows_dropped", path=str(self.path), rows=len(batch), dropped=self.dropped)

    def _drain_markers(self) -> None:
        """Release flush() callers once nothing will be written any more."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, threading.Event):
                item.set()

    # -------------------------------------------------------------- reading

    def _read(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        connection.execute("PRAGMA query_only = ON")
        return connection

    def usage(self, days: float, now: float | None = None) -> dict[str, Any]:
        """The /usage document. Waits (briefly) for pending writes, so a request that just finished is counted."""
        self.flush(FLUSH_BEFORE_READ_S)
        connection = self._read()
        try:
            return usage_from(connection, days, now)
        finally:
            connection.close()

    def request_times(self, since: float) -> list[tuple[str, float]]:
        """(model, time) of every request since then, for the preload prediction (no flush: minutes old is fine)."""
        connection = self._read()
        try:
            return list(connection.execute("SELECT model, time FROM requests WHERE time >= ? ORDER BY time", (since,)))
        finally:
            connection.close()

    def last_used(self) -> dict[str, float]:
        self.flush(FLUSH_BEFORE_READ_S)
        connection = self._read()
        try:
            return last_used_from(connection)
        finally:
            connection.close()
