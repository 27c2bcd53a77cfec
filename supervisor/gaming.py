"""Gaming mode: detection from running processes (a pure detector plus a thin poller) and its persisted state.

Detection turns gaming mode on as soon as a listed process runs and off ``off_delay_s`` after the last one exits
(games restart their launchers; a short gap should not reload a 20 GB model). It only reports *changes* of what it
sees, so a manual toggle wins until the next change: turning it off by hand while a game runs sticks until the
game exits and another starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import psutil
import structlog

log = structlog.get_logger("supervisor.gaming")

STATE_FILE = "gaming.json"


class GamingDetector:
    def __init__(self, names: Iterable[str], off_delay_s: float):
        self.names = {name.lower() for name in names}
        self.off_delay_s = off_delay_s
        self.detected = False
        self._last_seen: float | None = None

    def observe(self, running: Iterable[str], now: float) -> bool | None:
        """Feed the names of running processes; returns the new detected state when it changes, else None."""
        if self.names & {name.lower() for name in running}:
            self._last_seen = now
            if not self.detected:
                self.detected = True
                return True
            return None
        if self.detected and self._last_seen is not None and now - self._last_seen >= self.off_delay_s:
            self.detected = False
            return False
        return None

    def matching(self, running: Iterable[str]) -> list[str]:
        return sorted({name for name in running if name.lower() in self.names})


def running_process_names() -> set[str]:
    """Names of running processes, and the basenames of their executables (a game under Wine shows both)."""
    names: set[str] = set()
    for process in psutil.process_iter(["name", "exe"]):
        info = process.info
        if info.get("name"):
            names.add(info["name"])
        if info.get("exe"):
            names.add(os.path.basename(info["exe"]))
    return names


class GamingStore:
    """Gaming mode survives a restart: a one-line JSON file in state_dir."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / STATE_FILE

    def load(self) -> bool:
        try:
            return bool(json.loads(self.path.read_text())["enabled"])
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("gaming_state_unreadable", path=str(self.path), error=str(exc))
            return False

    def save(self, enabled: bool) -> None:
        temp: str | None = None
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
                temp = handle.name
                json.dump({"enabled": enabled}, handle)
            os.replace(temp, self.path)
            temp = None
        except OSError as exc:
            log.warning("gaming_state_not_saved", path=str(self.path), error=str(exc))
        finally:
            if temp is not None:  # a full disk fails the write or the close: leave no half-written file behind
                with contextlib.suppress(OSError):
                    os.unlink(temp)
