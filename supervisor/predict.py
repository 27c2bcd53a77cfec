"""Predicted preload: load a model shortly before the time of day it is usually first asked for.

Pure functions over the ledger's history: for each model and local calendar day, the first request's time of day;
a model is expected today when it was first asked for on at least `MIN_DAYS` of the last `LOOKBACK_DAYS` days of
the same kind (weekday or weekend), at times that agree, at the median of those first times. The daemon loads it `lead_s` before that,
when nothing else waits and it fits (see the core's home rules); never counted as usage. `replay` runs the rule
over a generated history to measure it (hit rate of the day's first request, loads nobody used).
"""

from __future__ import annotations

import datetime
import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

LOOKBACK_DAYS = 14
MIN_DAYS = 3
DAY_S = 86400


def first_uses(rows: Iterable[tuple[str, float]]) -> dict[str, dict[datetime.date, float]]:
    """(model, unix time) of requests → per model, per local day, the first request's seconds since midnight."""
    out: dict[str, dict[datetime.date, float]] = {}
    for model, at in rows:
        moment = datetime.datetime.fromtimestamp(at)
        day = moment.date()
        seconds = moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6
        days = out.setdefault(model, {})
        if day not in days or seconds < days[day]:
            days[day] = seconds
    return out


def _same_kind(a: datetime.date, b: datetime.date) -> bool:
    return (a.weekday() >= 5) == (b.weekday() >= 5)


def expected_today(history: dict[str, dict[datetime.date, float]], today: datetime.date,
                   lead_s: float) -> dict[str, float]:
    """Models expected today, with the seconds since midnight they are usually first asked for: first asked on at
    least MIN_DAYS recent days of the same kind, at times that agree (median absolute deviation within lead_s; a
    model first used at any hour is not predicted: a preload would mostly be wasted)."""
    out: dict[str, float] = {}
    for model, days in history.items():
        recent = [seconds for day, seconds in days.items()
                  if 0 < (today - day).days <= LOOKBACK_DAYS and _same_kind(day, today)]
        if len(recent) < MIN_DAYS:
            continue
        usual = statistics.median(recent)
        if statistics.median(abs(s - usual) for s in recent) <= lead_s:
            out[model] = usual
    return out


def due(history: dict[str, dict[datetime.date, float]], now: float, lead_s: float,
        done: set[tuple[str, datetime.date]]) -> list[str]:
    """Models to preload now: expected today, within lead_s before their usual time, not yet preloaded today."""
    moment = datetime.datetime.fromtimestamp(now)
    today = moment.date()
    seconds = moment.hour * 3600 + moment.minute * 60 + moment.second
    return [model for model, usual in expected_today(history, today, lead_s).items()
            if usual - lead_s <= seconds < usual and (model, today) not in done]


@dataclass(frozen=True)
class ReplayResult:
    days: int
    first_requests: int  # days on which the model was asked for
    hits: int  # of those, days on which it was already loaded by a preload at its first request
    preloads: int
    unused_preloads: int  # preloads not followed by a request that day
    per_model: dict[str, tuple[int, int]]  # model -> (days asked for, days found preloaded)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.first_requests if self.first_requests else 0.0


def generated_month(seed: int = 7, days: int = 30, start: datetime.date | None = None) -> list[tuple[str, float]]:
    """A month of one user's requests: a morning brief on weekdays around 07:00 (sd 10 min, skipped one day in
    ten), a coder model during working hours on most weekdays, and evening chats at random times."""
    rng = random.Random(seed)
    first = start or datetime.date(2026, 11, 2)
    rows: list[tuple[str, float]] = []
    for n in range(days):
        day = first + datetime.timedelta(days=n)
        midnight = datetime.datetime.combine(day, datetime.time()).timestamp()
        weekday = day.weekday() < 5
        if weekday and rng.random() > 0.1:
            start_s = 7 * 3600 + rng.gauss(0, 600)
            rows += [("brief", midnight + start_s + k * 20) for k in range(rng.randint(3, 8))]
        if weekday and rng.random() > 0.25:
            start_s = 9 * 3600 + rng.uniform(0, 3 * 3600)
            rows += [("coder", midnight + start_s + k * 300) for k in range(rng.randint(5, 30))]
        for _ in range(rng.randint(0, 4)):
            rows.append(("chat", midnight + rng.uniform(17 * 3600, 23 * 3600)))
    return sorted(rows, key=lambda r: r[1])


def replay(rows: list[tuple[str, float]], lead_s: float = 600, warmup_days: int = 14,
           ttl_s: float = 3600) -> ReplayResult:
    """Run the rule day by day over a history (each day predicted from the days before it only), checking every
    minute; a preloaded model stays ready for ttl_s. Counts the days after warmup_days."""
    by_day: dict[datetime.date, list[tuple[str, float]]] = {}
    for model, at in rows:
        by_day.setdefault(datetime.date.fromtimestamp(at), []).append((model, at))
    days = sorted(by_day)
    if not days:
        return ReplayResult(0, 0, 0, 0, 0, {})
    first_day, last_day = days[0], days[-1]
    counted = first_requests = hits = preloads = unused = 0
    per_model: dict[str, tuple[int, int]] = {}
    day = first_day + datetime.timedelta(days=warmup_days)
    while day <= last_day:
        counted += 1
        before = [r for r in rows if datetime.date.fromtimestamp(r[1]) < day]
        history = first_uses(before)
        midnight = datetime.datetime.combine(day, datetime.time()).timestamp()
        loaded_at: dict[str, float] = {}
        done: set[tuple[str, datetime.date]] = set()
        for minute in range(24 * 60):
            now = midnight + minute * 60
            for model in due(history, now, lead_s, done):
                done.add((model, day))
                loaded_at[model] = now
                preloads += 1
        today = by_day.get(day, [])
        firsts: dict[str, float] = {}
        for model, at in today:
            firsts.setdefault(model, at)
        for model, at in firsts.items():
            first_requests += 1
            preloaded = loaded_at.get(model)
            hit = preloaded is not None and preloaded <= at <= preloaded + ttl_s
            hits += hit
            asked, found = per_model.get(model, (0, 0))
            per_model[model] = (asked + 1, found + hit)
        unused += sum(1 for model, at in loaded_at.items()
                      if not any(m == model and at <= t <= at + ttl_s for m, t in today))
        day += datetime.timedelta(days=1)
    return ReplayResult(counted, first_requests, hits, preloads, unused, per_model)
