"""What the probes read and what the policy decides: the types shared by probes, policy and daemon.

A probe that cannot read reports None (unknown); it never raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class PowerReading:
    on_power: bool | None  # external power connected (plugged != UNPLUGGED counts, even if FULL/NOT_CHARGING)
    percent: float | None  # battery charge 0..100
    temperature_c: float | None  # battery temperature
    status: str | None  # CHARGING / DISCHARGING / FULL / NOT_CHARGING / ... as reported
    has_battery: bool | None  # False: a desktop with no battery at all
    source: str  # which probe produced it: "termux", "sysfs", "psutil", "fake", ...
    error: str | None = None  # why it is unknown, if it is


@dataclass(frozen=True)
class Readings:
    """One snapshot of the device, taken by the daemon before each policy decision."""

    now: datetime  # timezone-aware local time (policy.timezone)
    power: PowerReading
    load1: float | None  # 1-minute load average
    available_mb: float | None  # available system memory
    user_away: bool | None  # pushed over the socket (`signal`), None when no unexpired signal
    trainer_rss_mb: float | None = None  # the running trainer child's RSS, if any


@dataclass(frozen=True)
class StoreState:
    """What the policy needs to know about the data and past sessions."""

    untrained_examples: int
    last_session_end: datetime | None  # for the cooldown
    training_since: datetime | None = None  # start of the running session, if one runs


@dataclass(frozen=True)
class Decision:
    train: bool
    reasons: list[str] = field(default_factory=list)  # why not (or, when train, what held): "not charging", ...

    def summary(self) -> str:
        if self.train:
            return "ready to train"
        return "waiting: " + "; ".join(self.reasons)
