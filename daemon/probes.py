"""Device probes: power (see `probes_power`), idleness, memory, and one snapshot of them all.

Every probe here reports None for "unknown" and never raises, so nothing read from
the device can crash the daemon. `take_readings` gathers one `Readings` for the policy.

Idle:
    read_load1() -> float | None                       os.getloadavg (works on Android)
    parse_window("23:00-07:00") -> (time, time)        ValueError on a bad window
    in_quiet_hours(now, "23:00-07:00") -> bool         pure; windows may cross midnight
    resolve_timezone(name | None) -> tzinfo            ZoneInfo or the system's local zone
    AwaySignal                                         the socket's `signal` (user away, with expiry)
Memory:
    available_mb() -> float | None                     psutil.virtual_memory().available
    process_tree_rss_mb(pid) -> float | None           RSS of pid plus its descendants
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, time, tzinfo

from .localzone import local_zone
from .probes_power import (
    SYSFS_ROOT,
    TERMUX_COMMAND,
    FakePowerProbe,
    PowerProbe,
    PsutilPowerProbe,
    SysfsPowerProbe,
    TermuxBatteryProbe,
    detect_power_probe_kind,
    make_power_probe,
    parse_termux_battery,
    unknown_power,
)
from .readings import PowerReading, Readings
from .settings import QUIET_HOURS

log = logging.getLogger(__name__)

MIB = 1024 * 1024

__all__ = [
    "PowerProbe", "TermuxBatteryProbe", "SysfsPowerProbe", "PsutilPowerProbe", "FakePowerProbe",
    "make_power_probe", "detect_power_probe_kind", "parse_termux_battery", "unknown_power",
    "TERMUX_COMMAND", "SYSFS_ROOT",
    "read_load1", "parse_window", "in_quiet_hours", "resolve_timezone", "AwaySignal",
    "available_mb", "process_tree_rss_mb", "take_readings",
]


# -- idle ------------------------------------------------------------------------------------


def read_load1() -> float | None:
    """The 1-minute load average, or None when the platform cannot tell (OSError)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def parse_window(window: str) -> tuple[time, time]:
    """"HH:MM-HH:MM" (ASCII digits, as `policy.quiet_hours` accepts) as (start, end) times; ValueError if not."""
    if not isinstance(window, str) or not QUIET_HOURS.fullmatch(window):
        raise ValueError(f'{window!r} is not a window like "23:00-07:00"')
    start_s, end_s = window.split("-")
    return time(int(start_s[:2]), int(start_s[3:])), time(int(end_s[:2]), int(end_s[3:]))


def in_quiet_hours(now: datetime, window: str | None, tz: tzinfo | None = None) -> bool:
    """Whether `now` falls inside the local-time `window` ("23:00-07:00").

    Pure. `window` None means "any time" (True). The start is inclusive and the end
    exclusive; a window whose end is before its start crosses midnight; equal start and
    end mean the whole day. `tz` given: `now` (timezone-aware) is converted to it first;
    otherwise `now`'s own wall-clock time is used. ValueError for a malformed window.
    """
    if window is None:
        return True
    start, end = parse_window(window)
    if tz is not None and now.tzinfo is not None:
        now = now.astimezone(tz)
    t = now.time().replace(tzinfo=None)
    if start == end:
        return True
    if start < end:
        return start <= t < end
    return t >= start or t < end


def resolve_timezone(name: str | None) -> tzinfo:
    """ZoneInfo(name), or when `name` is None the zone `$TZ` names, else the system's (`localzone`).

    Always a zone, never a fixed offset, so quiet hours follow daylight-saving changes.
    Raises ValueError for an unknown name (check it at startup).
    """
    return local_zone(name).zone


class AwaySignal:
    """The "screen off / user away" signal pushed over the socket, with an expiry. Thread-safe.

    `set(True, expires_at)`: the user is away until `expires_at`; `set(False, ...)`: the user
    is active. `expires_at` None means until the next `set` or `clear`. `current(now)` is
    None when no signal was set or it has expired (the policy then ignores it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._away: bool | None = None
        self._expires_at: datetime | None = None

    def set(self, away: bool, expires_at: datetime | None = None) -> None:
        if not isinstance(away, bool):
            raise TypeError("away must be a bool")
        with self._lock:
            self._away = away
            self._expires_at = expires_at

    def clear(self) -> None:
        with self._lock:
            self._away = None
            self._expires_at = None

    def current(self, now: datetime | None = None) -> bool | None:
        """True (away), False (active) or None (no unexpired signal)."""
        with self._lock:
            away, expires_at = self._away, self._expires_at
        if away is None:
            return None
        if expires_at is not None:
            # timestamps, so naive (local) and aware datetimes compare without TypeError
            now_ts = (now or datetime.now().astimezone()).timestamp()
            if now_ts >= expires_at.timestamp():
                return None
        return away

    def snapshot(self) -> tuple[bool | None, datetime | None]:
        """(away, expires_at) as last set, for `status`; does not apply the expiry."""
        with self._lock:
            return self._away, self._expires_at


# -- memory ----------------------------------------------------------------------------------


def available_mb() -> float | None:
    """Available system memory in MiB (psutil), or None if it cannot be read."""
    try:
        import psutil

        return psutil.virtual_memory().available / MIB
    except Exception as e:  # unreadable /proc/meminfo and friends: unknown, not a crash
        log.debug("available memory unknown: %s", e)
        return None


def process_tree_rss_mb(pid: int) -> float | None:
    """Resident memory (MiB) of process `pid` plus all its descendants; None if it is gone or unreadable."""
    try:
        import psutil

        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile
                continue
        return total / MIB
    except Exception as e:  # NoSuchProcess, ZombieProcess, AccessDenied, ...
        log.debug("RSS of pid %s unknown: %s", pid, e)
        return None


# -- one snapshot ----------------------------------------------------------------------------


def take_readings(
    power_probe: PowerProbe,
    *,
    tz: tzinfo | None = None,
    now: datetime | None = None,
    away: AwaySignal | None = None,
    trainer_pid: int | None = None,
    load_fn: Callable[[], float | None] = read_load1,
    memory_fn: Callable[[], float | None] = available_mb,
    rss_fn: Callable[[int], float | None] = process_tree_rss_mb,
) -> Readings:
    """Read every probe once. Never raises (a failing probe gives None / an unknown power reading).

    `now` defaults to the current time in `tz` (default: the system's local zone);
    `trainer_pid`: the running trainer child, whose process-tree RSS is read.
    """
    if now is None:
        now = datetime.now(tz) if tz is not None else datetime.now().astimezone()
    elif tz is not None:
        now = now.astimezone(tz)  # an injected clock: the wall-clock time of the zone quiet hours use
    try:
        power = power_probe.read()
        if not isinstance(power, PowerReading):
            power = unknown_power(getattr(power_probe, "source", "unknown"),
                                  f"probe returned {type(power).__name__}")
    except Exception as e:  # a probe outside this module that breaks the contract
        log.warning("power probe raised: %s", e)
        power = unknown_power(getattr(power_probe, "source", "unknown"), f"probe error: {e}")
    return Readings(
        now=now,
        power=power,
        load1=_safe(load_fn),
        available_mb=_safe(memory_fn),
        user_away=away.current(now) if away is not None else None,
        trainer_rss_mb=_safe(lambda: rss_fn(trainer_pid)) if trainer_pid is not None else None,
    )


def _safe(fn: Callable[[], float | None]) -> float | None:
    try:
        return fn()
    except Exception as e:
        log.warning("probe %s failed: %s", getattr(fn, "__name__", fn), e)
        return None
