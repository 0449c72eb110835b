"""Issue 15: quiet hours in an IANA zone (policy.timezone, else TZ, else the system's), across a DST change."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from pocketd.daemon.cli import cli
from pocketd.daemon.localzone import local_zone, valid_zone_name
from pocketd.daemon.policy import decide
from pocketd.daemon.probes import FakePowerProbe, resolve_timezone, take_readings
from pocketd.daemon.readings import StoreState
from pocketd.daemon.settings import PolicyConfig

BERLIN = ZoneInfo("Europe/Berlin")
# Europe/Berlin goes from CET (+01:00) to CEST (+02:00) at 2026-03-29 01:00 UTC.
BEFORE_DST = datetime(2026, 3, 28, 5, 30, tzinfo=timezone.utc)  # 06:30 CET: inside 23:00-07:00
AFTER_DST = datetime(2026, 3, 29, 5, 30, tzinfo=timezone.utc)  # 07:30 CEST: outside


@pytest.fixture
def berlin_tz(monkeypatch: pytest.MonkeyPatch):
    """TZ=Europe/Berlin as the Termux run script exports it (and the C library told so)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_zone_from_tz_follows_dst(berlin_tz: None) -> None:
    """Before: datetime.now().astimezone().tzinfo, a fixed offset taken at start-up."""
    tz = resolve_timezone(None)
    assert datetime(2026, 1, 15, 12, tzinfo=timezone.utc).astimezone(tz).utcoffset() == timedelta(hours=1)
    assert datetime(2026, 7, 15, 12, tzinfo=timezone.utc).astimezone(tz).utcoffset() == timedelta(hours=2)


def test_quiet_hours_across_a_dst_change_with_an_injected_clock(berlin_tz: None, tmp_path: Path) -> None:
    power = tmp_path / "power.json"
    power.write_text('{"on_power": true, "percent": 90}')
    probe = FakePowerProbe(power)
    policy = PolicyConfig(quiet_hours="23:00-07:00", max_load=1000, min_available_mb=0, min_battery_percent=0)
    state = StoreState(untrained_examples=5, last_session_end=None, training_since=None)
    tz = resolve_timezone(policy.timezone)  # what the daemon resolves once at start-up (in winter, here)
    decisions = {}
    for name, now in (("before", BEFORE_DST), ("after", AFTER_DST)):
        readings = take_readings(probe, tz=tz, now=now, load_fn=lambda: 0.1, memory_fn=lambda: 4096.0)
        decisions[name] = decide(readings, policy, state)
    assert decisions["before"].train, decisions["before"].reasons
    assert decisions["after"].reasons == ["outside quiet hours 23:00-07:00"]


def test_order_configured_then_tz_then_system(tmp_path: Path) -> None:
    zoneinfo = tmp_path / "usr/share/zoneinfo/America"
    zoneinfo.mkdir(parents=True)
    (zoneinfo / "New_York").write_bytes(b"TZif")
    localtime = tmp_path / "localtime"
    localtime.symlink_to(zoneinfo / "New_York")
    assert local_zone("Asia/Tokyo", {"TZ": "Europe/Berlin"}, localtime).zone == ZoneInfo("Asia/Tokyo")
    choice = local_zone(None, {"TZ": ":Europe/Berlin"}, localtime)
    assert (choice.zone, choice.source) == (BERLIN, "TZ")
    choice = local_zone(None, {"TZ": "CET-1CEST,M3.5.0,M10.5.0/3"}, localtime)  # a POSIX rule: skipped, logged
    assert choice.zone == ZoneInfo("America/New_York") and choice.source == str(localtime)
    choice = local_zone(None, {"PATH": str(tmp_path)}, tmp_path / "missing")
    assert (choice.zone, choice.source) == (ZoneInfo("UTC"), "UTC (no zone set)")
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Base'"):
        local_zone("Mars/Base", {})


def test_android_zone_from_getprop(tmp_path: Path) -> None:
    getprop = tmp_path / "getprop"
    getprop.write_text('#!/bin/sh\n[ "$1" = persist.sys.timezone ] && echo Europe/Berlin\n')
    getprop.chmod(0o700)
    choice = local_zone(None, {"PATH": str(tmp_path)}, tmp_path / "no-localtime")
    assert (choice.zone, choice.source) == (BERLIN, "Android (persist.sys.timezone)")


def test_the_daemon_uses_a_zone_not_an_offset(berlin_tz: None, tmp_path: Path) -> None:
    from pocketd.daemon.service import Daemon

    from .daemon_helpers import make_config

    d = Daemon(make_config(tmp_path))
    assert d.tz == BERLIN


@pytest.mark.parametrize("window", ["7:00-23:00", "23:00 - 07:00", "٠٧:00-23:00", "24:00-07:00", "23:60-07:00",
                                    "23:00-07:00-08:00", "23:00–07:00", "2300-0700", ""])
def test_quiet_hours_syntax_is_strict(window: str) -> None:
    with pytest.raises(ValidationError, match="HH:MM-HH:MM in ASCII digits"):
        PolicyConfig(quiet_hours=window)


@pytest.mark.parametrize("zone", ["Mars/Base", "../../etc/passwd", "/usr/share/zoneinfo/UTC", "Europe/Berlin\n",
                                  "x" * 100])
def test_unknown_zones_are_refused(zone: str) -> None:
    assert not valid_zone_name(zone)
    with pytest.raises(ValidationError, match="IANA time zone name"):
        PolicyConfig(timezone=zone)


def test_config_check_reports_zone_and_window(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[policy]\nquiet_hours = "23:00-07:00"\ntimezone = "Europe/Berlin"\n')
    os.chmod(good, 0o600)
    bad = tmp_path / "bad.toml"
    bad.write_text('[policy]\nquiet_hours = "23:00 - 7:00"\ntimezone = "Europe/Berlinn"\n')
    os.chmod(bad, 0o600)
    runner = CliRunner()
    assert runner.invoke(cli, ["config", "check", str(good)]).exit_code == 0
    result = runner.invoke(cli, ["config", "check", str(bad)])
    assert result.exit_code == 1
    assert "policy.quiet_hours" in result.output and "HH:MM-HH:MM" in result.output
    assert "policy.timezone" in result.output and "IANA time zone name" in result.output
