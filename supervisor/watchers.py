"""What the daemon watches and reports to the runtime as events: device memory, games, lease holders.

Each watcher turns an outside fact into a scheduler event through the runtime's `dispatch`; none decides
anything. A failure in one (a probe error, a full disk) is logged and watching goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil
import structlog

from .config import Config
from .estimate import LearnedStore, estimate_model
from .gaming import GamingDetector, GamingStore, running_process_names
from .gpu import Probe, ProbeError
from . import predict
from .scheduler import LeaseReleased, MemoryMeasured, MemorySnapshot, NeedLearned, PreloadWanted

if TYPE_CHECKING:
    from .ledger import Ledger
    from .runtime import Runtime

log = structlog.get_logger("supervisor")


def fold_trees(snapshot: MemorySnapshot, trees: dict[int, list[int]]) -> MemorySnapshot:
    """What a child's whole process tree holds, counted on the child: a server started through a shell or a
    launcher holds its memory in a grandchild, and that is still the model's, not another program's."""
    if snapshot.process_mb is None:
        return snapshot
    folded = dict(snapshot.process_mb)
    for leader, tree in trees.items():
        total = sum(folded.pop(pid, 0) for pid in tree if pid != leader) + folded.get(leader, 0)
        if total:
            folded[leader] = total
    return dataclasses.replace(snapshot, process_mb=folded)


class MemoryWatcher:
    """Reads the probe every [gpu] poll_interval_s and after each load; learns what a loaded model holds."""

    def __init__(self, runtime: Runtime, probe: Probe, learned: LearnedStore | None):
        self.runtime = runtime
        self.probe = probe
        self.learned = learned
        self.need_source: dict[str, str] = {}  # model -> config | learned | estimate | unknown

    def initial_needs(self, config: Config, names: list[str] | None = None) -> dict[str, int]:
        """Each model's need: vram_mb from the config, else what was measured last time, else the GGUF estimate.
        Reads GGUF headers: blocking, run it off the loop for large files."""
        on_gpu = self.probe.name != "host"
        needs: dict[str, int] = {}
        for name, model in config.models.items():
            if names is not None and name not in names:
                continue
            if isinstance(model.vram_mb, int):
                needs[name], self.need_source[name] = model.vram_mb, "config"
                continue
            if model.model is None:  # a cmd: no GGUF to estimate from; learned once it has run
                needs[name], self.need_source[name] = 0, "unknown"
                continue
            learned = self._learned(name, model.model, list(model.args))
            if learned is not None:
                needs[name], self.need_source[name] = learned, "learned"
                continue
            try:
                needs[name] = estimate_model(model.model, list(model.args), on_gpu=on_gpu).total_mb
                self.need_source[name] = "estimate"
            except Exception as exc:  # an unreadable GGUF fails at load with llama-server's own message
                log.warning("estimate_failed", model=name, error=str(exc))
                needs[name], self.need_source[name] = 0, "unknown"
        return needs

    def _learned(self, name: str, path: object, args: list[str]) -> int | None:
        if self.learned is None:
            return None
        try:
            return self.learned.get(name, path, args)
        except Exception as exc:
            log.warning("learned_memory_unreadable", model=name, error=str(exc))
            return None

    def measure(self) -> MemorySnapshot | None:
        """Read the probe and tell the core. A probe error is logged and the last reading stays."""
        groups = self.runtime.children.process_trees()
        try:
            snapshot = self.probe.snapshot([pid for tree in groups.values() for pid in tree])
        except ProbeError as exc:
            log.warning("memory_probe_failed", error=str(exc))
            return None
        snapshot = fold_trees(snapshot, groups)
        self.runtime.dispatch(MemoryMeasured(snapshot, self.runtime.now()))
        return snapshot

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.runtime.config.gpu.poll_interval_s)
            self.measure()

    def learn(self, name: str, pid: int | None, used_before: int | None, alone: bool) -> None:
        """After a load: what the child really holds (per-process figure, else the device's growth). Keeping it
        in state_dir may fail (a full disk): that costs a re-measure next time, never supervision."""
        snapshot = self.measure()
        config = self.runtime.config
        if snapshot is None or name not in config.models or isinstance(config.models[name].vram_mb, int):
            return
        if snapshot.process_mb is not None and pid in snapshot.process_mb:
            measured = snapshot.process_mb[pid]  # its whole process tree (measure() folds it onto the leader)
        elif used_before is not None and alone:
            measured = snapshot.used_mb - used_before
        else:
            return  # another load overlapped: the device's growth is not this model's alone
        if measured <= 0:
            return
        estimate = self.runtime.core.models[name].need_mb
        log.info("memory_learned", model=name, measured_mb=measured, estimated_mb=estimate)
        self.need_source[name] = "learned"
        self.runtime.dispatch(NeedLearned(name, measured, self.runtime.now()))
        if self.learned is not None and config.models[name].model is not None:
            model = config.models[name]
            try:
                self.learned.put(name, model.model, list(model.args), measured)
            except Exception as exc:
                log.warning("learned_memory_not_saved", model=name, error=str(exc))


class GamingWatcher:
    """Restores gaming mode as it was and, when [gaming] auto_detect lists programs, watches for them."""

    def __init__(self, runtime: Runtime, store: GamingStore | None):
        self.runtime = runtime
        self.store = store
        self.polls = 0  # how often detection has looked (tests wait on it)

    def restore(self) -> None:
        if self.store is not None and self.store.load():
            self.runtime.set_gaming(True, source="restored")

    def save(self, enabled: bool) -> None:
        if self.store is not None:
            self.store.save(enabled)

    async def run(self) -> None:
        gaming = self.runtime.config.gaming  # auto_detect is a restart-only setting
        detector = GamingDetector(gaming.auto_detect, gaming.off_delay_s)
        while True:
            try:
                running = await asyncio.to_thread(running_process_names)  # listing /proc takes a few ms
            except Exception as exc:
                log.warning("gaming_detection_failed", error=str(exc))
                running = None
            if running is not None:
                change = detector.observe(running, self.runtime.now())
                self.polls += 1
                if change is not None:
                    matching = ", ".join(detector.matching(running)) or "none running"
                    self.runtime.set_gaming(change, source=f"auto: {matching}")
            await asyncio.sleep(self.runtime.config.gaming.poll_interval_s)


class LeaseHolders:
    """Releases a lease the moment its holder exits: a pidfd becomes readable at exit (polling where there is
    no pidfd)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._unwatch: dict[int, Callable[[], None]] = {}  # lease id -> stops watching its holder

    def watch(self, lease_id: int, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            loop.call_soon(self._died, lease_id)
            return
        except (OSError, AttributeError):  # no pidfd (old kernel): poll instead
            task = self.runtime.spawn(self._poll(lease_id, pid))
            self._unwatch[lease_id] = task.cancel
            return

        def stop() -> None:
            loop.remove_reader(fd)
            os.close(fd)

        loop.add_reader(fd, self._died, lease_id)
        self._unwatch[lease_id] = stop

    def _died(self, lease_id: int) -> None:
        self.unwatch(lease_id)
        self.runtime.dispatch(LeaseReleased(lease_id, self.runtime.now(), "holder_died"))

    async def _poll(self, lease_id: int, pid: int) -> None:
        while psutil.pid_exists(pid):
            await asyncio.sleep(0.5)
        self._unwatch.pop(lease_id, None)
        self.runtime.dispatch(LeaseReleased(lease_id, self.runtime.now(), "holder_died"))

    def unwatch(self, lease_id: int) -> None:
        stop = self._unwatch.pop(lease_id, None)
        if stop is not None:
            stop()

    def close(self) -> None:
        for lease_id in list(self._unwatch):
            self.unwatch(lease_id)


class PredictedPreloader:
    """Once a minute, while [daemon] predict_preload is on: from the ledger's last weeks, tell the core which models
    are usually first asked for within predict_lead_s from now (predict.py); it loads them by the home rules."""

    INTERVAL_S = 60.0
    GRACE_S = 1800.0  # how long after its usual time a predicted model is still loaded if the GPU frees up

    def __init__(self, runtime: Runtime, ledger: Ledger):
        self.runtime = runtime
        self.ledger = ledger
        self._done: set[tuple[str, datetime.date]] = set()

    def check(self, now_wall: float) -> list[str]:
        """Reads the ledger (blocking: call it in a thread); the models due now."""
        daemon = self.runtime.config.daemon
        rows = self.ledger.request_times(now_wall - (predict.LOOKBACK_DAYS + 1) * predict.DAY_S)
        history = predict.first_uses((model, at) for model, at in rows if model in self.runtime.config.models)
        return predict.due(history, now_wall, daemon.predict_lead_s, self._done)

    async def run(self) -> None:
        while True:
            if self.runtime.config.daemon.predict_preload:
                try:
                    now_wall = time.time()
                    due = await asyncio.to_thread(self.check, now_wall)
                except Exception as exc:  # an unreadable ledger costs the prediction, nothing else
                    log.warning("predicted_preload_failed", error=str(exc))
                    due = []
                today = datetime.date.fromtimestamp(now_wall) if due else None
                for model in due:
                    self._done.add((model, today))  # type: ignore[arg-type]
                    lead = self.runtime.config.daemon.predict_lead_s
                    log.info("predicted_preload", model=model, lead_s=lead)
                    self.runtime.dispatch(PreloadWanted(model, self.runtime.now() + lead + self.GRACE_S,
                                                        self.runtime.now()))
            await asyncio.sleep(self.INTERVAL_S)
