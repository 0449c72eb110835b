"""Power probes: is the device on external power, how full and how hot is its battery.

The contract (`PowerProbe`), which every implementation here keeps:

* `read()` returns a `PowerReading` and **never raises**: any failure (missing command,
  timeout, unreadable file, bad JSON, a bug in a parser) becomes an *unknown* reading.
* An unknown reading has `on_power=None` and a non-empty `error` saying why
  ("termux-battery-status timed out after 10 s"). Individual fields a probe cannot
  read (percent, temperature, status) are None without making the whole reading unknown.
* `read()` returns within a bounded time (the Termux probe kills its command on timeout).
* `source` names the probe ("termux", "sysfs", "psutil", "fake").
* A failure that repeats is logged without flooding the log (`FailureLog`): the first at
  WARNING, then at most one line per `FAILURE_LOG_INTERVAL_S` while it keeps failing (with
  the count of failures not logged), and one INFO line when the probe works again.
* Probes are cheap to call repeatedly and are safe to call from any one thread at a time.
* The desktop rule: no battery present at all gives `has_battery=False` and, when the
  probe is built with `no_battery_means_mains=True` (policy `no_battery_means_mains`),
  `on_power=True`; with it False such a reading is unknown.

`make_power_probe` builds one from a `PowerProbeKind` (`auto` picks termux, then sysfs, then psutil).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .readings import PowerReading
from .settings import PowerProbeKind

log = logging.getLogger(__name__)

TERMUX_COMMAND = "termux-battery-status"
SYSFS_ROOT = Path("/sys/class/power_supply")
DEFAULT_TIMEOUT_S = 10.0
_MAX_OUTPUT = 64 * 1024  # termux-battery-status prints ~250 bytes
# While a probe keeps failing (a hanging termux-battery-status), at most one log line per this many seconds.
FAILURE_LOG_INTERVAL_S = 600.0

__all__ = [
    "PowerProbe",
    "TermuxBatteryProbe",
    "SysfsPowerProbe",
    "PsutilPowerProbe",
    "FakePowerProbe",
    "make_power_probe",
    "detect_power_probe_kind",
    "unknown_power",
    "parse_termux_battery",
    "TERMUX_COMMAND",
    "SYSFS_ROOT",
    "FailureLog",
    "FAILURE_LOG_INTERVAL_S",
    "BoundedRun",
    "run_bounded",
]


@runtime_checkable
class PowerProbe(Protocol):
    """Reads the power state. See the module docstring for the contract."""

    source: str

    def read(self) -> PowerReading:
        """The current power state; never raises, returns within a bounded time."""
        ...


def unknown_power(source: str, error: str, **known: Any) -> PowerReading:
    """An unknown reading (`on_power=None`) from `source`, with `error` saying why."""
    fields: dict[str, Any] = {"percent": None, "temperature_c": None, "status": None, "has_battery": None}
    fields.update(known)
    return PowerReading(on_power=None, source=source, error=error or "unknown", **fields)


def _no_battery(source: str, no_battery_means_mains: bool) -> PowerReading:
    if no_battery_means_mains:
        return PowerReading(on_power=True, percent=None, temperature_c=None, status=None,
                            has_battery=False, source=source)
    return unknown_power(source, "no battery found (no_battery_means_mains is off)", has_battery=False)


def _number(value: Any) -> float | None:
    """A finite int/float (not bool) as float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def _percent(value: Any) -> float | None:
    f = _number(value)
    return f if f is not None and 0 <= f <= 100 else None


def _duration(seconds: float) -> str:
    """A short human duration: "45 s", "10 min", "2.5 h"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FailureLog:
    """Logs a repeating failure of one thing (`what`, e.g. "termux-battery-status") without flooding the log.

    `failed(reason)`: the first failure of a run of failures is logged at WARNING; while the failures go
    on, at most one WARNING per `interval_s` (saying how many failures were not logged since the last
    line); the others are only counted. `succeeded()`: after failures, one INFO line that it works again.
    `clock` (seconds, monotonic) is injectable for tests. Thread-safe.
    """

    def __init__(self, what: str, *, interval_s: float = FAILURE_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.what = what
        self.interval_s = interval_s
        self._clock = clock
        self._log = logger or log
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._last_logged = 0.0
        self._failures = 0  # in the current run of failures
        self._not_logged = 0  # since the last line

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def failed(self, reason: str, *, exc_info: bool = False) -> None:
        with self._lock:
            now = self._clock()
            self._failures += 1
            if self._failing_since is None:
                self._failing_since = self._last_logged = now
                self._not_logged = 0
                self._log.warning("%s failed: %s (while it keeps failing, logged at most once every %s)",
                                  self.what, reason, _duration(self.interval_s), exc_info=exc_info)
            elif now - self._last_logged >= self.interval_s:
                self._log.warning("%s still failing: %s (%d failures not logged in the last %s; %d since %s ago)",
                                  self.what, reason, self._not_logged, _duration(now - self._last_logged),
                                  self._failures, _duration(now - self._failing_since), exc_info=exc_info)
                self._last_logged = now
                self._not_logged = 0
            else:
                self._not_logged += 1

    def succeeded(self) -> None:
        with self._lock:
            if self._failing_since is None:
                return
            now = self._clock()
            self._log.info("%s works again, after %d failure%s over %s", self.what, self._failures,
                           "" if self._failures == 1 else "s", _duration(now - self._failing_since))
            self._failing_since = None
            self._failures = self._not_logged = 0


class _GuardedProbe:
    """Base: `read()` calls `_read()` and turns any exception into an unknown reading (logged through a
    `FailureLog`, so a probe failing on every read does not flood the log)."""

    source = "unknown"
    _failure_log: FailureLog | None = None

    def _failures(self) -> FailureLog:
        if self._failure_log is None:
            self._failure_log = FailureLog(f"{self.source} power probe")
        return self._failure_log

    def read(self) -> PowerReading:
        try:
            return self._read()
        except Exception as e:  # the contract: a probe never crashes the daemon
            self._failures().failed(f"{type(e).__name__}: {e}", exc_info=log.isEnabledFor(logging.DEBUG))
            return unknown_power(self.source, f"probe error: {type(e).__name__}: {e}")

    def _read(self) -> PowerReading:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "env" and not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# -- Termux:API ------------------------------------------------------------------------------


def parse_termux_battery(data: Any) -> PowerReading:
    """Turn `termux-battery-status` JSON into a reading (pure; never raises).

    `plugged` other than UNPLUGGED means on power, even when `status` is NOT_CHARGING or FULL.
    Without `plugged`, CHARGING/FULL mean on power and DISCHARGING means not; anything
    else is unknown. Any field may be missing.
    """
    if not isinstance(data, dict):
        return unknown_power("termux", f"termux-battery-status printed {type(data).__name__}, not an object")
    plugged = data.get("plugged")
    status = data.get("status")
    status = status.strip().upper() if isinstance(status, str) and status.strip() else None
    percent = _percent(data.get("percentage"))
    temperature = _number(data.get("temperature"))
    on_power: bool | None
    if isinstance(plugged, str) and plugged.strip():
        on_power = plugged.strip().upper() != "UNPLUGGED"
    elif status in ("CHARGING", "FULL"):
        on_power = True
    elif status == "DISCHARGING":
        on_power = False
    else:
        on_power = None
    if on_power is None:
        return unknown_power("termux", "termux-battery-status gave neither plugged nor a usable status",
                             percent=percent, temperature_c=temperature, status=status, has_battery=True)
    return PowerReading(on_power=on_power, percent=percent, temperature_c=temperature, status=status,
                        has_battery=True, source="termux")


class TermuxBatteryProbe(_GuardedProbe):
    """Runs `termux-battery-status` (Termux:API) with a timeout.

    The command waits forever for the Termux:API app when the app is not installed,
    so it runs in its own process group which is killed (SIGKILL) on timeout.
    Timeout, non-zero exit, bad JSON or a missing command give an unknown reading; such failures
    are logged through a `FailureLog` (`log_interval_s`, `clock`), since the daemon reads the probe
    every few seconds and a hanging command would otherwise log a warning on every read.
    """

    source = "termux"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, command: str = TERMUX_COMMAND,
                 env: Mapping[str, str] | None = None, *, log_interval_s: float = FAILURE_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.command = command
        self.env = env  # None: the daemon's environment at each read (PATH looked up then)
        self._failure_log = FailureLog(command, interval_s=log_interval_s, clock=clock)

    def _read(self) -> PowerReading:
        reading, failure = self._run()
        if failure is None:
            self._failures().succeeded()
        else:
            self._failures().failed(failure)
        return reading

    def _failed(self, reason: str, hint: str = "") -> tuple[PowerReading, str]:
        return unknown_power(self.source, f"{self.command} {reason}"), reason + hint

    def _run(self) -> tuple[PowerReading, str | None]:
        """The reading, and why the command failed (None when it ran and printed JSON)."""
        result = run_bounded(self.command, timeout_s=self.timeout_s, env=self.env)
        if result.failure is not None:
            return unknown_power(self.source, f"{self.command} {result.failure}"), result.failure + result.hint
        out = result.stdout
        if len(out) > _MAX_OUTPUT:
            return self._failed(f"printed {len(out)} bytes, too much")
        try:
            data = json.loads(out.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            snippet = out[:60].decode("utf-8", "replace")
            return self._failed(f"printed invalid JSON: {snippet!r}")
        return parse_termux_battery(data), None


@dataclass(frozen=True)
class BoundedRun:
    """What `run_bounded` saw: `failure` None when the command ran and exited 0 (then `stdout` holds its
    output); otherwise a phrase for "<command> <failure>" ("timed out after 10 s") and a `hint`."""

    failure: str | None
    stdout: bytes = b""
    hint: str = ""


def run_bounded(command: str, *args: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                env: Mapping[str, str] | None = None, input_bytes: bytes | None = None) -> BoundedRun:
    """Run a termux-api style command (`command` looked up on env's PATH) and wait at most `timeout_s`.

    The command runs in its own process group, which is SIGKILLed on timeout: termux-api commands
    wait forever when the Termux:API app is missing. Never raises for a missing, failing or hanging
    command (that is in the result); returns within about `timeout_s` + 2 s.
    """
    env = dict(os.environ if env is None else env)
    exe = shutil.which(command, path=env.get("PATH"))
    if exe is None:
        return BoundedRun("not found on PATH (pkg install termux-api)")
    try:
        proc = subprocess.Popen(
            [exe, *args], stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True, close_fds=True,
        )
    except OSError as e:
        return BoundedRun(f"cannot be run: {e.strerror or e}")
    try:
        out, err = proc.communicate(input=input_bytes, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return BoundedRun(f"timed out after {timeout_s:g} s", hint=" (is the Termux:API app installed?)")
    except BaseException:  # never leave the command running behind us
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        detail = err.decode("utf-8", "replace").strip().splitlines()
        tail = f": {detail[0][:200]}" if detail else ""
        return BoundedRun(f"exited with status {proc.returncode}{tail}")
    return BoundedRun(None, out)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's whole process group, reap it, close the pipes; never blocks long."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        log.error("%s (pid %d) did not die after SIGKILL", proc.args[0] if proc.args else "command", proc.pid)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


# -- sysfs -----------------------------------------------------------------------------------


class _Unreadable(Exception):
    pass


def _read_attr(path: Path) -> str | None:
    """A sysfs attribute's stripped text; None if absent; _Unreadable if present but unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(4096).strip()
    except FileNotFoundError:
        return None
    except OSError as e:  # PermissionError on Android, EIO/ENODATA from some drivers
        raise _Unreadable(f"{path}: {e.strerror or e}") from None


_POWER_TYPES = {"mains", "usb", "usb_c", "usb_pd", "usb_pd_drp", "usb_dcp", "usb_cdp", "usb_aca",
                "usb_hvdcp", "usb_hvdcp_3", "wireless", "brickid", "apple_brick_id"}


class SysfsPowerProbe(_GuardedProbe):
    """Reads `/sys/class/power_supply/*` (`type`, `online`, `present`, `status`, `capacity`, `temp`).

    Any Mains/USB/Wireless supply with `online` = 1 means on power. Without readable
    supply `online` files, the battery's status decides (Charging/Full: on power,
    Discharging: not). `temp` is in tenths of °C. No supplies or no battery at all:
    the desktop rule. Unreadable files (PermissionError, as on Android): unknown.
    """

    source = "sysfs"

    def __init__(self, root: Path | str = SYSFS_ROOT, no_battery_means_mains: bool = True) -> None:
        self.root = Path(root)
        self.no_battery_means_mains = no_battery_means_mains

    def _read(self) -> PowerReading:
        try:
            names = sorted(os.listdir(self.root))
        except OSError as e:  # missing (not Linux) or denied (Android): unknown, not "no battery"
            return unknown_power(self.source, f"cannot list {self.root}: {e.strerror or e}")
        problems: list[str] = []
        online: list[bool] = []
        battery: dict[str, str | None] | None = None
        for name in names:
            supply = self.root / name
            try:
                kind = (_read_attr(supply / "type") or _guess_type(name)).strip().lower()
                if kind == "battery":
                    present = _read_attr(supply / "present")
                    if present == "0" or battery is not None:
                        continue
                    battery = {"status": None, "capacity": None, "temp": None}
                    for attr in battery:
                        try:
                            battery[attr] = _read_attr(supply / attr)
                        except _Unreadable as e:
                            problems.append(str(e))
                elif kind in _POWER_TYPES:
                    value = _read_attr(supply / "online")
                    if value in ("0", "1"):
                        online.append(value == "1")
                    elif value is not None and value.isdigit():  # some drivers report 2 for "online, fixed"
                        online.append(int(value) > 0)
            except _Unreadable as e:
                problems.append(str(e))
        status = percent = temperature = None
        if battery is not None:
            status = battery["status"].upper().replace(" ", "_") if battery["status"] else None
            percent = _percent(_int_or_none(battery["capacity"]))
            t = _int_or_none(battery["temp"])
            temperature = t / 10.0 if t is not None else None
        on_power: bool | None
        if online:
            on_power = any(online)
        elif status in ("CHARGING", "FULL"):
            on_power = True
        elif status == "DISCHARGING":
            on_power = False
        else:
            on_power = None
        if on_power is None and battery is None and not problems:
            return _no_battery(self.source, self.no_battery_means_mains)
        if on_power is None:
            why = problems[0] if problems else "no supply reports online and the battery status is unclear"
            return unknown_power(self.source, f"unreadable: {why}" if problems else why, percent=percent,
                                 temperature_c=temperature, status=status,
                                 has_battery=True if battery is not None else None)
        return PowerReading(on_power=on_power, percent=percent, temperature_c=temperature, status=status,
                            has_battery=battery is not None, source=self.source)


def _guess_type(name: str) -> str:
    low = name.lower()
    if low.startswith("bat") or low == "battery":
        return "battery"
    if low.startswith(("ac", "adp", "mains")):
        return "mains"
    if low.startswith("usb"):
        return "usb"
    return "unknown"


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


# -- psutil ----------------------------------------------------------------------------------


class PsutilPowerProbe(_GuardedProbe):
    """`psutil.sensors_battery()`: None means no battery (the desktop rule); no temperature."""

    source = "psutil"

    def __init__(self, no_battery_means_mains: bool = True) -> None:
        self.no_battery_means_mains = no_battery_means_mains

    def _read(self) -> PowerReading:
        import psutil

        sensors_battery = getattr(psutil, "sensors_battery", None)
        if sensors_battery is None:
            return unknown_power(self.source, "psutil has no sensors_battery on this platform")
        batt = sensors_battery()
        if batt is None:
            return _no_battery(self.source, self.no_battery_means_mains)
        plugged = batt.power_plugged
        percent = _percent(batt.percent)
        if plugged is None:
            return unknown_power(self.source, "psutil cannot tell whether power is plugged",
                                 percent=percent, has_battery=True)
        plugged = bool(plugged)
        if plugged:
            status = "FULL" if percent is not None and percent >= 100 else "CHARGING"
        else:
            status = "DISCHARGING"
        return PowerReading(on_power=plugged, percent=percent, temperature_c=None, status=status,
                            has_battery=True, source=self.source)


# -- fake ------------------------------------------------------------------------------------

_FAKE_FIELDS = {"on_power", "percent", "temperature_c", "status", "has_battery", "error"}


class FakePowerProbe(_GuardedProbe):
    """Reads a small JSON file on every call, for tests, soak runs and demos.

    Example: `{"on_power": true, "percent": 80, "temperature_c": 30}`; keys are the
    `PowerReading` fields (all optional). Write the file atomically (write + rename) to
    "plug" or "unplug" the fake charger. Missing or invalid file: unknown. A file with
    `"has_battery": false` and no `on_power` follows the desktop rule.
    """

    source = "fake"

    def __init__(self, path: Path | str, no_battery_means_mains: bool = True) -> None:
        self.path = Path(path)
        self.no_battery_means_mains = no_battery_means_mains

    def _read(self) -> PowerReading:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return unknown_power(self.source, f"fake power file {self.path} does not exist")
        except (OSError, UnicodeDecodeError) as e:
            return unknown_power(self.source, f"cannot read fake power file {self.path}: {e}")
        try:
            data = json.loads(text)
        except ValueError as e:
            return unknown_power(self.source, f"fake power file {self.path}: invalid JSON: {e}")
        if not isinstance(data, dict):
            return unknown_power(self.source, f"fake power file {self.path}: expected a JSON object")
        extra = set(data) - _FAKE_FIELDS
        if extra:
            return unknown_power(self.source, f"fake power file {self.path}: unknown keys {sorted(extra)}")
        on_power = data.get("on_power")
        has_battery = data.get("has_battery")
        status = data.get("status")
        error = data.get("error")
        for key, value in (("on_power", on_power), ("has_battery", has_battery)):
            if value is not None and not isinstance(value, bool):
                return unknown_power(self.source, f"fake power file {self.path}: {key} must be true/false/null")
        for key in ("status", "error"):
            if data.get(key) is not None and not isinstance(data[key], str):
                return unknown_power(self.source, f"fake power file {self.path}: {key} must be a string")
        if has_battery is False and on_power is None:
            return _no_battery(self.source, self.no_battery_means_mains)
        percent = _percent(data.get("percent"))
        temperature = _number(data.get("temperature_c"))
        if on_power is None:
            return unknown_power(self.source, error or "fake power file gives on_power null", percent=percent,
                                 temperature_c=temperature, status=status, has_battery=has_battery)
        return PowerReading(on_power=on_power, percent=percent, temperature_c=temperature, status=status,
                            has_battery=True if has_battery is None else has_battery, source=self.source,
                            error=error)


# -- selection -------------------------------------------------------------------------------


def _is_termux(env: Mapping[str, str]) -> bool:
    return "com.termux" in env.get("PREFIX", "") or shutil.which(TERMUX_COMMAND, path=env.get("PATH")) is not None


def _sysfs_readable(root: Path) -> bool:
    try:
        names = os.listdir(root)
    except OSError:
        return False
    for name in names:  # readable means at least one attribute opens
        for attr in ("type", "online", "status"):
            try:
                if _read_attr(root / name / attr) is not None:
                    return True
            except _Unreadable:
                return False
    return not names  # an empty, listable folder: a desktop; sysfs applies the desktop rule


def detect_power_probe_kind(env: Mapping[str, str] | None = None, sysfs_root: Path | str = SYSFS_ROOT) -> PowerProbeKind:
    """`auto`: termux when `termux-battery-status` is on PATH or PREFIX is Termux's,
    else sysfs when readable, else psutil. Never returns AUTO or FAKE."""
    env = os.environ if env is None else env
    if _is_termux(env):
        return PowerProbeKind.TERMUX
    if _sysfs_readable(Path(sysfs_root)):
        return PowerProbeKind.SYSFS
    return PowerProbeKind.PSUTIL


def make_power_probe(
    kind: PowerProbeKind | str | None = PowerProbeKind.AUTO,
    *,
    fake_file: Path | str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    no_battery_means_mains: bool = True,
    sysfs_root: Path | str = SYSFS_ROOT,
    env: Mapping[str, str] | None = None,
) -> PowerProbe:
    """Build the probe for `kind` (None or "auto": `detect_power_probe_kind`).

    Raises ValueError for an unknown kind or `fake` without `fake_file` (a config
    error, to report at startup); the returned probe itself never raises.
    """
    kind = PowerProbeKind(kind) if kind is not None else PowerProbeKind.AUTO
    if kind is PowerProbeKind.AUTO:
        kind = detect_power_probe_kind(env, sysfs_root)
        log.info("power probe: %s (auto)", kind.value)
    if kind is PowerProbeKind.TERMUX:
        return TermuxBatteryProbe(timeout_s=timeout_s, env=env)
    if kind is PowerProbeKind.SYSFS:
        return SysfsPowerProbe(sysfs_root, no_battery_means_mains=no_battery_means_mains)
    if kind is PowerProbeKind.PSUTIL:
        return PsutilPowerProbe(no_battery_means_mains=no_battery_means_mains)
    if kind is PowerProbeKind.FAKE:
        if fake_file is None:
            raise ValueError("power_probe = fake needs daemon.fake_power_file")
        return FakePowerProbe(fake_file, no_battery_means_mains=no_battery_means_mains)
    raise ValueError(f"unknown power probe {kind!r}")  # pragma: no cover
