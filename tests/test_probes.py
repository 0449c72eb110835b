"""Probes: one contract suite run against every PowerProbe implementation, then per-implementation cases."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import psutil
import pytest

from pocketd.daemon import probes, probes_power
from pocketd.daemon.probes import (
    AwaySignal,
    FakePowerProbe,
    PowerProbe,
    PsutilPowerProbe,
    SysfsPowerProbe,
    TermuxBatteryProbe,
    available_mb,
    detect_power_probe_kind,
    in_quiet_hours,
    make_power_probe,
    parse_window,
    process_tree_rss_mb,
    read_load1,
    resolve_timezone,
    take_readings,
)
from pocketd.daemon.readings import PowerReading
from pocketd.daemon.settings import DaemonConfig, PowerProbeKind

TIMEOUT_S = 1.0  # the termux probe's timeout in these tests

# -- fakes -----------------------------------------------------------------------------------

TERMUX_SHAPES: dict[str, dict] = {
    "ac_charging": {"health": "GOOD", "percentage": 81, "plugged": "PLUGGED_AC", "status": "CHARGING",
                    "temperature": 29.600000381469727, "current": 1200000},
    "usb_full": {"health": "GOOD", "percentage": 100, "plugged": "PLUGGED_USB", "status": "FULL",
                 "temperature": 31.0},
    "wireless_not_charging": {"percentage": 95, "plugged": "PLUGGED_WIRELESS", "status": "NOT_CHARGING",
                              "temperature": 35.5},
    "unplugged": {"health": "GOOD", "percentage": 42, "plugged": "UNPLUGGED", "status": "DISCHARGING",
                  "temperature": 27.0},
    "no_plugged_charging": {"percentage": 60, "status": "CHARGING"},
    "no_plugged_discharging": {"percentage": 60, "status": "DISCHARGING"},
    "only_percentage": {"percentage": 60},
    "empty": {},
}
TERMUX_EXPECTED_ON_POWER = {
    "ac_charging": True, "usb_full": True, "wireless_not_charging": True, "unplugged": False,
    "no_plugged_charging": True, "no_plugged_discharging": False, "only_percentage": None, "empty": None,
}


def fake_termux(bindir: Path, body: str) -> Path:
    """A `termux-battery-status` shell script in bindir."""
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "termux-battery-status"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return script


def termux_printing(bindir: Path, payload: str) -> Path:
    data = bindir.parent / "termux-output.txt"
    data.write_text(payload)
    return fake_termux(bindir, f'cat "{data}"')


def on_path(monkeypatch: pytest.MonkeyPatch, bindir: Path) -> None:
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def make_supply(root: Path, name: str, **attrs: str | int) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for key, value in attrs.items():
        (d / key).write_text(f"{value}\n")
    return d


Battery = namedtuple("Battery", "percent secsleft power_plugged")


# -- the contract ----------------------------------------------------------------------------

# Each case: (probe factory given tmp_path and monkeypatch, expect_known)
Case = Callable[[Path, pytest.MonkeyPatch], PowerProbe]


def _termux_ok(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    termux_printing(tmp / "bin", json.dumps(TERMUX_SHAPES["ac_charging"]))
    on_path(mp, tmp / "bin")
    return TermuxBatteryProbe(timeout_s=TIMEOUT_S)


def _termux_hang(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    fake_termux(tmp / "bin", "sleep 100")
    on_path(mp, tmp / "bin")
    return TermuxBatteryProbe(timeout_s=TIMEOUT_S)


def _termux_garbage(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    fake_termux(tmp / "bin", "echo 'Termux:API is not installed <html>'")
    on_path(mp, tmp / "bin")
    return TermuxBatteryProbe(timeout_s=TIMEOUT_S)


def _termux_exit1(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    fake_termux(tmp / "bin", "echo 'no permission' >&2; exit 1")
    on_path(mp, tmp / "bin")
    return TermuxBatteryProbe(timeout_s=TIMEOUT_S)


def _termux_missing(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    mp.setenv("PATH", str(tmp / "empty-bin"))
    return TermuxBatteryProbe(timeout_s=TIMEOUT_S)


def _sysfs_charging(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    root = tmp / "power_supply"
    make_supply(root, "AC", type="Mains", online=1)
    make_supply(root, "BAT0", type="Battery", status="Charging", capacity=77, temp=301, present=1)
    return SysfsPowerProbe(root)


def _sysfs_unreadable(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    root = tmp / "power_supply"
    make_supply(root, "battery", type="Battery", status="Charging", capacity=50)
    make_supply(root, "usb", type="USB", online=1)
    _deny_open_under(mp, root)
    return SysfsPowerProbe(root)


def _sysfs_missing(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    return SysfsPowerProbe(tmp / "no-such-dir")


def _psutil_ok(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    mp.setattr(psutil, "sensors_battery", lambda: Battery(64.0, 3600, True))
    return PsutilPowerProbe()


def _psutil_raises(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    def boom() -> None:
        raise RuntimeError("ACPI exploded")

    mp.setattr(psutil, "sensors_battery", boom)
    return PsutilPowerProbe()


def _fake_ok(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    (tmp / "power.json").write_text('{"on_power": true, "percent": 80}')
    return FakePowerProbe(tmp / "power.json")


def _fake_missing(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    return FakePowerProbe(tmp / "nope.json")


def _fake_garbage(tmp: Path, mp: pytest.MonkeyPatch) -> PowerProbe:
    (tmp / "power.json").write_bytes(b"\xff\xfe not json")
    return FakePowerProbe(tmp / "power.json")


CONTRACT_CASES: dict[str, tuple[Case, bool]] = {
    "termux-ok": (_termux_ok, True),
    "termux-hang": (_termux_hang, False),
    "termux-garbage": (_termux_garbage, False),
    "termux-exit1": (_termux_exit1, False),
    "termux-missing": (_termux_missing, False),
    "sysfs-charging": (_sysfs_charging, True),
    "sysfs-unreadable": (_sysfs_unreadable, False),
    "sysfs-missing": (_sysfs_missing, False),
    "psutil-ok": (_psutil_ok, True),
    "psutil-raises": (_psutil_raises, False),
    "fake-ok": (_fake_ok, True),
    "fake-missing": (_fake_missing, False),
    "fake-garbage": (_fake_garbage, False),
}
IMPLEMENTATIONS = {TermuxBatteryProbe, SysfsPowerProbe, PsutilPowerProbe, FakePowerProbe}


@pytest.fixture(params=sorted(CONTRACT_CASES))
def contract_case(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[PowerProbe, bool]:
    factory, known = CONTRACT_CASES[request.param]
    return factory(tmp_path, monkeypatch), known


def test_every_implementation_is_in_the_contract_suite() -> None:
    names = {k.split("-")[0] for k in CONTRACT_CASES}
    assert names == {cls.source for cls in IMPLEMENTATIONS}


def test_contract(contract_case: tuple[PowerProbe, bool]) -> None:
    probe, expect_known = contract_case
    assert isinstance(probe, PowerProbe)
    t0 = time.monotonic()
    reading = probe.read()  # must not raise
    elapsed = time.monotonic() - t0
    assert isinstance(reading, PowerReading)
    assert reading.source == probe.source
    assert elapsed < TIMEOUT_S + 3
    if reading.on_power is None:
        assert reading.error, "an unknown reading says why"
    if reading.percent is not None:
        assert 0 <= reading.percent <= 100
    assert (reading.on_power is not None) == expect_known
    if expect_known:
        assert reading.error is None
    # repeatable
    again = probe.read()
    assert isinstance(again, PowerReading)


# -- termux ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(TERMUX_SHAPES))
def test_termux_shapes(shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    termux_printing(tmp_path / "bin", json.dumps(TERMUX_SHAPES[shape]))
    on_path(monkeypatch, tmp_path / "bin")
    r = TermuxBatteryProbe(timeout_s=5).read()
    assert r.on_power is TERMUX_EXPECTED_ON_POWER[shape]
    data = TERMUX_SHAPES[shape]
    assert r.percent == (float(data["percentage"]) if "percentage" in data else None)
    assert r.temperature_c == data.get("temperature")
    assert r.status == data.get("status")
    assert r.has_battery is True
    assert (r.error is None) == (r.on_power is not None)


def test_termux_plugged_wins_over_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    termux_printing(tmp_path / "bin", '{"plugged": "PLUGGED_USB", "status": "DISCHARGING", "percentage": 10}')
    on_path(monkeypatch, tmp_path / "bin")
    assert TermuxBatteryProbe().read().on_power is True


def test_termux_hang_is_killed_within_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "sleep.pid"
    fake_termux(tmp_path / "bin", f'sleep 100 & echo $! > "{pidfile}"; wait')
    on_path(monkeypatch, tmp_path / "bin")
    t0 = time.monotonic()
    r = TermuxBatteryProbe(timeout_s=TIMEOUT_S).read()
    elapsed = time.monotonic() - t0
    assert r.on_power is None and "timed out after 1 s" in (r.error or "")
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.5
    # the whole process group died: the grandchild `sleep` too
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {pid} still running")


def test_termux_garbage_exit_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_termux(tmp_path / "bin", "echo '{not json'")
    on_path(monkeypatch, tmp_path / "bin")
    r = TermuxBatteryProbe().read()
    assert r.on_power is None and "invalid JSON" in (r.error or "")

    fake_termux(tmp_path / "bin", "echo 'Termux:API app missing' >&2; exit 1")
    r = TermuxBatteryProbe().read()
    assert r.on_power is None and "status 1" in (r.error or "") and "app missing" in (r.error or "")

    fake_termux(tmp_path / "bin", "echo '[1, 2]'")
    r = TermuxBatteryProbe().read()
    assert r.on_power is None and "list" in (r.error or "")

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = TermuxBatteryProbe().read()
    assert r.on_power is None and "not found" in (r.error or "")


class _Clock:
    """A settable monotonic clock for rate-limited logging."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _probe_records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == probes_power.log.name]


def test_termux_hang_logs_once_not_on_every_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13: a hanging termux-battery-status wrote a warning on every read (~70 lines a minute)."""
    fake_termux(tmp_path / "bin", "sleep 100")
    on_path(monkeypatch, tmp_path / "bin")
    probe = TermuxBatteryProbe(timeout_s=0.2)
    caplog.set_level(logging.DEBUG, logger=probes_power.log.name)
    for _ in range(4):
        assert "timed out after 0.2 s" in (probe.read().error or "")
    records = _probe_records(caplog)
    assert [level for level, _ in records] == ["WARNING"], records
    assert "termux-battery-status failed: timed out after 0.2 s (is the Termux:API app installed?)" in records[0][1]
    assert "at most once every 10 min" in records[0][1]


def test_termux_failures_rate_limited_then_recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    fake_termux(tmp_path / "bin", "sleep 100")
    on_path(monkeypatch, tmp_path / "bin")
    clock = _Clock()
    probe = TermuxBatteryProbe(timeout_s=0.2, clock=clock)
    caplog.set_level(logging.DEBUG, logger=probes_power.log.name)

    def reads(*at: float) -> None:
        for t in at:
            clock.now = 1000.0 + t
            probe.read()

    reads(0, 30, 60, 300, 599)  # the first is logged, the next four only counted
    assert [level for level, _ in _probe_records(caplog)] == ["WARNING"]
    reads(600)  # 10 min after the last line: one more, with the count of those not logged
    records = _probe_records(caplog)
    assert [level for level, _ in records] == ["WARNING", "WARNING"]
    assert "still failing: timed out after 0.2 s" in records[1][1]
    assert "4 failures not logged in the last 10 min; 6 since 10 min ago" in records[1][1]
    # The command fails another way (exits 1): still the same run of failures, not logged yet.
    fake_termux(tmp_path / "bin", "echo 'no permission' >&2; exit 1")
    reads(700, 800)
    assert len(_probe_records(caplog)) == 2
    # It works again: one INFO line, then nothing while it keeps working.
    termux_printing(tmp_path / "bin", json.dumps(TERMUX_SHAPES["ac_charging"]))
    reads(900, 930, 960)
    records = _probe_records(caplog)
    assert [level for level, _ in records] == ["WARNING", "WARNING", "INFO"]
    assert records[2][1] == "termux-battery-status works again, after 8 failures over 15 min"
    # A new failure after recovering is logged at once.
    fake_termux(tmp_path / "bin", "echo 'no permission' >&2; exit 1")
    reads(1000)
    records = _probe_records(caplog)
    assert [level for level, _ in records] == ["WARNING", "WARNING", "INFO", "WARNING"]
    assert "failed: exited with status 1: no permission" in records[3][1]


def test_a_probe_raising_on_every_read_logs_once(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("sensor gone")

    monkeypatch.setattr(psutil, "sensors_battery", boom, raising=False)
    probe = PsutilPowerProbe()
    caplog.set_level(logging.DEBUG, logger=probes_power.log.name)
    for _ in range(50):
        assert "sensor gone" in (probe.read().error or "")
    records = _probe_records(caplog)
    assert len(records) == 1 and records[0][0] == "WARNING"
    assert "psutil power probe failed: RuntimeError: sensor gone" in records[0][1]


def test_termux_bad_field_types_are_ignored() -> None:
    r = probes_power.parse_termux_battery(
        {"plugged": "PLUGGED_AC", "percentage": "eighty", "temperature": True, "status": 3})
    assert r.on_power is True and r.percent is None and r.temperature_c is None and r.status is None


# -- sysfs -----------------------------------------------------------------------------------


def _deny_open_under(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Simulate Android's denied /sys files (chmod 000 does not stop root)."""
    real_open = open

    def denying_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).startswith(str(root)):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(probes_power, "open", denying_open, raising=False)


def test_sysfs_mains_online_and_battery(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    make_supply(root, "AC", type="Mains", online=1)
    make_supply(root, "BAT0", type="Battery", status="Not charging", capacity=77, temp=301)
    r = SysfsPowerProbe(root).read()
    assert r == PowerReading(on_power=True, percent=77.0, temperature_c=30.1, status="NOT_CHARGING",
                             has_battery=True, source="sysfs")


def test_sysfs_offline_supplies(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    make_supply(root, "ac", type="Mains", online=0)
    make_supply(root, "usb", type="USB", online=0)
    make_supply(root, "battery", type="Battery", status="Discharging", capacity=30)
    r = SysfsPowerProbe(root).read()
    assert r.on_power is False and r.percent == 30 and r.temperature_c is None


def test_sysfs_usb_online_counts(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    make_supply(root, "ac", type="Mains", online=0)
    make_supply(root, "usb", type="USB", online=1)
    make_supply(root, "battery", type="Battery", status="Charging", capacity=30)
    assert SysfsPowerProbe(root).read().on_power is True


@pytest.mark.parametrize("status,expected", [("Charging", True), ("Full", True), ("Discharging", False),
                                              ("Not charging", None), ("Unknown", None)])
def test_sysfs_battery_status_only(tmp_path: Path, status: str, expected: bool | None) -> None:
    root = tmp_path / "ps"
    make_supply(root, "BAT1", type="Battery", status=status, capacity=55)
    r = SysfsPowerProbe(root).read()
    assert r.on_power is expected and r.has_battery is True
    if expected is None:
        assert r.error


def test_sysfs_types_guessed_from_names(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    make_supply(root, "ADP1", online=1)
    make_supply(root, "BAT0", status="Discharging", capacity=90)
    r = SysfsPowerProbe(root).read()
    assert r.on_power is True and r.percent == 90


def test_sysfs_no_battery_is_desktop(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    root.mkdir()
    r = SysfsPowerProbe(root).read()
    assert r.on_power is True and r.has_battery is False and r.error is None
    r = SysfsPowerProbe(root, no_battery_means_mains=False).read()
    assert r.on_power is None and r.has_battery is False and r.error
    # a battery slot with present=0 is no battery either
    make_supply(root, "BAT0", type="Battery", present=0, status="Unknown")
    assert SysfsPowerProbe(root).read().has_battery is False


def test_sysfs_unreadable_files_monkeypatched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ps"
    make_supply(root, "battery", type="Battery", status="Charging", capacity=50)
    _deny_open_under(monkeypatch, root)
    r = SysfsPowerProbe(root).read()
    assert r.on_power is None and "Permission denied" in (r.error or "")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_sysfs_unreadable_files_chmod(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    d = make_supply(root, "battery", type="Battery", status="Charging", capacity=50)
    for f in d.iterdir():
        f.chmod(0)
    try:
        r = SysfsPowerProbe(root).read()
        assert r.on_power is None and r.error
    finally:
        for f in d.iterdir():
            f.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_sysfs_unlistable_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ps"
    root.mkdir()
    real = os.listdir

    def listdir(p="."):  # type: ignore[no-untyped-def]
        if Path(p) == root:
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(probes_power.os, "listdir", listdir)
    r = SysfsPowerProbe(root).read()
    assert r.on_power is None and "Permission denied" in (r.error or "")
    assert detect_power_probe_kind({"PATH": str(tmp_path / "empty")}, sysfs_root=root) is PowerProbeKind.PSUTIL


# -- psutil ----------------------------------------------------------------------------------


def test_psutil_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(64.0, 3600, True))
    r = PsutilPowerProbe().read()
    assert (r.on_power, r.percent, r.has_battery, r.status) == (True, 64.0, True, "CHARGING")

    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(20.0, 100, False))
    r = PsutilPowerProbe().read()
    assert (r.on_power, r.percent, r.status) == (False, 20.0, "DISCHARGING")

    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(20.0, 100, None))
    r = PsutilPowerProbe().read()
    assert r.on_power is None and r.error and r.percent == 20.0

    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)
    r = PsutilPowerProbe().read()
    assert (r.on_power, r.has_battery) == (True, False)
    r = PsutilPowerProbe(no_battery_means_mains=False).read()
    assert (r.on_power, r.has_battery) == (None, False) and r.error

    monkeypatch.delattr(psutil, "sensors_battery")
    r = PsutilPowerProbe().read()
    assert r.on_power is None and "sensors_battery" in (r.error or "")


# -- fake ------------------------------------------------------------------------------------


def test_fake_probe_follows_the_file(tmp_path: Path) -> None:
    f = tmp_path / "power.json"
    probe = FakePowerProbe(f)
    assert probe.read().on_power is None
    f.write_text('{"on_power": true, "percent": 80}')
    assert (probe.read().on_power, probe.read().percent) == (True, 80.0)
    f.write_text('{"on_power": false, "percent": 80, "temperature_c": 45.5, "status": "DISCHARGING"}')
    r = probe.read()
    assert (r.on_power, r.temperature_c, r.status, r.has_battery) == (False, 45.5, "DISCHARGING", True)
    f.write_text('{"has_battery": false}')
    assert (probe.read().on_power, probe.read().has_battery) == (True, False)
    f.write_text('{"on_power": null, "error": "termux-battery-status timed out"}')
    assert probe.read().error == "termux-battery-status timed out"
    for bad in ('{"on_power": "yes"}', '{"plugged": true}', "[]", "{"):
        f.write_text(bad)
        r = probe.read()
        assert r.on_power is None and r.error, bad


# -- selection and config --------------------------------------------------------------------


def test_detect_and_make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = {"PATH": str(tmp_path / "empty")}
    ps = tmp_path / "ps"
    make_supply(ps, "AC", type="Mains", online=1)
    fake_termux(tmp_path / "bin", "echo '{}'")
    assert detect_power_probe_kind({"PATH": str(tmp_path / "bin")}, ps) is PowerProbeKind.TERMUX
    assert detect_power_probe_kind({**empty, "PREFIX": "/data/data/com.termux/files/usr"}, ps) \
        is PowerProbeKind.TERMUX
    assert detect_power_probe_kind(empty, ps) is PowerProbeKind.SYSFS
    assert detect_power_probe_kind(empty, tmp_path / "missing") is PowerProbeKind.PSUTIL

    assert isinstance(make_power_probe("auto", env=empty, sysfs_root=ps), SysfsPowerProbe)
    assert isinstance(make_power_probe(None, env=empty, sysfs_root=tmp_path / "missing"), PsutilPowerProbe)
    termux = make_power_probe(PowerProbeKind.TERMUX, timeout_s=3)
    assert isinstance(termux, TermuxBatteryProbe) and termux.timeout_s == 3
    assert isinstance(make_power_probe("fake", fake_file=tmp_path / "p.json"), FakePowerProbe)
    with pytest.raises(ValueError):
        make_power_probe("fake")
    with pytest.raises(ValueError):
        make_power_probe("battery-of-the-future")


def test_daemon_config_fields(tmp_path: Path) -> None:
    cfg = DaemonConfig(power_probe="fake", fake_power_file=tmp_path / "p.json")
    assert cfg.power_probe is PowerProbeKind.FAKE
    assert DaemonConfig().power_probe is PowerProbeKind.AUTO
    with pytest.raises(ValueError):
        DaemonConfig(power_probe="solar")


# -- idle ------------------------------------------------------------------------------------


def test_load1(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(read_load1(), float)

    def denied() -> tuple[float, float, float]:
        raise OSError("Load averages are unobtainable")

    monkeypatch.setattr(probes.os, "getloadavg", denied)
    assert read_load1() is None


BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize("hhmm,window,inside", [
    ("23:00", "23:00-07:00", True),
    ("23:59", "23:00-07:00", True),
    ("00:00", "23:00-07:00", True),
    ("06:59", "23:00-07:00", True),
    ("07:00", "23:00-07:00", False),
    ("12:00", "23:00-07:00", False),
    ("22:59", "23:00-07:00", False),
    ("01:00", "01:00-05:30", True),
    ("05:30", "01:00-05:30", False),
    ("00:30", "01:00-05:30", False),
    ("13:37", "00:00-00:00", True),
])
def test_quiet_hours_window(hhmm: str, window: str, inside: bool) -> None:
    hh, mm = map(int, hhmm.split(":"))
    now = datetime(2024, 3, 5, hh, mm, tzinfo=BERLIN)
    assert in_quiet_hours(now, window) is inside
    assert in_quiet_hours(now, window, BERLIN) is inside


def test_quiet_hours_converts_to_the_explicit_timezone() -> None:
    utc_2230 = datetime(2024, 1, 15, 22, 30, tzinfo=timezone.utc)  # 23:30 in Berlin (CET)
    assert in_quiet_hours(utc_2230, "23:00-07:00", BERLIN) is True
    assert in_quiet_hours(utc_2230, "23:00-07:00", ZoneInfo("UTC")) is False
    utc_0530_summer = datetime(2024, 7, 15, 5, 30, tzinfo=timezone.utc)  # 07:30 CEST
    assert in_quiet_hours(utc_0530_summer, "23:00-07:00", BERLIN) is False
    assert in_quiet_hours(utc_2230, None) is True
    with pytest.raises(ValueError):
        in_quiet_hours(utc_2230, "late-night")
    assert parse_window("23:00-07:15")[1].minute == 15
    for loose in (" 23:00 - 07:15 ", "7:00-23:00", "٠٧:00-23:00", "24:00-07:00"):  # strict since issue 15
        with pytest.raises(ValueError):
            parse_window(loose)
    assert resolve_timezone("Asia/Tokyo") == ZoneInfo("Asia/Tokyo")
    assert resolve_timezone(None) is not None
    with pytest.raises(ValueError):
        resolve_timezone("Mars/Olympus_Mons")


def test_away_signal_expiry_and_threads() -> None:
    sig = AwaySignal()
    now = datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    assert sig.current(now) is None
    sig.set(True, now + timedelta(minutes=10))
    assert sig.current(now) is True
    assert sig.current(now + timedelta(minutes=10)) is None
    sig.set(False, None)
    assert sig.current(now + timedelta(days=100)) is False
    assert sig.snapshot() == (False, None)
    sig.clear()
    assert sig.current(now) is None
    with pytest.raises(TypeError):
        sig.set("yes", None)  # type: ignore[arg-type]

    def flip(i: int) -> None:
        for _ in range(500):
            sig.set(i % 2 == 0, now + timedelta(seconds=i))
            assert sig.current(now) in (True, False, None)

    threads = [threading.Thread(target=flip, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- memory ----------------------------------------------------------------------------------


def test_available_mb(monkeypatch: pytest.MonkeyPatch) -> None:
    mb = available_mb()
    assert mb is not None and mb > 0

    def broken() -> None:
        raise PermissionError("/proc/meminfo")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    assert available_mb() is None


def test_process_tree_rss() -> None:
    own = process_tree_rss_mb(os.getpid())
    assert own is not None and own > 1
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            tree = process_tree_rss_mb(os.getpid())
            if tree is not None and tree > own + 1:
                break
            time.sleep(0.05)
        assert tree is not None and tree > own
    finally:
        child.kill()
        child.wait()
    assert process_tree_rss_mb(child.pid) is None  # gone
    assert process_tree_rss_mb(2**22 + 12345) is None


# -- take_readings ---------------------------------------------------------------------------


class _RaisingProbe:
    source = "broken"

    def read(self) -> PowerReading:
        raise RuntimeError("contract breaker")


def test_take_readings(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"on_power": true, "percent": 90}')
    sig = AwaySignal()
    now = datetime(2024, 1, 1, 3, 0, tzinfo=BERLIN)
    sig.set(True, now + timedelta(minutes=5))
    r = take_readings(FakePowerProbe(tmp_path / "p.json"), now=now, away=sig, trainer_pid=os.getpid(),
                      load_fn=lambda: 0.25, memory_fn=lambda: 2048.0)
    assert r.now == now and r.power.on_power is True and r.load1 == 0.25 and r.available_mb == 2048.0
    assert r.user_away is True and r.trainer_rss_mb is not None and r.trainer_rss_mb > 0

    def boom() -> float:
        raise OSError("nope")

    r = take_readings(_RaisingProbe(), tz=BERLIN, load_fn=boom, memory_fn=boom)  # type: ignore[arg-type]
    assert r.power.on_power is None and r.power.source == "broken" and "contract breaker" in (r.power.error or "")
    assert r.load1 is None and r.available_mb is None and r.user_away is None and r.trainer_rss_mb is None
    assert r.now.tzinfo is not None
