"""Chaos soak, short: scripts/chaos.py run as CI does, for CHAOS_DURATION_S seconds (default 25) of mixed traffic
with llama-server children SIGKILLed, the state tmpfs filled and the config reloaded at random moments.

The script is run once for the module (it starts its own daemon, models and fake cloud target and stops them all);
the tests read its --json report. It exits 0 only when every failed request was one whose child was killed while
answering it, nothing got stuck and the daemon's RSS, fds and threads stayed flat: on failure the assertion shows
its summary, and docs/chaos.md says how to read it. CHAOS_SEED replays a run's random choices (not its timing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DURATION_S = float(os.environ.get("CHAOS_DURATION_S", "25"))

# The run is set up inside the first test's timeout: warm-up, chaos, settling and shutdown, with room.
pytestmark = [pytest.mark.llama, pytest.mark.timeout(DURATION_S + 300)]


@pytest.fixture(scope="module")
def chaos_run(llama_server_bin, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path_factory.mktemp("chaos") / "chaos.json"
    argv = [sys.executable, str(REPO / "scripts" / "chaos.py"), "--duration-s", f"{DURATION_S:g}", "--warmup-s", "5",
            "--json", str(out)]  # fmt: skip
    if os.environ.get("CHAOS_SEED"):
        argv += ["--seed", os.environ["CHAOS_SEED"]]
    env = {**os.environ, "LLAMA_SERVER": llama_server_bin}
    # The script bounds itself; this is a backstop below the test's timeout, so its output is still shown.
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=DURATION_S + 280)  # fmt: skip
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_chaos_every_failure_is_expected_nothing_is_stuck_and_the_daemon_stays_flat(chaos_run):
    proc, report = chaos_run
    assert report is not None, f"no report; output:\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, f"chaos failed:\n{proc.stdout[-6000:]}"
    assert report["ok"] and report["failed_checks"] == []
    requests = report["requests"]
    assert requests["ok"] >= 50, requests
    assert requests["unexpected_failures"] == 0
    faults = report["faults"]
    assert faults["kills"] >= 2 and faults["kills_not_noticed"] == [], faults
    assert faults["reloads"] >= 1 and faults["reload_problems"] == [], faults
    assert report["stuck"] == {"requests": [], "admin": [], "models_not_settled": {}, "ghost_children": []}
    assert report["sigterm"]["exit_code"] == 0 and report["sigterm"]["children_left"] == []
    print("\n" + proc.stdout[proc.stdout.find("chaos: "):])


def test_chaos_filled_the_state_tmpfs(chaos_run):
    proc, report = chaos_run
    assert report is not None, f"no report; output:\n{proc.stdout[-6000:]}"
    tmpfs = report["meta"]["tmpfs"]
    if not tmpfs["mounted"]:
        pytest.skip(f"could not mount a tmpfs for the state dir ({tmpfs['reason']}): no fill faults")
    assert report["faults"]["fills"] >= 1, report["faults"]
    assert report["faults"]["fill_reached_100pct"] >= 1, report["faults"]
