"""Estimate against what NVML measures, on a real NVIDIA GPU. Skipped where there is none (CI never has one).

Needs NVML and a llama-server built with CUDA: LLAMA_SERVER_CUDA=/path/to/llama-server (or LLAMA_SERVER, if that
one lists a CUDA device). The figures it prints go into docs/memory.md.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from model_supervisor.estimate import estimate_model
from model_supervisor.gpu import NvidiaProbe
from model_supervisor.testmodels import write_test_model

pytestmark = pytest.mark.llama


def cuda_llama_server() -> str | None:
    for candidate in (os.environ.get("LLAMA_SERVER_CUDA"), os.environ.get("LLAMA_SERVER")):
        if not candidate:
            continue
        listed = subprocess.run([candidate, "--list-devices"], capture_output=True, text=True, timeout=60)
        if "CUDA" in listed.stdout + listed.stderr:
            return candidate
    return None


@pytest.fixture(scope="module")
def nvidia():
    try:
        probe = NvidiaProbe(0)
        probe.snapshot()
    except Exception as exc:  # any NVML failure (missing library, no device) means: no GPU to test on
        pytest.skip(f"no usable NVML here: {exc}")
    binary = cuda_llama_server()
    if binary is None:
        probe.close()
        pytest.skip("no CUDA-enabled llama-server (set LLAMA_SERVER_CUDA)")
    yield probe, binary
    probe.close()


@pytest.mark.parametrize(("size_mb", "ctx", "cache"), [(300, 4096, "f16"), (300, 32768, "q8_0")])
async def test_estimate_is_close_to_what_nvml_measures(nvidia, start_daemon, tmp_path, size_mb, ctx, cache, monkeypatch):
    probe, binary = nvidia
    monkeypatch.setenv("LLAMA_SERVER", binary)
    model = write_test_model(tmp_path / "gpu.gguf", seed=7, size_mb=size_mb)
    args = ["-c", str(ctx), "-ngl", "999", "--cache-type-k", cache, "--cache-type-v", cache, "-fa", "on"]
    estimate = estimate_model(model, args, on_gpu=True)
    d = await start_daemon({"g": {"model": str(model), "args": args}}, probe=probe)
    status, _, _ = await d.chat("g")
    assert status == 200
    measured = d.runtime.core.models["g"].need_mb
    assert d.runtime.memory.need_source["g"] == "learned"
    print(f"\nNVML: {size_mb} MB model, ctx {ctx}, cache {cache}: estimate {estimate.total_mb} MB "
          f"(weights {estimate.weights_mb}, kv {estimate.kv_mb}, compute {estimate.compute_mb}), measured {measured} MB")
    # The estimate only has to be in the right range: the learned figure replaces it after the first load.
    assert 0.5 * measured <= estimate.total_mb <= 2.0 * measured
