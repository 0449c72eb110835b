"""The `[policy]`, `[daemon]` and `[paths]` config sections and the root config model."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pocketd.ingest.config import IngestConfig
from pocketd.trainer.config import TrainerConfig

APP = "pocketd"


class PolicyConfig(BaseModel):
    """When the daemon may train."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    require_charging: bool = Field(True, description="Train only on external power.")
    min_battery_percent: int = Field(50, ge=0, le=100, description="Train only above this charge.")
    max_battery_temp_c: float = Field(40.0, description="Do not train when the battery is hotter than this.")
    max_load: float = Field(1.5, ge=0, description="Do not train when the 1-minute load average is above this.")
    quiet_hours: str | None = Field(
        None, description='Local-time window when training is allowed, e.g. "23:00-07:00" (unset: any time).'
    )
    timezone: str | None = Field(None, description="IANA timezone for quiet_hours (default: the system's).")
    memory_budget_mb: int = Field(1536, ge=64, description="Hard cap on the trainer's resident memory (MiB).")
    min_available_mb: int = Field(512, ge=0, description="Do not start unless this much memory is available.")
    min_new_examples: int = Field(1, ge=0, description="Untrained examples needed before a session starts.")
    max_session_minutes: float = Field(30.0, gt=0, description="Longest training session.")
    cooldown_minutes: float = Field(10.0, ge=0, description="Pause between two sessions.")
    check_interval_s: float = Field(120.0, ge=1, description="How often the policy is checked while idle.")
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
        try:
            start, end = (part.strip() for part in v.split("-"))
            for part in (start, end):
                hh, mm = part.split(":")
                if not (0 <= int(hh) < 24 and 0 <= int(mm) < 60):
                    raise ValueError
        except ValueError:
            raise ValueError(f'{v!r} is not a window like "23:00-07:00"') from None
        return f"{start}-{end}"


class PowerProbeKind(str, Enum):
    """Which power probe the daemon uses (`[daemon] power_probe`)."""

    AUTO = "auto"  # termux when termux-battery-status is on PATH, else sysfs if readable, else psutil
    TERMUX = "termux"  # `termux-battery-status` (Termux:API), run with a timeout
    SYSFS = "sysfs"  # /sys/class/power_supply
    PSUTIL = "psutil"  # psutil.sensors_battery()
    FAKE = "fake"  # a small JSON file (`fake_power_file`), for tests and demos


class DaemonConfig(BaseModel):
    """The long-running process."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    inbox: Path | None = Field(None, description="A folder polled for new files to ingest (unset: none).")
    inbox_poll_s: float = Field(60.0, ge=1, description="How often the inbox is polled.")
    socket_path: Path | None = Field(None, description="Control socket (default: in the runtime dir).")
    request_max_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted socket request.")
    request_timeout_s: float = Field(10.0, gt=0, description="Per-connection read timeout.")
    stop_grace_s: float = Field(60.0, gt=0, description="SIGTERM-to-SIGKILL grace for the trainer.")
    nice: int = Field(10, ge=0, le=19, description="Niceness of the trainer child process.")
    power_probe: PowerProbeKind = Field(
        PowerProbeKind.AUTO, description="Power probe: auto, termux, sysfs, psutil or fake."
    )
    fake_power_file: Path | None = Field(
        None, description='JSON file read by the fake power probe, e.g. {"on_power": true, "percent": 80}.'
    )
    power_probe_timeout_s: float = Field(
        10.0, gt=0, description="Timeout for termux-battery-status (it can hang without the Termux:API app)."
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"{v!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return v


def _default_runtime_dir() -> Path:
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / APP
    if os.environ.get("PREFIX") and "com.termux" in os.environ["PREFIX"]:
        return Path(os.environ["PREFIX"]) / "var" / "run" / APP
    return Path(platformdirs.user_state_dir(APP)) / "run"


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
    runtime_dir: Path = Field(default_factory=_default_runtime_dir, description="The control socket's folder.")

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
