"""scripts/bench.py --quick: the benchmark runs end to end against the real llama-server and reports every section."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SECTIONS = {
    "proxy": ["latency_ms", "overhead_p50_ms", "throughput_tokens_s", "throughput_vs_direct"],
    "swap": ["page_cache", "bare", "daemon", "over_bare_ms", "cold_penalty_ms"],
    "mixed": ["batching", "fifo"],
    "footprint": ["idle", "load", "rss_mb_max"],
}
# The failover section runs a real LiteLLM proxy: the test extra (litellm[proxy]) brings it; without it the section
# says it was skipped.
LITELLM = importlib.util.find_spec("litellm") is not None and (Path(sys.executable).parent / "litellm").exists()
if LITELLM:
    SECTIONS["failover"] = ["first_byte_ms", "answered"]


def numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


@pytest.mark.llama
@pytest.mark.timeout(90)
def test_quick_bench_writes_every_section(llama_server_bin, tmp_path):
    env = {**os.environ, "LLAMA_SERVER": llama_server_bin}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=85)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "benchmarks.json").read_text())
    assert report["machine"]["cpu"] and report["machine"]["llama_server_version"]
    for section, keys in SECTIONS.items():
        assert section in report, section
        for key in keys:
            assert numbers(report[section][key]), f"{section}.{key} has no numbers"
    router = report["router_mode"]["available"]
    assert ("router" in report["proxy"]["latency_ms"]) == router
    assert ("router" in report["mixed"]) == router
    for way, figures in report["proxy"]["latency_ms"].items():
        assert figures["p50"] > 0 and figures["p99"] >= figures["p50"], way
    assert report["footprint"]["rss_mb_max"] > 0
    assert report["targets"] and all(t["met"] in (True, False) for t in report["targets"])
    failover = report["failover"]
    assert ("skipped" in failover) == (not LITELLM)
    if LITELLM:  # every request through LiteLLM was answered (by the fallback, or locally if a swap was that quick)
        assert failover["answered"]["failed"] == 0 and failover["first_byte_ms"]["litellm_cloud"] > 0
        assert "failover" in {t["id"] for t in report["targets"]}

    markdown = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Machine", "## Targets", "## 1. Proxy overhead", "## 2. Swap latency", "## 3. Mixed workload",
                    "## 4. Footprint", "## 7. Failover with LiteLLM"):  # fmt: skip
        assert heading in markdown
    for target in report["targets"]:
        if not target["met"]:  # a missed target gets a marked place for the why
            assert f"<!-- why:{target['id']} -->" in markdown
