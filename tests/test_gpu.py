"""Memory probes: host RAM for real, NVIDIA and AMD through fake libraries (no GPU here), and the fallbacks."""

import enum
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import psutil
import pytest
from structlog.testing import capture_logs

from model_supervisor.gpu import APU_MAX_CARVEOUT_MB, FixedProbe, HostProbe, MemorySnapshot, ProbeError, open_probe

MIB = 1024 * 1024
GIB = 1024 * MIB


def warnings(logs):
    return [entry for entry in logs if entry["log_level"] == "warning"]


def events(logs, name):
    return [entry for entry in logs if entry["event"] == name]


# ---------------------------------------------------------------------------------------------- fakes


class NVMLError(Exception):
    pass


def fake_pynvml(*, init_fails=False, memory_fails=False, processes=()):
    """A stand-in for nvidia-ml-py with one 24 GiB GPU, 6 GiB in use."""
    calls = []
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.calls = calls

    def init():
        calls.append("init")
        if init_fails:
            raise NVMLError("NVML Shared Library Not Found")

    def memory(handle):
        if memory_fails or nvml.lost:
            raise NVMLError("GPU is lost")
        return SimpleNamespace(total=24 * GIB, used=6 * GIB, free=18 * GIB)

    nvml.lost = False
    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: calls.append("shutdown")
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"handle{index}"
    nvml.nvmlDeviceGetName = lambda handle: b"NVIDIA GeForce RTX 3090"  # older bindings return bytes
    nvml.nvmlDeviceGetMemoryInfo = memory
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda handle: [SimpleNamespace(pid=p, usedGpuMemory=m)
                                                                for p, m in processes]
    return nvml


class AmdSmiMemoryType(enum.IntEnum):
    VRAM = 0
    VIS_VRAM = 1
    GTT = 2


def fake_amdsmi(*, vram=(24 * GIB, 2 * GIB), gtt=(48 * GIB, 1 * GIB), name="AMD Radeon RX 7900 XTX",
                devices=1, processes=None):
    """A stand-in for ROCm's amdsmi module, with (total, used) bytes per memory type, as the real one reports."""
    smi = types.ModuleType("amdsmi")
    smi.AmdSmiMemoryType = AmdSmiMemoryType
    smi.AmdSmiException = type("AmdSmiException", (Exception,), {})
    smi.calls = []
    sizes = {AmdSmiMemoryType.VRAM: vram, AmdSmiMemoryType.GTT: gtt}
    smi.amdsmi_init = lambda *flags: smi.calls.append("init")
    smi.amdsmi_shut_down = lambda: smi.calls.append("shutdown")
    smi.amdsmi_get_processor_handles = lambda: [f"gpu{i}" for i in range(devices)]
    smi.amdsmi_get_gpu_asic_info = lambda handle: {"market_name": name, "target_graphics_version": "gfx1100"}
    smi.amdsmi_get_gpu_memory_total = lambda handle, kind: sizes[kind][0]
    smi.amdsmi_get_gpu_memory_usage = lambda handle, kind: sizes[kind][1]
    smi.amdsmi_get_gpu_process_list = lambda handle: processes if processes is not None else []
    return smi


@pytest.fixture
def no_gpu_libraries(monkeypatch):
    """Both GPU libraries unusable, the way a CPU-only host sees them: NVML fails to load, amdsmi is absent."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_fails=True))
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # `import amdsmi` raises ImportError


# ---------------------------------------------------------------------------------------------- host, fixed


def test_host_probe_reads_this_machine():
    me = os.getpid()
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer exists
    snap = HostProbe().snapshot([me, gone.pid])
    assert snap.backend == "host" and snap.pool == "ram" and snap.device == "host RAM"
    assert snap.total_mb > 0
    assert 0 <= snap.used_mb <= snap.total_mb
    assert snap.free_mb == snap.total_mb - snap.used_mb
    assert set(snap.process_mb) == {me}
    rss_mb = psutil.Process(me).memory_info().rss // MIB
    assert snap.process_mb[me] > 0 and abs(snap.process_mb[me] - rss_mb) < 64


def test_fixed_probe_is_whatever_the_test_says():
    probe = FixedProbe(total_mb=8000, used_mb=1000)
    assert probe.snapshot() == MemorySnapshot("fixed", "fixed test device", "vram", 8000, 1000)
    assert probe.snapshot().free_mb == 7000
    probe.used_mb, probe.process_mb = 7500, {42: 6000}
    snap = probe.snapshot()
    assert (snap.free_mb, snap.process_mb) == (500, {42: 6000})
    probe.process_mb[42] = 1  # a snapshot is a copy, not a view
    assert snap.process_mb == {42: 6000}
    probe.used_mb = 9000
    assert probe.snapshot().free_mb == 0  # over-committed never reads as negative


# ---------------------------------------------------------------------------------------------- choosing a backend


def test_auto_falls_back_to_host_with_one_warning_per_backend(no_gpu_libraries):
    with capture_logs() as logs:
        probe = open_probe("auto")
    assert probe.name == "host"
    failed = warnings(logs)
    assert [w["backend"] for w in failed] == ["nvidia", "amd"]
    assert all(w["event"] == "gpu_backend_unavailable" for w in failed)
    assert "NVML Shared Library Not Found" in failed[0]["reason"]
    assert "amdsmi" in failed[1]["reason"]
    [chosen] = events(logs, "gpu_backend")
    assert (chosen["backend"], chosen["device"], chosen["pool"]) == ("host", "host RAM", "ram")
    [why] = events(logs, "gpu_backend_host")
    assert "no usable GPU library" in why["reason"]


def test_auto_on_this_machine_never_crashes():
    with capture_logs() as logs:
        probe = open_probe("auto")
    try:
        snap = probe.snapshot()
        assert snap.total_mb > 0
        # Every backend tried before the chosen one failed exactly once, and said so.
        tried = ["nvidia", "amd", "host"]
        failed = [w["backend"] for w in warnings(logs)]
        assert failed == tried[: tried.index(probe.name)]
        assert len(events(logs, "gpu_backend")) == 1
    finally:
        probe.close()


def test_explicit_backend_that_fails_degrades_to_host(no_gpu_libraries):
    with capture_logs() as logs:
        probe = open_probe("nvidia")
    assert probe.name == "host"
    assert [w["backend"] for w in warnings(logs)] == ["nvidia"]


def test_none_means_host_without_warnings(no_gpu_libraries):
    with capture_logs() as logs:
        probe = open_probe("none")
    assert probe.name == "host"
    assert warnings(logs) == []
    assert "'none'" in events(logs, "gpu_backend_host")[0]["reason"]


def test_unknown_backend_is_a_programming_error():
    with pytest.raises(ValueError, match="cuda"):
        open_probe("cuda")


# ---------------------------------------------------------------------------------------------- NVIDIA (fake NVML)


def test_nvidia_probe_reads_memory_and_processes(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(processes=[(100, 3 * GIB), (101, None)]))
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    with capture_logs() as logs:
        probe = open_probe("auto")
    assert probe.name == "nvidia"
    assert warnings(logs) == []
    assert events(logs, "gpu_backend")[0]["device"] == "NVIDIA GeForce RTX 3090"
    snap = probe.snapshot()
    assert (snap.pool, snap.total_mb, snap.used_mb, snap.free_mb) == ("vram", 24576, 6144, 18432)
    assert (snap.vram_total_mb, snap.vram_used_mb, snap.gtt_total_mb) == (24576, 6144, None)
    assert snap.process_mb == {100: 3072}  # usedGpuMemory None (not attributable) is skipped


def test_nvidia_that_cannot_report_memory_is_skipped_and_shut_down(monkeypatch):
    nvml = fake_pynvml(memory_fails=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    with capture_logs() as logs:
        probe = open_probe("auto")
    assert probe.name == "host"
    assert [w["backend"] for w in warnings(logs)] == ["nvidia", "amd"]
    assert nvml.calls == ["init", "shutdown"]


def test_lost_gpu_raises_probe_error_only(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = open_probe("nvidia")
    nvml.lost = True
    with pytest.raises(ProbeError, match="GPU is lost"):
        probe.snapshot()
    probe.close()
    assert nvml.calls[-1] == "shutdown"


def test_real_nvml_when_a_gpu_is_present():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except Exception as e:  # any failure means no usable NVIDIA GPU here
        pytest.skip(f"NVML does not initialise here: {e}")
    pynvml.nvmlShutdown()
    probe = open_probe("nvidia")
    try:
        snap = probe.snapshot([os.getpid()])
        assert snap.backend == "nvidia" and snap.pool == "vram"
        assert 0 < snap.total_mb and 0 <= snap.used_mb <= snap.total_mb
        assert snap.device
    finally:
        probe.close()


# ---------------------------------------------------------------------------------------------- AMD (fake amdsmi)


def open_amd(monkeypatch, **fake):
    smi = fake_amdsmi(**fake)
    monkeypatch.setitem(sys.modules, "amdsmi", smi)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_fails=True))
    with capture_logs() as logs:
        probe = open_probe("auto")
    return probe, smi, logs


def test_amd_discrete_card_budgets_vram_even_when_gtt_is_larger(monkeypatch):
    # Modern kernels size GTT from system RAM (half or more of it), so a 24 GiB card on a 96 GiB host has more
    # GTT than VRAM; the model still has to fit in the 24 GiB.
    probe, _, logs = open_amd(monkeypatch, vram=(24 * GIB, 2 * GIB), gtt=(48 * GIB, 1 * GIB))
    assert probe.name == "amd"
    assert [w["backend"] for w in warnings(logs)] == ["nvidia"]
    snap = probe.snapshot()
    assert (snap.device, snap.pool, snap.total_mb, snap.used_mb) == ("AMD Radeon RX 7900 XTX", "vram", 24576, 2048)
    assert (snap.vram_total_mb, snap.vram_used_mb, snap.gtt_total_mb, snap.gtt_used_mb) == (24576, 2048, 49152, 1024)


def test_amd_apu_with_small_carveout_budgets_gtt(monkeypatch):
    # Strix Halo as usually set up for LLMs: 512 MiB BIOS carve-out, GTT raised to most of 128 GiB.
    processes = [{"pid": 7, "name": "llama-server", "mem": 0,
                  "memory_usage": {"vram_mem": 256 * MIB, "gtt_mem": 40 * GIB, "cpu_mem": 0}}]
    probe, _, logs = open_amd(monkeypatch, vram=(512 * MIB, 300 * MIB), gtt=(110 * GIB, 41 * GIB),
                              name="AMD Radeon 8060S", processes=processes)
    snap = probe.snapshot()
    assert (snap.pool, snap.total_mb, snap.used_mb) == ("gtt", 110 * 1024, 41 * 1024)
    assert (snap.vram_total_mb, snap.vram_used_mb) == (512, 300)
    assert snap.process_mb == {7: 40 * 1024}  # the pool's kind only, like used_mb
    chosen = events(logs, "gpu_backend")[0]
    assert (chosen["backend"], chosen["device"], chosen["pool"]) == ("amd", "AMD Radeon 8060S", "gtt")


def test_amd_apu_with_large_carveout_budgets_vram(monkeypatch):
    # The other Strix Halo setup: 96 GiB given to the GPU in the BIOS, GTT left small.
    probe, _, _ = open_amd(monkeypatch, vram=(96 * GIB, 0), gtt=(16 * GIB, 0))
    assert probe.snapshot().pool == "vram"


def test_apu_rule_boundary(monkeypatch):
    at_limit = APU_MAX_CARVEOUT_MB * MIB
    probe, _, _ = open_amd(monkeypatch, vram=(at_limit, 0), gtt=(32 * GIB, 0))
    assert probe.snapshot().pool == "gtt"
    probe, _, _ = open_amd(monkeypatch, vram=(at_limit + GIB, 0), gtt=(32 * GIB, 0))
    assert probe.snapshot().pool == "vram"


def test_amd_discrete_per_process_counts_vram_only(monkeypatch):
    processes = [{"pid": 9, "memory_usage": {"vram_mem": 5 * GIB, "gtt_mem": 64 * MIB, "cpu_mem": 0}}]
    probe, _, _ = open_amd(monkeypatch, processes=processes)
    assert probe.snapshot().process_mb == {9: 5 * 1024}


def test_amd_old_process_api_or_refusal_leaves_processes_unknown(monkeypatch):
    probe, smi, _ = open_amd(monkeypatch, processes=[object()])  # ROCm < 6.1 returns opaque handles
    assert probe.snapshot().process_mb is None

    def refuse(handle):
        raise smi.AmdSmiException("not supported")

    smi.amdsmi_get_gpu_process_list = refuse
    snap = probe.snapshot()
    assert snap.process_mb is None and snap.total_mb == 24576  # memory figures still arrive


def test_amd_without_that_device_degrades_and_shuts_down(monkeypatch):
    smi = fake_amdsmi(devices=0)
    monkeypatch.setitem(sys.modules, "amdsmi", smi)
    with capture_logs() as logs:
        probe = open_probe("amd")
    assert probe.name == "host"
    [failed] = warnings(logs)
    assert failed["backend"] == "amd" and "no AMD GPU with index 0" in failed["reason"]
    assert smi.calls == ["init", "shutdown"]


def test_amd_runtime_failure_is_a_probe_error(monkeypatch):
    probe, smi, _ = open_amd(monkeypatch)

    def lost(handle, kind):
        raise smi.AmdSmiException("AMDSMI_STATUS_NOT_FOUND")

    smi.amdsmi_get_gpu_memory_total = lost
    with pytest.raises(ProbeError, match="NOT_FOUND"):
        probe.snapshot()
    probe.close()
    assert smi.calls[-1] == "shutdown"
