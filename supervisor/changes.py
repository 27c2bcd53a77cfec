"""Telling whoever waits that something changed, at no cost when nobody waits.

The runtime signals a change after every scheduler event (two per request) and a log ring after every line a child
prints; an asyncio Event made and set for each of those was most of what they cost. A new Event is made per change
only while someone waits for one.
"""

from __future__ import annotations

import asyncio


class Changes:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiting = 0

    def notify(self) -> None:
        """Wake everyone waiting now (each once)."""
        if self._waiting:
            event, self._event = self._event, asyncio.Event()
            event.set()

    async def wait(self) -> None:
        """Return at the next notify()."""
        self._waiting += 1
        try:
            await self._event.wait()
        finally:
            self._waiting -= 1
