"""The `[policy]`, `[daemon]` and `[paths]` config sections and the root config model."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pocketd.ingest.config import IngestConfig
from pocketd.trainer.config import TrainerConfig

from .localzone import valid_zone_name
from .locations import APP, DEFAULT_REQUEST_TIMEOUT_S, default_runtime_dir

# Quiet hours: exactly "HH:MM-HH:MM", ASCII digits only (int() would take "٠٧" or " 7").
QUIET_HOURS = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]-(?:[01][0-9]|2[0-3]):[0-5][0-9]", re.ASCII)
MAX_MB = 1 << 24  # 16 TiB in MiB: larger memory figures are typos
DAY_S = 86_400.0
DAY_MIN = 1440.0
SHORT_REPR_CHARS = 80


def short_repr(value: object, limit: int = SHORT_REPR_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, with the full length noted: a 50 MB bad value is not echoed."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class PolicyConfig(BaseModel):
    """When the daemon may train."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    require_charging: bool = Field(True, description="Train only on external power.")
    min_battery_percent: int = Field(50, ge=0, le=100, description="Train only above this charge.")
    max_battery_temp_c: float = Field(
        40.0, ge=0, le=60, description="Do not train when the battery is hotter than this (0-60 °C)."
    )
    max_load: float = Field(
        1.5, ge=0, le=10_000, description="Do not train when the 1-minute load average is above this."
    )
    quiet_hours: str | None = Field(
        None, description='Local-time window when training is allowed, e.g. "23:00-07:00" (unset: any time).'
    )
    timezone: str | None = Field(
        None, description="IANA zone for quiet_hours, e.g. \"Europe/Berlin\" (unset: $TZ, else the system's zone)."
    )
    memory_budget_mb: int = Field(
        1536, ge=64, le=MAX_MB, description="Hard cap on the trainer's resident memory (MiB)."
    )
    min_available_mb: int = Field(
        512, ge=0, le=MAX_MB, description="Do not start unless this much memory is available."
    )
    min_new_examples: int = Field(1, ge=0, le=10**9, description="Untrained examples needed before a session starts.")
    max_session_minutes: float = Field(30.0, gt=0, le=7 * DAY_MIN, description="Longest training session.")
    cooldown_minutes: float = Field(10.0, ge=0, le=7 * DAY_MIN, description="Pause between two sessions.")
    check_interval_s: float = Field(120.0, ge=1, le=DAY_S, description="How often the policy is checked while idle.")
    unknown_means_yes: bool = Field(
        False, description="Treat unreadable probes (power, load) as favourable instead of blocking."
    )
    no_battery_means_mains: bool = Field(
        True, description="A machine with no battery at all counts as on mains power (desktops)."
    )

    @field_validator("quiet_hours")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not QUIET_HOURS.fullmatch(v):  # the value is echoed once, cut, by the config loader
            raise ValueError('expected HH:MM-HH:MM in ASCII digits, 24-hour clock, e.g. "23:00-07:00"')
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not valid_zone_name(v):
            raise ValueError('expected an IANA time zone name such as "Europe/Berlin" or "UTC"')
        return v


class PowerProbeKind(str, Enum):
    """Which power probe the daemon uses (`[daemon] power_probe`)."""

    AUTO = "auto"  # termux when termux-battery-status is on PATH, else sysfs if readable, else psutil
    TERMUX = "termux"  # `termux-battery-status` (Termux:API), run with a timeout
    SYSFS = "sysfs"  # /sys/class/power_supply
    PSUTIL = "psutil"  # psutil.sensors_battery()
    FAKE = "fake"  # a small JSON file (`fake_power_file`), for tests and demos


class WakeLockMode(str, Enum):
    """Whether sessions hold a Termux wake lock (`[daemon] wake_lock`)."""

    AUTO = "auto"  # on when termux-wake-lock is on PATH (Termux), off elsewhere
    ON = "on"
    OFF = "off"


class DaemonConfig(BaseModel):
    """The long-running process."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    inbox: Path | None = Field(None, description="A folder polled for new files to ingest (unset: none).")
    inbox_poll_s: float = Field(60.0, ge=1, le=DAY_S, description="How often the inbox is polled.")
    socket_path: Path | None = Field(None, description="Control socket (default: in the runtime dir).")
    request_max_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="Largest accepted socket request.")
    request_timeout_s: float = Field(
        DEFAULT_REQUEST_TIMEOUT_S, gt=0, le=3600,
        description="Deadline for one socket request, from its first byte (idle connections stay open)."
    )
    stop_grace_s: float = Field(60.0, gt=0, le=3600, description="SIGTERM-to-SIGKILL grace for the trainer.")
    nice: int = Field(10, ge=0, le=19, description="Niceness of the trainer child process.")
    power_probe: PowerProbeKind = Field(
        PowerProbeKind.AUTO, description="Power probe: auto, termux, sysfs, psutil or fake."
    )
    fake_power_file: Path | None = Field(
        None, description='JSON file read by the fake power probe, e.g. {"on_power": true, "percent": 80}.'
    )
    power_probe_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="Timeout for termux-battery-status and the other Termux:API commands (they can hang without "
                    "the Termux:API app).",
    )
    wake_lock: WakeLockMode = Field(
        WakeLockMode.AUTO,
        description="Hold termux-wake-lock while a session trains, released when it ends: auto (on in Termux), on, off.",
    )
    notifications: bool = Field(
        False, description="Notify when a session ends and when training stays blocked (termux-notification "
                           "in Termux, else notify-send if installed)."
    )
    notify_blocked_after_minutes: float = Field(
        180.0, ge=1, le=7 * DAY_MIN,
        description="With notifications on: notify once when training has been blocked this long while there "
                    "is data to train on.",
    )
    system_kills_before_adapting: int = Field(
        2, ge=0, le=100,
        description="After this many trainer kills in a row by the system (not by pocketd), later sessions use "
                    "half as many torch threads, down to 1 (0: never adapt).",
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR")
        return v


class PathsConfig(BaseModel):
    """Where pocketd keeps its files (defaults from platformdirs; they work on Termux)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir(APP)), description="The database lives here."
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_cache_dir(APP)),
        description="Converted model weights and other rebuildable files.",
    )
    state_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_state_dir(APP)), description="Logs and job files."
    )
    runtime_dir: Path = Field(default_factory=default_runtime_dir, description="The control socket's folder.")

    @property
    def database(self) -> Path:
        return self.data_dir / "pocketd.sqlite3"


class PocketdConfig(BaseModel):
    """The whole configuration: one section per component."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)


SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in PocketdConfig.model_fields.items()
}
