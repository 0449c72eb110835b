"""The policy table: readings + config + store state -> decision with reasons."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketd.daemon.policy import decide, decide_train_now, effective_on_power, should_stop
from pocketd.daemon.readings import Decision, PowerReading, Readings, StoreState
from pocketd.daemon.settings import PolicyConfig

TZ = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 3, 5, 2, 0, tzinfo=TZ)  # 02:00 local, inside 23:00-07:00

GOOD_POWER = PowerReading(on_power=True, percent=80.0, temperature_c=30.0, status="CHARGING",
                          has_battery=True, source="fake")
UNPLUGGED = replace(GOOD_POWER, on_power=False, status="DISCHARGING")
UNKNOWN_POWER = PowerReading(on_power=None, percent=None, temperature_c=None, status=None, has_battery=None,
                             source="termux", error="termux-battery-status timed out")
DESKTOP = PowerReading(on_power=True, percent=None, temperature_c=None, status=None, has_battery=False,
                       source="psutil")
DESKTOP_RAW = replace(DESKTOP, on_power=None, error="no battery found (no_battery_means_mains is off)")


def readings(**kw: Any) -> Readings:
    base: dict[str, Any] = dict(now=NOW, power=GOOD_POWER, load1=0.3, available_mb=2048.0, user_away=None,
                                trainer_rss_mb=None)
    power_kw = {k[6:]: kw.pop(k) for k in list(kw) if k.startswith("power_")}
    base.update(kw)
    if power_kw:
        base["power"] = replace(base["power"], **power_kw)
    return Readings(**base)


def state(**kw: Any) -> StoreState:
    base: dict[str, Any] = dict(untrained_examples=10, last_session_end=None, training_since=None)
    base.update(kw)
    return StoreState(**base)


def policy(**kw: Any) -> PolicyConfig:
    if kw.get("timezone") == "Mars/Base":  # refused by the config since issue 15; the policy must still not raise
        return PolicyConfig().model_copy(update=kw)
    return PolicyConfig(**kw)


# (id, readings kwargs, policy kwargs, state kwargs, train, reasons)
DECIDE_TABLE: list[tuple[str, dict, dict, dict, bool, list[str]]] = [
    ("all good", {}, {}, {}, True, []),
    ("not charging", {"power": UNPLUGGED}, {}, {}, False, ["not charging"]),
    ("unplugged but charging not required", {"power": UNPLUGGED}, {"require_charging": False}, {}, True, []),
    ("plugged, NOT_CHARGING status still counts",
     {"power_status": "NOT_CHARGING"}, {}, {}, True, []),
    ("battery low", {"power_percent": 32.0}, {}, {}, False, ["battery 32% < 50%"]),
    ("battery exactly at min", {"power_percent": 50.0}, {}, {}, True, []),
    ("battery min 0 ignores unknown percent", {"power_percent": None}, {"min_battery_percent": 0}, {}, True, []),
    ("battery percent unknown", {"power_percent": None}, {}, {}, False, ["battery level unknown"]),
    ("battery too hot", {"power_temperature_c": 43.0}, {}, {}, False, ["battery 43.0 °C > 40 °C"]),
    ("battery at max temperature", {"power_temperature_c": 40.0}, {}, {}, True, []),
    ("temperature unknown does not block", {"power_temperature_c": None}, {}, {}, True, []),
    ("hot, custom limit", {"power_temperature_c": 38.5}, {"max_battery_temp_c": 37.5}, {}, False,
     ["battery 38.5 °C > 37.5 °C"]),
    ("load high", {"load1": 2.1}, {}, {}, False, ["load 2.10 > 1.50"]),
    ("load equal to max", {"load1": 1.5}, {}, {}, True, []),
    ("load unknown", {"load1": None}, {}, {}, False, ["load unknown"]),
    ("load unknown, unknown_means_yes", {"load1": None}, {"unknown_means_yes": True}, {}, True,
     ["load unknown, ignored (unknown_means_yes)"]),
    ("inside quiet hours", {}, {"quiet_hours": "23:00-07:00", "timezone": "Europe/Berlin"}, {}, True, []),
    ("outside quiet hours", {"now": datetime(2024, 3, 5, 12, 0, tzinfo=TZ)},
     {"quiet_hours": "23:00-07:00", "timezone": "Europe/Berlin"}, {}, False, ["outside quiet hours 23:00-07:00"]),
    ("quiet hours via timezone conversion (UTC 22:30 is 23:30 Berlin)",
     {"now": datetime(2024, 1, 15, 22, 30, tzinfo=timezone.utc)},
     {"quiet_hours": "23:00-07:00", "timezone": "Europe/Berlin"}, {}, True, []),
    ("quiet hours, UTC 22:30 in UTC is outside",
     {"now": datetime(2024, 1, 15, 22, 30, tzinfo=timezone.utc)},
     {"quiet_hours": "23:00-07:00", "timezone": "UTC"}, {}, False, ["outside quiet hours 23:00-07:00"]),
    ("bad timezone blocks, does not raise", {}, {"quiet_hours": "23:00-07:00", "timezone": "Mars/Base"}, {},
     False, ["quiet hours unusable: unknown timezone 'Mars/Base' (expected an IANA name such as \"Europe/Berlin\")"]),
    ("user active signal", {"user_away": False}, {}, {}, False, ["user active (signal)"]),
    ("user away signal", {"user_away": True}, {}, {}, True, []),
    ("no signal is not unknown", {"user_away": None}, {}, {}, True, []),
    ("low memory", {"available_mb": 210.0}, {}, {}, False, ["only 210 MiB available < 512"]),
    ("memory unknown", {"available_mb": None}, {}, {}, False, ["available memory unknown"]),
    ("no new examples", {}, {}, {"untrained_examples": 0}, False, ["no new examples (0 < 1)"]),
    ("too few examples", {}, {"min_new_examples": 10}, {"untrained_examples": 3}, False,
     ["too few new examples (3 < 10)"]),
    ("min_new_examples 0 trains on nothing new", {}, {"min_new_examples": 0}, {"untrained_examples": 0}, True, []),
    ("cooldown", {}, {}, {"last_session_end": NOW - timedelta(minutes=6)}, False, ["cooldown: 4 min left"]),
    ("cooldown partial minute rounds up", {}, {}, {"last_session_end": NOW - timedelta(minutes=9, seconds=30)},
     False, ["cooldown: 1 min left"]),
    ("cooldown over", {}, {}, {"last_session_end": NOW - timedelta(minutes=10)}, True, []),
    ("cooldown 0", {}, {"cooldown_minutes": 0}, {"last_session_end": NOW}, True, []),
    ("cooldown with naive last_session_end", {}, {"cooldown_minutes": 0}, {"last_session_end": datetime(2020, 1, 1)},
     True, []),
    ("power unknown", {"power": UNKNOWN_POWER}, {}, {}, False,
     ["power unknown (termux-battery-status timed out)"]),
    ("power unknown, unknown_means_yes", {"power": UNKNOWN_POWER}, {"unknown_means_yes": True}, {}, True,
     ["power unknown (termux-battery-status timed out), ignored (unknown_means_yes)"]),
    ("power unknown, charging not required, percent unknown", {"power": UNKNOWN_POWER},
     {"require_charging": False}, {}, False, ["battery level unknown (termux-battery-status timed out)"]),
    ("desktop without battery", {"power": DESKTOP}, {}, {}, True, []),
    ("desktop raw reading, rule on", {"power": DESKTOP_RAW}, {}, {}, True, []),
    ("desktop raw reading, rule off", {"power": DESKTOP_RAW}, {"no_battery_means_mains": False}, {}, False,
     ["power unknown (no battery found (no_battery_means_mains is off))"]),
    ("everything wrong at once",
     {"power": replace(UNPLUGGED, percent=32.0, temperature_c=43.0), "load1": 2.1, "available_mb": 210.0,
      "user_away": False, "now": datetime(2024, 3, 5, 12, 0, tzinfo=TZ)},
     {"quiet_hours": "23:00-07:00", "timezone": "Europe/Berlin"},
     {"untrained_examples": 0, "last_session_end": datetime(2024, 3, 5, 11, 56, tzinfo=TZ)},
     False,
     ["not charging", "battery 32% < 50%", "battery 43.0 °C > 40 °C", "load 2.10 > 1.50",
      "outside quiet hours 23:00-07:00", "user active (signal)", "only 210 MiB available < 512",
      "no new examples (0 < 1)", "cooldown: 6 min left"]),
    ("trainer RSS does not matter before a session", {"trainer_rss_mb": 99999.0}, {}, {}, True, []),
]


@pytest.mark.parametrize("rkw,pkw,skw,train,reasons", [row[1:] for row in DECIDE_TABLE],
                         ids=[row[0] for row in DECIDE_TABLE])
def test_decide(rkw: dict, pkw: dict, skw: dict, train: bool, reasons: list[str]) -> None:
    d = decide(readings(**rkw), policy(**pkw), state(**skw))
    assert isinstance(d, Decision)
    assert (d.train, d.reasons) == (train, reasons)
    if not train:
        assert d.summary() == "waiting: " + "; ".join(reasons)


SESSION = NOW - timedelta(minutes=5)

# should_stop: (id, readings kwargs, policy kwargs, state kwargs, manual, keep going, reasons)
STOP_TABLE: list[tuple[str, dict, dict, dict, bool, bool, list[str]]] = [
    ("all good", {}, {}, {}, False, True, []),
    ("charger unplugged", {"power": UNPLUGGED}, {}, {}, False, False, ["charger unplugged"]),
    ("power unknown stops", {"power": UNKNOWN_POWER}, {}, {}, False, False,
     ["power unknown (termux-battery-status timed out)"]),
    ("power unknown, unknown_means_yes", {"power": UNKNOWN_POWER}, {"unknown_means_yes": True}, {}, False, True,
     ["power unknown (termux-battery-status timed out), ignored (unknown_means_yes)"]),
    ("user back", {"user_away": False}, {}, {}, False, False, ["user back (signal)"]),
    ("RSS over budget", {"trainer_rss_mb": 1600.0}, {}, {}, False, False, ["trainer RSS 1600 MiB > budget 1536 MiB"]),
    ("RSS at budget", {"trainer_rss_mb": 1536.0}, {}, {}, False, True, []),
    ("RSS unknown does not stop", {"trainer_rss_mb": None}, {}, {}, False, True, []),
    ("max session passed", {}, {"max_session_minutes": 5}, {}, False, False,
     ["session reached max_session_minutes (5 min)"]),
    ("max session not yet", {}, {"max_session_minutes": 5.5}, {}, False, True, []),
    ("outside quiet hours", {"now": datetime(2024, 3, 5, 7, 1, tzinfo=TZ)},
     {"quiet_hours": "23:00-07:00", "timezone": "Europe/Berlin"},
     {"training_since": datetime(2024, 3, 5, 6, 50, tzinfo=TZ)}, False, False, ["outside quiet hours 23:00-07:00"]),
    ("load does not stop (the trainer is the load)", {"load1": 4.0}, {}, {}, False, True, []),
    ("load unknown does not stop", {"load1": None}, {}, {}, False, True, []),
    ("no new data does not stop", {}, {}, {"untrained_examples": 0}, False, True, []),
    ("cooldown does not stop", {}, {}, {"last_session_end": NOW - timedelta(minutes=1)}, False, True, []),
    ("low available memory does not stop", {"available_mb": 100.0}, {}, {}, False, True, []),
    ("battery dropped below min", {"power": replace(UNPLUGGED, percent=40.0)}, {"require_charging": False}, {},
     False, False, ["battery 40% < 50%"]),
    ("battery got hot", {"power_temperature_c": 41.2}, {}, {}, False, False, ["battery 41.2 °C > 40 °C"]),
    ("no training_since: no length check", {}, {"max_session_minutes": 1}, {"training_since": None}, False, True, []),
    ("manual: unplugged is fine", {"power": UNPLUGGED, "user_away": False, "load1": 9.0}, {}, {}, True, True, []),
    ("manual: still over budget", {"power": UNPLUGGED, "trainer_rss_mb": 2000.0}, {}, {}, True, False,
     ["trainer RSS 2000 MiB > budget 1536 MiB"]),
    ("manual: still time-limited", {}, {"max_session_minutes": 2}, {}, True, False,
     ["session reached max_session_minutes (2 min)"]),
    ("manual: outside quiet hours is fine", {"now": datetime(2024, 3, 5, 12, 0, tzinfo=TZ)},
     {"quiet_hours": "23:00-07:00"}, {"training_since": datetime(2024, 3, 5, 11, 59, tzinfo=TZ)}, True, True, []),
    ("several at once", {"power": UNPLUGGED, "user_away": False, "trainer_rss_mb": 1600.0},
     {"max_session_minutes": 5}, {}, False, False,
     ["charger unplugged", "user back (signal)", "trainer RSS 1600 MiB > budget 1536 MiB",
      "session reached max_session_minutes (5 min)"]),
]


@pytest.mark.parametrize("rkw,pkw,skw,manual,keep,reasons", [row[1:] for row in STOP_TABLE],
                         ids=[row[0] for row in STOP_TABLE])
def test_should_stop(rkw: dict, pkw: dict, skw: dict, manual: bool, keep: bool, reasons: list[str]) -> None:
    s = state(training_since=SESSION, **skw) if "training_since" not in skw else state(**skw)
    d = should_stop(readings(**rkw), policy(**pkw), s, manual=manual)
    assert (d.train, d.reasons) == (keep, reasons)


# decide_train_now: (id, readings kwargs, policy kwargs, state kwargs, train, reasons)
TRAIN_NOW_TABLE: list[tuple[str, dict, dict, dict, bool, list[str]]] = [
    ("all good", {}, {}, {}, True, []),
    ("ignores charging, idle, signal, data, cooldown",
     {"power": replace(UNPLUGGED, percent=10.0), "load1": 5.0, "user_away": False},
     {"quiet_hours": "08:00-09:00"}, {"untrained_examples": 0, "last_session_end": NOW}, True, []),
    ("ignores unknown power and load", {"power": UNKNOWN_POWER, "load1": None}, {}, {}, True, []),
    ("low memory refused", {"available_mb": 300.0}, {}, {}, False, ["only 300 MiB available < 512"]),
    ("memory unknown refused", {"available_mb": None}, {}, {}, False, ["available memory unknown"]),
    ("memory unknown, unknown_means_yes", {"available_mb": None}, {"unknown_means_yes": True}, {}, True,
     ["available memory unknown, ignored (unknown_means_yes)"]),
    ("hot battery refused", {"power_temperature_c": 45.0}, {}, {}, False, ["battery 45.0 °C > 40 °C"]),
]


@pytest.mark.parametrize("rkw,pkw,skw,train,reasons", [row[1:] for row in TRAIN_NOW_TABLE],
                         ids=[row[0] for row in TRAIN_NOW_TABLE])
def test_decide_train_now(rkw: dict, pkw: dict, skw: dict, train: bool, reasons: list[str]) -> None:
    d = decide_train_now(readings(**rkw), policy(**pkw), state(**skw))
    assert (d.train, d.reasons) == (train, reasons)


def test_effective_on_power() -> None:
    assert effective_on_power(readings(power=DESKTOP_RAW), policy()) is True
    assert effective_on_power(readings(power=DESKTOP_RAW), policy(no_battery_means_mains=False)) is None
    assert effective_on_power(readings(power=UNPLUGGED), policy()) is False


_opt_float = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))
_power = st.builds(PowerReading, on_power=st.one_of(st.none(), st.booleans()), percent=_opt_float,
                   temperature_c=_opt_float, status=st.one_of(st.none(), st.text(max_size=5)),
                   has_battery=st.one_of(st.none(), st.booleans()), source=st.just("x"),
                   error=st.one_of(st.none(), st.text(max_size=10)))
_dt = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30),
                   timezones=st.one_of(st.none(), st.just(TZ), st.just(timezone.utc)))


@settings(max_examples=150, deadline=None)
@given(power=_power, load1=_opt_float, avail=_opt_float, away=st.one_of(st.none(), st.booleans()),
       rss=_opt_float, now=_dt, last=st.one_of(st.none(), _dt), since=st.one_of(st.none(), _dt),
       n=st.integers(0, 5), unknown_yes=st.booleans(), quiet=st.sampled_from([None, "23:00-07:00", "09:00-17:00"]))
def test_policy_never_raises(power: PowerReading, load1: float | None, avail: float | None, away: bool | None,
                             rss: float | None, now: datetime, last: datetime | None, since: datetime | None,
                             n: int, unknown_yes: bool, quiet: str | None) -> None:
    r = Readings(now=now, power=power, load1=load1, available_mb=avail, user_away=away, trainer_rss_mb=rss)
    p = PolicyConfig(unknown_means_yes=unknown_yes, quiet_hours=quiet, timezone="Europe/Berlin")
    s = StoreState(untrained_examples=n, last_session_end=last, training_since=since)
    for fn in (decide, should_stop, decide_train_now):
        d = fn(r, p, s)
        assert isinstance(d, Decision)
        assert d.train == (not d.reasons or all("ignored" in x for x in d.reasons))
