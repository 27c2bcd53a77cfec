"""Prompt-cache persistence: llama-server's slots are saved before a planned stop and restored after the next load.

A child runs with `--slot-save-path state_dir/prompt-cache/<model>/` (0700). Before a stop the daemon chooses
(swap, TTL, memory, lease, gaming, reload, admin, shutdown) every idle slot is saved (`POST /slots/{id}?action=save`),
within `[prompt_cache] save_timeout_s` all together; after the next load, before the model is reported ready, each
saved slot is restored into the same slot id. A request whose prompt shares the saved prefix then skips its prefill.

What is saved is tied to what produced it (the model file's identity, size and mtime, the child's args and the
llama-server binary): any change and the files are removed, never restored. llama-server writes each file under a
temporary name and the daemon renames it once the save answered, and a manifest (written atomically) records each
file's size and checksum, so a crash mid-save or a damaged file is never trusted. A restore that llama-server refuses
for an intact file (a model it cannot restore) turns saving off for that model until its files or args change.
Disk use is bounded across models (`max_mb`), least recently used first. Nothing here ever stops a load or a stop:
every failure is one log line and the model serves as it would without a cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from .config import Config, LiveConfig

log = structlog.get_logger("supervisor")

ROOT = "prompt-cache"
MANIFEST = "manifest.json"
AUTO_SHARE = 0.10
AUTO_MAX_MB = 64 * 1024
RESTORE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CacheResult:
    model: str
    slots: int
    tokens: int
    bytes: int
    seconds: float


def _checksum(path: Path) -> str:
    """CRC-32 of the file: it catches damage (not tampering) at gigabytes a second, so checking a restore costs
    little next to reading the file."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def _stat_key(path: str | os.PathLike[str]) -> list[Any]:
    try:
        info = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [os.path.realpath(path), info.st_size, info.st_mtime_ns]


class PromptCache:
    def __init__(self, live: LiveConfig, http: aiohttp.ClientSession):
        self.live = live
        self.http = http
        self.root = Path(live.current.daemon.state_dir) / ROOT  # state_dir is a restart-only setting
        self.budget_bytes = self._budget_bytes(live.current)
        self._warned: set[tuple[str, str]] = set()  # (model, what) already logged once
        self._summaries: dict[str, dict[str, Any] | None] = {}  # read once from disk, dropped on every write
        # Checksums of just-saved files, computed after the stop rather than on its path; a restore waits for them.
        self._checksumming: dict[str, asyncio.Task[None]] = {}
        self._restored: dict[str, set[int]] = {}  # slot ids restored into the running child (/slots lists them empty)
        self.prune()

    # ------------------------------------------------------------ configuration

    def _budget_bytes(self, config: Config) -> int:
        max_mb = config.prompt_cache.max_mb
        if max_mb != "auto":
            return int(max_mb) * 2**20
        try:
            usage = shutil.disk_usage(config.daemon.state_dir)
        except OSError:
            return 0
        return int(min(usage.free * AUTO_SHARE, AUTO_MAX_MB * 2**20))

    def enabled(self, model: str) -> bool:
        config = self.live.current
        spec = config.models.get(model)
        return bool(config.prompt_cache.enabled and spec is not None and spec.model is not None and spec.prompt_cache
                    and self.budget_bytes)

    def directory(self, model: str) -> Path:
        return self.root / model

    def child_args(self, model: str) -> list[str]:
        """The flag that lets llama-server save and restore slots: only when this model's cache is on and its
        directory can be made."""
        if not self.enabled(model):
            return []
        folder = self.directory(model)
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(folder, 0o700)
        except OSError as exc:
            self._warn_once(model, "prompt_cache_unusable", error=str(exc))
            return []
        return ["--slot-save-path", str(folder)]

    def fingerprint(self, model: str) -> str:
        config = self.live.current
        spec = config.models[model]
        key = [_stat_key(spec.model), [str(a) for a in spec.args], _stat_key(self.live.binary)]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    # ------------------------------------------------------------ manifest

    def _manifest(self, model: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.directory(model) / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._warn_once(model, "prompt_cache_manifest_unreadable", error=str(exc))
            return None
        return data if isinstance(data, dict) and isinstance(data.get("slots"), dict) else None

    def _write_manifest(self, model: str, manifest: dict[str, Any]) -> None:
        self._summaries.pop(model, None)
        folder = self.directory(model)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(manifest, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, folder / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _discard(self, model: str, keep_manifest: dict[str, Any] | None = None) -> None:
        """Remove the model's saved slots (and temporary files); keep a manifest only if one is given."""
        self._summaries.pop(model, None)
        folder = self.directory(model)
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if path.name != MANIFEST or keep_manifest is None:
                path.unlink(missing_ok=True)
        if keep_manifest is not None:
            self._write_manifest(model, keep_manifest)

    def prune(self) -> None:
        """Remove what models no longer in the config left (at start and after a reload)."""
        try:
            folders = list(self.root.iterdir()) if self.root.is_dir() else []
        except OSError:
            return
        for folder in folders:
            if folder.is_dir() and folder.name not in self.live.current.models:
                shutil.rmtree(folder, ignore_errors=True)
                log.info("prompt_cache_removed", model=folder.name, reason="not in the config")

    def summary(self, model: str) -> dict[str, Any] | None:
        """What is saved for the model now: tokens, bytes, slots, age; None when nothing is."""
        if model not in self._summaries:
            self._summaries[model] = self._read_summary(model)
        summary = self._summaries[model]
        if summary is None:
            return None
        return {**summary, "age_s": round(max(0.0, time.time() - summary["saved_at"]), 1)}

    def _read_summary(self, model: str) -> dict[str, Any] | None:
        manifest = self._manifest(model) if self.directory(model).is_dir() else None
        if not manifest or not manifest["slots"] or manifest.get("unsupported"):
            return None
        slots = manifest["slots"].values()
        saved_at = max(float(s.get("saved_at", 0)) for s in slots)
        return {"slots": len(manifest["slots"]), "tokens": sum(int(s["tokens"]) for s in slots),
                "bytes": sum(int(s["bytes"]) for s in slots), "saved_at": saved_at}

    # ------------------------------------------------------------ save and restore

    async def save(self, model: str, base_url: str) -> CacheResult | None:
        """Save the child's non-empty idle slots, within save_timeout_s. Never raises."""
        if not self.enabled(model) or not self.directory(model).is_dir():
            return None
        fingerprint = self.fingerprint(model)
        manifest = self._manifest(model)
        if manifest is not None and manifest.get("fingerprint") == fingerprint and manifest.get("unsupported"):
            return None
        started = time.monotonic()
        saved: dict[str, dict[str, Any]] = {}
        try:
            async with asyncio.timeout(self.live.current.prompt_cache.save_timeout_s):
                await self._save_slots(model, base_url, saved)
        except TimeoutError:
            log.warning("prompt_cache_save_timeout", model=model, saved_slots=len(saved),
                        timeout_s=self.live.current.prompt_cache.save_timeout_s)
        except Exception as exc:  # a full disk, a child that went away, an answer we do not understand
            log.warning("prompt_cache_save_failed", model=model, error=str(exc) or type(exc).__name__)
        try:
            self._remove_temporaries(model)
            if not saved:
                return None
            new = {"fingerprint": fingerprint, "unsupported": False, "slots": saved, "used_at": time.time()}
            # Files of slots not saved this time are stale: the manifest names only what was just written.
            for path in self.directory(model).glob("slot-*.bin"):
                if path.name not in {entry["file"] for entry in saved.values()}:
                    path.unlink(missing_ok=True)
            self._write_manifest(model, new)
            self._enforce_budget(keep=model)
            self._checksumming[model] = asyncio.ensure_future(self._checksum_files(model, fingerprint))
        except OSError as exc:
            log.warning("prompt_cache_save_failed", model=model, error=str(exc))
            self._discard(model)
            return None
        result = CacheResult(model, len(saved), sum(e["tokens"] for e in saved.values()),
                             sum(e["bytes"] for e in saved.values()), time.monotonic() - started)
        log.info("prompt_cache_saved", model=model, slots=result.slots, tokens=result.tokens, bytes=result.bytes,
                 ms=round(result.seconds * 1000))
        return result

    async def _save_slots(self, model: str, base_url: str, saved: dict[str, dict[str, Any]]) -> None:
        async with self.http.get(f"{base_url}/slots", timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status != 200:
                return  # --no-slots, or an old build: nothing to save
            slots = await response.json()
        folder = self.directory(model)
        restored = self._restored.pop(model, set())
        for slot in slots if isinstance(slots, list) else []:
            if not isinstance(slot, dict) or slot.get("is_processing") or not isinstance(slot.get("id"), int):
                continue
            if not slot.get("n_prompt_tokens") and slot["id"] not in restored:
                continue  # never asked anything (a restored slot is listed without its tokens, and is saved)
            slot_id = slot["id"]
            temporary = f"slot-{slot_id}.bin.tmp-{secrets.token_hex(4)}"
            url = f"{base_url}/slots/{slot_id}?action=save"
            async with self.http.post(url, json={"filename": temporary}) as response:
                answer = await response.json(content_type=None)
            if response.status != 200 or not isinstance(answer, dict):
                raise RuntimeError(f"slot {slot_id}: llama-server answered {response.status}: {answer}")
            path = folder / temporary
            if int(answer.get("n_saved") or 0) <= 0:
                path.unlink(missing_ok=True)  # an empty slot
                continue
            final = folder / f"slot-{slot_id}.bin"
            os.replace(path, final)
            saved[str(slot_id)] = {"file": final.name, "tokens": int(answer["n_saved"]), "bytes": final.stat().st_size,
                                   "checksum": None, "saved_at": time.time()}  # fmt: skip

    async def _checksum_files(self, model: str, fingerprint: str) -> None:
        """Record each saved file's checksum in the manifest (files without one are never restored)."""
        try:
            manifest = self._manifest(model)
            if manifest is None or manifest.get("fingerprint") != fingerprint:
                return
            folder = self.directory(model)
            for entry in manifest["slots"].values():
                entry["checksum"] = await asyncio.to_thread(_checksum, folder / entry["file"])
            self._write_manifest(model, manifest)
        except Exception as exc:  # a file evicted meanwhile, a full disk: those slots are not restored
            log.warning("prompt_cache_checksum_failed", model=model, error=str(exc) or type(exc).__name__)

    async def flush(self) -> None:
        """Let the checksums still being computed finish (at shutdown), bounded."""
        pending = [task for task in self._checksumming.values() if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.live.current.prompt_cache.save_timeout_s)

    async def restore(self, model: str, base_url: str) -> CacheResult | None:
        """Restore what was saved for this model into the same slot ids. Never raises."""
        if not self.enabled(model):
            return None
        pending = self._checksumming.pop(model, None)
        if pending is not None:
            await asyncio.wait([pending], timeout=RESTORE_TIMEOUT_S)
        manifest = self._manifest(model)
        if manifest is None:
            return None
        fingerprint = self.fingerprint(model)
        if manifest.get("fingerprint") != fingerprint:
            log.info("prompt_cache_discarded", model=model, reason="the model file, its args or llama-server changed")
            self._discard(model)
            return None
        if manifest.get("unsupported") or not manifest["slots"]:
            return None
        started = time.monotonic()
        restored = tokens = size = 0
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT_S):
                for slot_id, entry in list(manifest["slots"].items()):
                    outcome = await self._restore_slot(model, base_url, slot_id, entry)
                    if outcome == "refused":
                        manifest["unsupported"] = True
                        self._discard(model, keep_manifest={**manifest, "slots": {}})
                        return None
                    if outcome is None:
                        manifest["slots"].pop(slot_id)
                        continue
                    restored, tokens, size = restored + 1, tokens + outcome, size + int(entry["bytes"])
                    self._restored.setdefault(model, set()).add(int(slot_id))
        except Exception as exc:
            log.warning("prompt_cache_restore_failed", model=model, error=str(exc) or type(exc).__name__)
            return None
        try:
            manifest["used_at"] = time.time()
            self._write_manifest(model, manifest)
        except OSError as exc:
            log.warning("prompt_cache_manifest_not_saved", model=model, error=str(exc))
        if not restored:
            return None
        result = CacheResult(model, restored, tokens, size, time.monotonic() - started)
        log.info("prompt_cache_restored", model=model, slots=restored, tokens=tokens, bytes=size,
                 ms=round(result.seconds * 1000))
        return result

    async def _restore_slot(self, model: str, base_url: str, slot_id: str, entry: dict[str, Any]) -> int | str | None:
        """Tokens restored; None for a file not to trust (removed); "refused" when llama-server will not take an
        intact file."""
        path = self.directory(model) / str(entry.get("file", ""))
        try:
            intact = path.stat().st_size == int(entry["bytes"]) and \
                await asyncio.to_thread(_checksum, path) == entry.get("checksum")
        except (OSError, KeyError, ValueError, TypeError):
            intact = False
        if not intact:
            log.warning("prompt_cache_file_damaged", model=model, slot=slot_id, file=path.name)
            path.unlink(missing_ok=True)
            return None
        url = f"{base_url}/slots/{slot_id}?action=restore"
        async with self.http.post(url, json={"filename": path.name}) as response:
            answer = await response.json(content_type=None)
        if response.status == 200 and isinstance(answer, dict):
            return int(answer.get("n_restored") or 0)
        message = answer.get("error", {}).get("message") if isinstance(answer, dict) else answer
        self._warn_once(model, "prompt_cache_unsupported", status=response.status, error=str(message),
                        effect="slots of this model are no longer saved until its file or args change")
        return "refused"

    # ------------------------------------------------------------ disk budget

    def _enforce_budget(self, keep: str) -> None:
        """Evict whole models' saved slots, least recently used first, until all of them fit max_mb."""
        entries = []
        for folder in self.root.iterdir() if self.root.is_dir() else []:
            manifest = self._manifest(folder.name) if folder.is_dir() else None
            if manifest and manifest["slots"]:
                size = sum(int(s["bytes"]) for s in manifest["slots"].values())
                entries.append((float(manifest.get("used_at", 0)), folder.name, size))
        total = sum(size for _, _, size in entries)
        for _, name, size in sorted(entries, key=lambda e: (e[1] == keep, e[0])):
            if total <= self.budget_bytes:
                break
            self._discard(name)
            total -= size
            log.info("prompt_cache_evicted", model=name, bytes=size, budget_mb=self.budget_bytes // 2**20)

    def _remove_temporaries(self, model: str) -> None:
        for path in self.directory(model).glob("*.tmp-*"):
            path.unlink(missing_ok=True)

    def _warn_once(self, model: str, event: str, **fields: Any) -> None:
        if (model, event) in self._warned:
            return
        self._warned.add((model, event))
        log.warning(event, model=model, **fields)
