"""Predicted preload: from a history of first requests per day, the models due shortly before their usual time."""

from __future__ import annotations

import datetime

from model_supervisor import predict
from model_supervisor.scheduler import PreloadWanted, StartProcess, UnloadRequested
from model_supervisor.watchers import PredictedPreloader
from test_scheduler_core import Sim, kinds


def at(day: datetime.date, hour: int, minute: int = 0) -> float:
    return datetime.datetime.combine(day, datetime.time(hour, minute)).timestamp()


MONDAY = datetime.date(2026, 11, 30)
WEEKDAYS_BEFORE = [MONDAY - datetime.timedelta(days=n) for n in range(1, 15) if (MONDAY - datetime.timedelta(days=n)).weekday() < 5]


def test_a_model_first_asked_at_a_steady_time_is_due_shortly_before_it():
    rows = [("brief", at(day, 7, minute)) for day, minute in zip(WEEKDAYS_BEFORE, [0, 5, 55, 2, 10, 3, 8, 1, 4, 6])]
    rows += [("brief", at(day, 9)) for day in WEEKDAYS_BEFORE]  # later requests do not move the first
    history = predict.first_uses(rows)
    usual = predict.expected_today(history, MONDAY, lead_s=600)
    assert set(usual) == {"brief"} and 6.9 * 3600 < usual["brief"] < 7.2 * 3600
    done: set = set()
    assert predict.due(history, at(MONDAY, 6, 30), 600, done) == []  # too early
    assert predict.due(history, at(MONDAY, 6, 58), 600, done) == ["brief"]
    done.add(("brief", MONDAY))
    assert predict.due(history, at(MONDAY, 6, 59), 600, done) == []  # once a day
    saturday = MONDAY + datetime.timedelta(days=5)
    assert predict.due(history, at(saturday, 6, 58), 600, set()) == []  # weekdays predict weekdays


def test_a_model_used_at_any_hour_or_rarely_is_not_predicted():
    scattered = [("chat", at(day, (8 + 3 * n) % 24)) for n, day in enumerate(WEEKDAYS_BEFORE)]
    rare = [("rare", at(day, 7)) for day in WEEKDAYS_BEFORE[:2]]
    assert predict.expected_today(predict.first_uses(scattered + rare), MONDAY, lead_s=600) == {}


def test_a_month_replayed_finds_the_morning_brief_ready_and_wastes_few_loads():
    result = predict.replay(predict.generated_month(days=45))
    asked, found = result.per_model["brief"]
    assert found / asked >= 0.7
    assert result.unused_preloads <= 0.3 * result.preloads
    assert result.per_model["chat"][1] == 0  # random evening chats are not guessed at


def test_the_core_loads_a_predicted_model_by_the_home_rules_until_its_window_ends():
    sim = Sim({"brief": {"ttl_s": 60}, "other": {}})
    actions = sim.send(PreloadWanted("brief", until=100, now=0))
    assert [(a.model, a.cause) for a in actions if isinstance(a, StartProcess)] == [("brief", "predicted")]
    sim.loaded("brief")
    assert kinds(sim.advance(60)) == [("stop", "brief", "ttl")]  # not a home: its TTL holds
    assert not any(isinstance(a, StartProcess) for a in sim.stopped("brief"))  # loaded once per prediction


def test_a_predicted_model_waits_while_requests_wait_and_is_forgotten_after_its_window():
    sim = Sim({"brief": {}, "other": {}})
    request_id, _ = sim.request("other")
    assert [a for a in sim.send(PreloadWanted("brief", until=50, now=0)) if isinstance(a, StartProcess)] == []
    sim.loaded("other")
    sim.finish(request_id)  # nothing waits now, but other is resident (same group): brief would displace it
    assert sim.phase("brief").value == "unloaded"
    sim.send(UnloadRequested("other", sim.now, cause="ttl"))
    sim.now = 51
    assert not any(isinstance(a, StartProcess) for a in sim.stopped("other"))  # its window is over


class FakeLedger:
    def __init__(self, rows):
        self.rows = rows

    def request_times(self, since: float):
        return [r for r in self.rows if r[1] >= since]


async def test_the_preloader_reads_the_ledger_and_skips_models_no_longer_configured(start_fake_daemon, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    d = await start_fake_daemon({"brief": {"model": str(model), "vram_mb": 1}}, predict_preload=True)
    rows = [(name, at(day, 7)) for day in WEEKDAYS_BEFORE for name in ("brief", "gone")]
    preloader = PredictedPreloader(d.runtime, FakeLedger(rows))
    assert preloader.check(at(MONDAY, 6, 55)) == ["brief"]
