"""How much memory the device has, how much is in use, and by which process.

One small interface (`Probe.snapshot() -> MemorySnapshot`) over four sources:

    nvidia  pynvml (NVML)           pool "vram"
    amd     amdsmi (ROCm, optional) pool "vram" on a discrete card, "gtt" on an APU (see _amd_pool)
    host    psutil                  pool "ram": no GPU library usable, or gpu.backend = "none"
    fixed   FixedProbe              a budget a test sets by hand

`open_probe()` picks one and never raises for a missing or broken GPU library: it logs one warning per
backend that failed and falls back to host RAM, because the daemon must run on any machine. Once open,
`snapshot()` raises only `ProbeError`, so the caller has one thing to catch when the driver loses the GPU.
All figures are MiB (what nvidia-smi and llama.cpp print as "MiB"), rounded down.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import psutil
import structlog

from .scheduler.events import MemorySnapshot

__all__ = ["MemorySnapshot", "Probe", "ProbeError", "FixedProbe", "HostProbe", "NvidiaProbe", "AmdProbe",
           "open_probe"]

log = structlog.get_logger("supervisor")

MIB = 1024 * 1024

# An AMD APU whose VRAM is a BIOS carve-out this small (512 MiB-2 GiB are the usual settings) does its real
# allocations in GTT. Discrete cards have more VRAM than this, so they never match, even on hosts where the
# kernel sizes GTT from system RAM and makes it larger than the card's VRAM. See docs/memory.md.
APU_MAX_CARVEOUT_MB = 2048


class ProbeError(RuntimeError):
    """A snapshot could not be taken (the driver lost the GPU, the library failed, ...)."""


class Probe(Protocol):
    name: str

    def snapshot(self, pids: Iterable[int] = ()) -> MemorySnapshot:
        """`pids`: the daemon's children. GPU backends list every process on the device and ignore it;
        the host probe reports the RSS of these pids, since it cannot tell model memory from the rest."""
        ...

    def close(self) -> None: ...


def _mb(n_bytes: int) -> int:
    return int(n_bytes) // MIB


# ---------------------------------------------------------------------------------------------- fixed, host


class FixedProbe:
    """A deterministic budget for tests: total_mb, used_mb and process_mb are plain attributes to change."""

    name = "fixed"

    def __init__(self, total_mb: int, used_mb: int = 0, device: str = "fixed test device"):
        self.total_mb = total_mb
        self.used_mb = used_mb
        self.device = device
        self.process_mb: dict[int, int] | None = None

    def snapshot(self, pids: Iterable[int] = ()) -> MemorySnapshot:
        processes = dict(self.process_mb) if self.process_mb is not None else None
        return MemorySnapshot("fixed", self.device, "vram", self.total_mb, self.used_mb, process_mb=processes)

    def close(self) -> None:
        pass


class HostProbe:
    """System RAM, for CPU-only hosts. "used" counts what the kernel cannot hand out (total - available),
    so reclaimable page cache, including mmap'ed model files, counts as free."""

    name = "host"
    device = "host RAM"

    def snapshot(self, pids: Iterable[int] = ()) -> MemorySnapshot:
        try:
            memory = psutil.virtual_memory()
        except Exception as e:  # the caller handles ProbeError only
            raise ProbeError(f"host: {e}") from e
        rss = {}
        for pid in pids:
            try:
                rss[pid] = _mb(psutil.Process(pid).memory_info().rss)
            except psutil.Error:  # exited meanwhile, or not ours to inspect
                continue
        return MemorySnapshot("host", self.device, "ram", _mb(memory.total), _mb(memory.total - memory.available),
                              process_mb=rss)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- GPU libraries


class _LibraryProbe:
    """Shared by the GPU probes: any failure inside _read() reaches the caller as one ProbeError."""

    name: str

    def snapshot(self, pids: Iterable[int] = ()) -> MemorySnapshot:
        try:
            return self._read()
        except Exception as e:  # NVML and amdsmi raise their own exception trees
            raise ProbeError(f"{self.name}: {type(e).__name__}: {e}") from e

    def _read(self) -> MemorySnapshot:
        raise NotImplementedError


def _optional(read):
    """For extras some drivers refuse (per-process use under vGPU or in containers, a marketing name): None."""
    try:
        return read()
    except Exception:
        return None


class NvidiaProbe(_LibraryProbe):
    name = "nvidia"

    def __init__(self, device: int = 0):
        import pynvml  # nvidia-ml-py; imported here so a missing library is a fallback, not an import error

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.device = name.decode() if isinstance(name, bytes) else name  # bytes in older bindings
        except Exception:
            pynvml.nvmlShutdown()
            raise

    def _read(self) -> MemorySnapshot:
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        total, used = _mb(memory.total), _mb(memory.used)
        return MemorySnapshot("nvidia", self.device, "vram", total, used, vram_total_mb=total, vram_used_mb=used,
                              process_mb=_optional(self._processes))

    def _processes(self) -> dict[int, int]:
        # usedGpuMemory is None where the driver cannot attribute memory (e.g. Windows WDDM): skip those.
        return {p.pid: _mb(p.usedGpuMemory) for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                if p.usedGpuMemory is not None}

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # shutting down a lost GPU must not raise
            pass


def _amd_pool(vram_total_mb: int, gtt_total_mb: int) -> str:
    """Which pool an AMD device allocates from: "gtt" for an APU with a small carve-out, else "vram"."""
    return "gtt" if gtt_total_mb > vram_total_mb and vram_total_mb <= APU_MAX_CARVEOUT_MB else "vram"


class AmdProbe(_LibraryProbe):
    """amdsmi (ROCm's Python bindings; `pip install model-supervisor[amd]`, needs ROCm's libamd_smi.so)."""

    name = "amd"

    def __init__(self, device: int = 0):
        import amdsmi  # optional extra; ImportError means fall back

        self._smi = amdsmi
        amdsmi.amdsmi_init()  # default flags: AMD GPUs only
        try:
            handles = amdsmi.amdsmi_get_processor_handles()
            if device >= len(handles):
                raise ProbeError(f"no AMD GPU with index {device} ({len(handles)} found)")
            self._handle = handles[device]
            asic = _optional(lambda: amdsmi.amdsmi_get_gpu_asic_info(self._handle)) or {}
            self.device = asic.get("market_name") or f"AMD GPU {device}"
        except Exception:
            amdsmi.amdsmi_shut_down()
            raise

    def _read(self) -> MemorySnapshot:
        smi, kind = self._smi, self._smi.AmdSmiMemoryType
        vram_total = _mb(smi.amdsmi_get_gpu_memory_total(self._handle, kind.VRAM))
        vram_used = _mb(smi.amdsmi_get_gpu_memory_usage(self._handle, kind.VRAM))
        gtt_total = _mb(smi.amdsmi_get_gpu_memory_total(self._handle, kind.GTT))
        gtt_used = _mb(smi.amdsmi_get_gpu_memory_usage(self._handle, kind.GTT))
        pool = _amd_pool(vram_total, gtt_total)
        total, used = (gtt_total, gtt_used) if pool == "gtt" else (vram_total, vram_used)
        return MemorySnapshot("amd", self.device, pool, total, used, vram_total_mb=vram_total, vram_used_mb=vram_used,
                              gtt_total_mb=gtt_total, gtt_used_mb=gtt_used,
                              process_mb=_optional(lambda: self._processes(pool)))

    def _processes(self, pool: str) -> dict[int, int] | None:
        # ROCm >= 6.1 returns dicts with byte counts per memory kind; older releases return opaque handles,
        # whose extra per-process calls are not worth supporting: report nothing then.
        result = {}
        for entry in self._smi.amdsmi_get_gpu_process_list(self._handle):
            if not isinstance(entry, dict):
                return None
            # Only the pool's own kind, so that process figures and used_mb describe the same memory.
            usage: dict[str, Any] = entry.get("memory_usage") or {}
            result[int(entry["pid"])] = _mb(usage.get(f"{pool}_mem", 0))
        return result

    def close(self) -> None:
        try:
            self._smi.amdsmi_shut_down()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------- choosing one

_GPU_PROBES = {"nvidia": NvidiaProbe, "amd": AmdProbe}


def open_probe(backend: str = "auto", device: int = 0) -> Probe:
    """The probe for `backend` ("auto" | "nvidia" | "amd" | "none"), falling back to host RAM; never raises
    for an unusable GPU library. "auto" tries nvidia, then amd."""
    if backend == "auto":
        candidates = ["nvidia", "amd"]
    elif backend in _GPU_PROBES:
        candidates = [backend]
    elif backend == "none":
        candidates = []
    else:
        raise ValueError(f"unknown gpu backend {backend!r}: expected auto, nvidia, amd or none")

    for name in candidates:
        probe = None
        try:
            probe = _GPU_PROBES[name](device)
            first = probe.snapshot()  # a library that initialises but cannot report memory is no use either
        except Exception as e:  # any failure here means "try the next one"
            if probe is not None:
                probe.close()
            reason = e.args[0] if isinstance(e, ProbeError) else f"{type(e).__name__}: {e}"
            log.warning("gpu_backend_unavailable", backend=name, device_index=device, reason=reason)
            continue
        _announce(first)
        return probe

    probe = HostProbe()
    _announce(probe.snapshot())
    why = "gpu.backend is 'none'" if backend == "none" else "no usable GPU library was found"
    log.info("gpu_backend_host", reason=why, note="system memory (RAM) is the pool the daemon budgets on")
    return probe


def _announce(snapshot: MemorySnapshot) -> None:
    log.info("gpu_backend", backend=snapshot.backend, device=snapshot.device, pool=snapshot.pool,
             total_mb=snapshot.total_mb, free_mb=snapshot.free_mb)
