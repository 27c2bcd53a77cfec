"""The usage ledger: costs, the /usage document, durability, a writer that never holds up the event loop, the
`usage` and `models stale` commands, and the daemon writing it end to end."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aiohttp import web

from model_supervisor.config import ConfigError, parse_config
from model_supervisor.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    costs,
    ledger_path,
    open_readonly,
    usage_from,
)
from model_supervisor import ledger as ledger_module
from model_supervisor.records import RequestRecord

REPO = Path(__file__).resolve().parent.parent
CLOUD = {
    "cheap": {"base_url": "http://127.0.0.1:9/v1", "model": "small", "input_usd_per_mtok": 1,
              "output_usd_per_mtok": 2},
    "frontier": {"base_url": "http://127.0.0.1:9/v1", "model": "big", "input_usd_per_mtok": 3,
                 "output_usd_per_mtok": 15},
}  # fmt: skip
CHEAP = 1000 * 1 / 1e6 + 500 * 2 / 1e6  # 1000 tokens in, 500 out at cheap's prices
FRONTIER = 1000 * 3 / 1e6 + 500 * 15 / 1e6
USAGE_KEYS = {"days", "requests", "local", "cloud", "rejected", "tokens_in", "tokens_out", "local_share",
              "cloud_cost_usd", "saved_usd", "daily"}  # fmt: skip


def config_with(cloud: dict | None = None, ledger: dict | None = None, state_dir: str = "/tmp/unused"):
    models = {"a": {"model": "a.gguf", "fallback": "frontier"}, "b": {"model": "b.gguf"}}
    if not cloud:
        models["a"].pop("fallback")
    return parse_config({"daemon": {"state_dir": state_dir}, "models": models, "cloud": cloud or {},
                         "ledger": ledger or {}})  # fmt: skip


def rec(model: str = "a", route: str = "local", provider: str = "local", tokens=(1000, 500),
        at: float | None = None, status: int = 200) -> RequestRecord:
    return RequestRecord(started_at=time.time() if at is None else at, requested=model, model=model,
                         provider=provider, route=route, endpoint="/v1/chat/completions", status=status,
                         fallback_reason=None if route != "cloud" else "loading", tokens_in=tokens[0],
                         tokens_out=tokens[1], wait_ms=1.0, ttft_ms=None if route == "rejected" else 5.0,
                         total_ms=9.0)  # fmt: skip


def noon(days_ago: int) -> float:
    """Noon, local time, so a bucket's date does not depend on time zones or DST."""
    day = datetime.date.today() - datetime.timedelta(days=days_ago)
    return datetime.datetime.combine(day, datetime.time(12)).timestamp()


@pytest.fixture
def make_ledger(tmp_path):
    opened: list[Ledger] = []

    def make(config=None) -> Ledger:
        ledger = Ledger(tmp_path / "ledger.sqlite3", config or config_with(CLOUD))
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


# ---------------------------------------------------------------- costs


def test_cloud_rows_cost_their_targets_prices_and_local_rows_nothing():
    config = config_with(CLOUD)
    assert costs(config, rec("a", "cloud", "cheap")) == pytest.approx((CHEAP, FRONTIER))
    assert costs(config, rec("a", "cloud", "frontier")) == pytest.approx((FRONTIER, FRONTIER))
    assert costs(config, rec("a", "local"))[0] == 0
    assert costs(config, rec("a", "rejected", tokens=(None, None))) == (0, 0)
    assert costs(config, rec("a", "cloud", "gone-from-config")) == pytest.approx((0, FRONTIER))


def test_cost_if_cloud_uses_reference_target_then_fallback_then_first_target():
    by_rule = config_with(CLOUD)
    assert costs(by_rule, rec("a"))[1] == pytest.approx(FRONTIER)  # a's fallback
    assert costs(by_rule, rec("b"))[1] == pytest.approx(CHEAP)  # no fallback: the first [cloud.*] target
    assert costs(by_rule, rec("frontier", "cloud", "frontier"))[1] == pytest.approx(FRONTIER)  # asked by name
    referenced = config_with(CLOUD, {"reference_target": "cheap"})
    assert costs(referenced, rec("a"))[1] == pytest.approx(CHEAP)  # the reference wins over the fallback
    assert costs(config_with(), rec("a")) == (0, 0)  # no cloud target at all
    assert costs(by_rule, rec("a", tokens=(None, 500)))[1] == pytest.approx(500 * 15 / 1e6)  # missing: 0 tokens


def test_the_ledger_prices_with_the_live_config(make_ledger):
    live = [config_with(CLOUD)]
    ledger = make_ledger(lambda: live[0])
    ledger.record(rec("a"))
    assert ledger.usage(1)["saved_usd"] == pytest.approx(FRONTIER)
    live[0] = config_with(CLOUD, {"reference_target": "cheap"})  # what a reload does
    ledger.record(rec("a"))
    assert ledger.usage(1)["saved_usd"] == pytest.approx(FRONTIER + CHEAP)  # old rows keep their price


def test_reference_target_must_name_a_cloud_target():
    with pytest.raises(ConfigError) as error:
        config_with(CLOUD, {"reference_target": "nope"})
    assert "ledger.reference_target: no [cloud.nope] section" in str(error.value)
    with pytest.raises(ConfigError) as error:
        config_with(CLOUD, {"local_share_target": 1.5})
    assert "ledger.local_share_target" in str(error.value)


# ---------------------------------------------------------------- the /usage document


def test_usage_counts_tokens_share_money_and_daily_buckets(make_ledger):
    ledger = make_ledger()
    ledger.record(rec("a", tokens=(100, 50), at=noon(0)))
    ledger.record(rec("a", "cloud", "frontier", at=noon(0)))
    ledger.record(rec("b", "rejected", tokens=(None, None), at=noon(2), status=503))
    ledger.record(rec("b", at=noon(3)))
    ledger.record(rec("a", at=noon(10)))  # outside a 7-day window
    usage = ledger.usage(7)
    assert set(usage) == USAGE_KEYS
    assert {k: usage[k] for k in ("days", "requests", "local", "cloud", "rejected", "tokens_in", "tokens_out")} == {
        "days": 7, "requests": 4, "local": 2, "cloud": 1, "rejected": 1, "tokens_in": 2100, "tokens_out": 1050}
    # The refused request was asked of this host too (a router sent it elsewhere): 2 local of 4 asked.
    assert usage["local_share"] == pytest.approx(2 / 4, abs=1e-4)
    assert usage["cloud_cost_usd"] == pytest.approx(FRONTIER)
    # What the local requests would have cost: a at frontier's prices (its fallback), b at cheap's (first target).
    assert usage["saved_usd"] == pytest.approx((100 * 3 + 50 * 15) / 1e6 + CHEAP)
    dates = [(datetime.date.today() - datetime.timedelta(days=n)).isoformat() for n in range(6, -1, -1)]
    assert [d["date"] for d in usage["daily"]] == dates  # oldest first, every day present
    assert usage["daily"][-1] == {"date": dates[-1], "local": 1, "cloud": 1, "rejected": 0}
    assert usage["daily"][-3] == {"date": dates[-3], "local": 0, "cloud": 0, "rejected": 1}
    assert usage["daily"][-4] == {"date": dates[-4], "local": 1, "cloud": 0, "rejected": 0}
    assert sum(d["local"] + d["cloud"] + d["rejected"] for d in usage["daily"]) == usage["requests"]
    assert ledger.usage(30)["requests"] == 5 and len(ledger.usage(30)["daily"]) == 30
    assert ledger.usage(1)["requests"] == 2 and len(ledger.usage(0.5)["daily"]) == 1


def test_an_empty_ledger_has_no_local_share(make_ledger):
    usage = make_ledger().usage(3)
    assert usage["requests"] == 0 and usage["local_share"] is None and usage["saved_usd"] == 0
    assert [(d["local"], d["cloud"], d["rejected"]) for d in usage["daily"]] == [(0, 0, 0)] * 3


def test_last_used_is_each_models_latest_request(make_ledger):
    ledger = make_ledger()
    for model, at in (("a", 100.0), ("a", 300.0), ("b", 200.0)):
        ledger.record(rec(model, at=at))
    assert ledger.last_used() == {"a": 300.0, "b": 200.0}


# ---------------------------------------------------------------- the file


def test_the_file_is_wal_versioned_and_written_in_full_on_close(tmp_path, make_ledger):
    ledger = make_ledger()
    for _ in range(1200):  # more than one batch
        ledger.record(rec())
    ledger.close()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert check.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1200
    ledger.record(rec())  # after close: ignored, not an error


def test_a_newer_schema_is_refused_and_the_daemon_goes_on_without_a_ledger(tmp_path):
    config = config_with(CLOUD, state_dir=str(tmp_path))
    with sqlite3.connect(ledger_path(config)) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer"):
        Ledger(ledger_path(config), config)
    assert Ledger.open(config) is None


def test_reading_a_closed_ledger_creates_no_files(tmp_path, make_ledger):
    ledger = make_ledger()
    ledger.record(rec())
    ledger.close()
    before = sorted(os.listdir(tmp_path))
    connection = open_readonly(tmp_path / "ledger.sqlite3")
    assert usage_from(connection, 1)["requests"] == 1
    connection.close()
    assert sorted(os.listdir(tmp_path)) == before  # no -wal/-shm left behind owned by the CLI's user
    with pytest.raises(FileNotFoundError):
        open_readonly(tmp_path / "none.sqlite3")


CRASHING_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    from model_supervisor.config import parse_config
    from model_supervisor.ledger import Ledger
    from model_supervisor.records import RequestRecord
    ledger = Ledger(sys.argv[1], parse_config({}))
    for n in range(3):
        ledger.record(RequestRecord(started_at=time.time(), requested="a", model="a", provider="local",
                                    route="local", endpoint="/v1/completions", status=200, fallback_reason=None,
                                    tokens_in=10, tokens_out=n, wait_ms=0.0, ttft_ms=1.0, total_ms=2.0))
    assert ledger.flush(30)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no checkpoint, no atexit
""")


def test_committed_rows_survive_the_process_being_killed(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    killed = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert path.with_name(path.name + "-wal").exists()  # the rows are still only in the WAL
    connection = open_readonly(path)
    assert connection.execute("SELECT tokens_out FROM requests ORDER BY id").fetchall() == [(0,), (1,), (2,)]
    connection.close()


def test_record_does_not_wait_for_a_blocked_writer(tmp_path, make_ledger):
    ledger = make_ledger()
    blocker = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer now waits for this lock
    try:
        ledger.record(rec())
        assert not ledger.flush(timeout=0.2)  # stuck behind the lock
        calls = []
        for _ in range(1000):
            started = time.perf_counter()
            ledger.record(rec())
            calls.append(time.perf_counter() - started)
        # The median, not the mean: on a busy machine a few calls are preempted; waiting for the writer would make
        # them all slow (and one would take the 5 s busy timeout).
        per_call = sorted(calls)[len(calls) // 2]
        assert per_call < 1e-4 and max(calls) < 1, \
            f"record() took {per_call * 1e6:.0f} µs (slowest {max(calls):.3f} s) while the writer was blocked"
        assert blocker.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    finally:
        blocker.execute("COMMIT")
    assert ledger.flush(timeout=30)
    assert blocker.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1001
    blocker.close()


async def test_requests_recorded_on_the_loop_share_one_transaction_and_a_read_sees_them_all(tmp_path, make_ledger,
                                                                                          monkeypatch):
    monkeypatch.setattr(ledger_module, "HAND_OVER_S", 0.02)
    ledger = make_ledger()
    transactions = []
    insert = ledger._insert
    ledger._insert = lambda connection, batch: (transactions.append(len(batch)), insert(connection, batch))
    for _ in range(50):
        ledger.record(rec())
    assert transactions == []  # kept on the loop for the next ones to join
    assert ledger.usage(1)["requests"] == 50  # a read flushes first
    assert transactions == [50]
    ledger.record(rec())
    ledger.record(rec())
    while len(transactions) < 2:  # handed over after HAND_OVER_S without a read (flush would hand it over itself)
        await asyncio.sleep(0.005)
    assert transactions == [50, 2]


# ---------------------------------------------------------------- models stale


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_supervisor.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip


def test_models_stale_lists_unused_files_with_sizes_and_deletes_nothing(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    files = {
        "fresh": folder / "fresh.gguf",  # old atime, but the ledger saw a request today
        "old": folder / "old.gguf",
        "recent": folder / "recent.gguf",
        "split": folder / "big-00001-of-00002.gguf",
    }
    second_shard = folder / "big-00002-of-00002.gguf"
    for size, path in enumerate([*files.values(), second_shard], start=1):
        path.write_bytes(b"x" * size * 1000)
    lines = ['[daemon]', f'state_dir = "{tmp_path / "state"}"']
    for name, path in files.items():
        lines += [f"[models.{name}]", f'model = "{path}"']
    config_file = tmp_path / "models.toml"
    config_file.write_text("\n".join(lines) + "\n")
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(state / "ledger.sqlite3", parse_config({}))
    ledger.record(rec("fresh"))
    ledger.close()
    now = time.time()
    long_ago = now - 40 * 86400
    for path in (files["fresh"], files["old"], files["split"], second_shard):
        os.utime(path, (long_ago, long_ago))

    result = cli("models", "stale", "--config", str(config_file), "--days", "30", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    listed = {Path(entry["path"]).name: entry for entry in report["files"]}
    assert set(listed) == {"old.gguf", "big-00001-of-00002.gguf", "big-00002-of-00002.gguf"}
    assert listed["big-00002-of-00002.gguf"]["models"] == ["split"]
    assert listed["old.gguf"]["source"] == "atime" and listed["old.gguf"]["last_used"] == pytest.approx(long_ago)
    assert report["total_bytes"] == 2000 + 4000 + 5000
    assert all(path.exists() for path in [*files.values(), second_shard])

    text = cli("models", "stale", "--config", str(config_file))
    assert text.returncode == 0 and "3 files" in text.stdout and "Nothing was deleted" in text.stdout
    assert "10.7 KiB" in text.stdout  # 11000 bytes

    # A model never asked for since a ledger that began long ago is stale, however fresh its atime (the daemon
    # reads GGUF headers at start); a modified file is not.
    with sqlite3.connect(state / "ledger.sqlite3") as backdate:
        backdate.execute("UPDATE meta SET value = ? WHERE key = 'created_at'", (str(now - 60 * 86400),))
    os.utime(files["recent"], (now, now - 70 * 86400))  # read today, written before the ledger began
    report = json.loads(cli("models", "stale", "--config", str(config_file), "--json").stdout)
    sources = {Path(entry["path"]).name: entry["source"] for entry in report["files"]}
    assert sources["recent.gguf"] == "ledger_start" and "fresh.gguf" not in sources

    # Without the ledger only the files' times count: the request for `fresh` is forgotten.
    for leftover in state.iterdir():
        leftover.unlink()
    report = json.loads(cli("models", "stale", "--config", str(config_file), "--json").stdout)
    assert report["ledger"] is None and "fresh.gguf" in {Path(e["path"]).name for e in report["files"]}


# ---------------------------------------------------------------- end to end, with the daemon


class UsageCloud:
    """A cloud target on loopback that reports token usage, as real providers do."""

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"object": "chat.completion", "model": body["model"],
                                  "choices": [{"message": {"role": "assistant", "content": "from the cloud"}}],
                                  "usage": {"prompt_tokens": 1000, "completion_tokens": 500}})  # fmt: skip


@pytest.fixture
async def usage_cloud():
    app = web.Application()
    app.router.add_post("/v1/chat/completions", UsageCloud().completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()


async def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI as a child process, awaited: the daemon it talks to runs on this event loop."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "model_supervisor.cli", *args, cwd=REPO,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.llama
async def test_the_daemon_records_local_and_cloud_requests(start_daemon, tiny_models, usage_cloud, tmp_path):
    state_dir = tmp_path / "usage-state"
    cloud = {"frontier": {"base_url": usage_cloud, "model": "big", "input_usd_per_mtok": 3,
                          "output_usd_per_mtok": 15}}  # fmt: skip
    models = {"chat": {"model": str(tiny_models[1]), "args": ["-c", "512"], "fallback": "frontier",
                       "fallback_after_ms": 60_000}}  # fmt: skip
    d = await start_daemon(models, cloud=cloud, state_dir=str(state_dir))
    records: list[RequestRecord] = []
    both_seen = asyncio.Event()

    def seen(record: RequestRecord) -> None:  # after the ledger's observer: once this runs, the ledger has it
        records.append(record)
        if len(records) == 2:
            both_seen.set()

    d.daemon.proxy.observers.append(seen)
    status, _, headers = await d.chat("chat", max_tokens=5)
    assert status == 200 and headers["X-Served-By"] == "local"
    status, _, headers = await d.chat("frontier")
    assert status == 200 and headers["X-Served-By"] == "cloud"
    await asyncio.wait_for(both_seen.wait(), 10)
    local = next(r for r in records if r.route == "local")
    assert local.tokens_in and local.tokens_out == 5

    status, usage = await d.get_json("/usage?days=7")
    assert status == 200 and set(usage) == USAGE_KEYS | {"local_share_target"}
    assert usage.pop("local_share_target") == 0.7  # the API adds [ledger] local_share_target for the dashboard
    assert (usage["requests"], usage["local"], usage["cloud"], usage["rejected"]) == (2, 1, 1, 0)
    assert (usage["tokens_in"], usage["tokens_out"]) == (local.tokens_in + 1000, 505)
    assert usage["local_share"] == 0.5
    assert usage["cloud_cost_usd"] == pytest.approx(FRONTIER)
    assert usage["saved_usd"] == pytest.approx((local.tokens_in * 3 + 5 * 15) / 1e6)
    assert usage["daily"][-1] == {"date": datetime.date.today().isoformat(), "local": 1, "cloud": 1, "rejected": 0}

    code, out, err = await run_cli("usage", "--url", d.url, "--json")
    assert code == 0, err
    from_cli = json.loads(out)
    from_cli.pop("local_share_target", None)
    assert from_cli == usage
    code, out, err = await run_cli("usage", "--url", d.url)
    assert code == 0, err
    assert "2  (local 1, cloud 1, rejected 0)" in out and "50%  (target 70%: below)" in out
    assert "cloud spend  $0.0105" in out

    # With the daemon gone, the same figures come from the file in the config's state_dir.
    await d.daemon.stop()
    config_file = tmp_path / "usage.toml"
    config_file.write_text(f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{state_dir}"\n')
    code, out, err = await run_cli("usage", "--config", str(config_file), "--json")
    assert code == 0, err
    assert json.loads(out) == usage and "unreachable" in err
