"""The training policy: pure functions from (readings, config, store state) to a Decision.

    decide(readings, policy, state)           may a new session start now?
    should_stop(readings, policy, state)      may the running session go on? (train=False: stop it)
    decide_train_now(readings, policy, state) may a manual `train-now` session start? (memory only)

`Decision.train` is the answer; `Decision.reasons` are short human strings saying why not
("not charging", "battery 32% < 50%"). When `train` is True, `reasons` may hold notes
about unknown readings that were waved through by `unknown_means_yes`.

Unknown readings (None) block unless `policy.unknown_means_yes`, with these exceptions:
an unknown battery temperature never blocks (psutil and many laptops cannot read it),
and an absent away-signal (`user_away` None) means "no signal", not "unknown".
Load never stops a running session (the trainer itself raises the load), and neither do
the data and cooldown conditions. These functions never raise and never read the clock.
"""

from __future__ import annotations

import math
from datetime import datetime

from .probes import in_quiet_hours, resolve_timezone
from .readings import Decision, Readings, StoreState
from .settings import PolicyConfig

__all__ = ["decide", "should_stop", "decide_train_now", "effective_on_power"]


class _Checks:
    """Collects blocking reasons and (for unknown_means_yes) notes."""

    def __init__(self, policy: PolicyConfig) -> None:
        self.policy = policy
        self.reasons: list[str] = []
        self.notes: list[str] = []

    def block(self, reason: str) -> None:
        self.reasons.append(reason)

    def unknown(self, reason: str) -> None:
        if self.policy.unknown_means_yes:
            self.notes.append(f"{reason}, ignored (unknown_means_yes)")
        else:
            self.reasons.append(reason)

    def decision(self) -> Decision:
        if self.reasons:
            return Decision(train=False, reasons=self.reasons)
        return Decision(train=True, reasons=self.notes)


def effective_on_power(readings: Readings, policy: PolicyConfig) -> bool | None:
    """On external power? Applies the desktop rule (no battery at all = mains) to readings."""
    p = readings.power
    if p.on_power is None and p.has_battery is False and policy.no_battery_means_mains:
        return True
    return p.on_power


def _fmt(x: float) -> str:
    return f"{x:g}"


def _power_unknown(readings: Readings) -> str:
    err = readings.power.error
    return f"power unknown ({err})" if err else "power unknown"


def _check_power(c: _Checks, r: Readings, *, unplugged: str = "not charging") -> None:
    if not c.policy.require_charging:
        return
    on_power = effective_on_power(r, c.policy)
    if on_power is None:
        c.unknown(_power_unknown(r))
    elif not on_power:
        c.block(unplugged)


def _check_battery_level(c: _Checks, r: Readings) -> None:
    p = r.power
    if p.has_battery is False or c.policy.min_battery_percent <= 0:
        return
    if p.percent is None:
        if p.on_power is None and p.error and c.policy.require_charging:
            return  # already reported as "power unknown (...)"; one reason is enough
        c.unknown(f"battery level unknown ({p.error})" if p.error else "battery level unknown")
    elif p.percent < c.policy.min_battery_percent:
        c.block(f"battery {p.percent:.0f}% < {c.policy.min_battery_percent}%")


def _check_temperature(c: _Checks, r: Readings) -> None:
    t = r.power.temperature_c
    if t is not None and t > c.policy.max_battery_temp_c:  # unknown temperature does not block
        c.block(f"battery {t:.1f} °C > {_fmt(c.policy.max_battery_temp_c)} °C")


def _check_load(c: _Checks, r: Readings) -> None:
    if r.load1 is None:
        c.unknown("load unknown")
    elif r.load1 > c.policy.max_load:
        c.block(f"load {r.load1:.2f} > {c.policy.max_load:.2f}")


def _check_quiet_hours(c: _Checks, r: Readings) -> None:
    window = c.policy.quiet_hours
    if window is None:
        return
    try:
        tz = resolve_timezone(c.policy.timezone) if c.policy.timezone else None
        inside = in_quiet_hours(r.now, window, tz)
    except ValueError as e:
        c.block(f"quiet hours unusable: {e}")
        return
    if not inside:
        c.block(f"outside quiet hours {window}")


def _check_memory(c: _Checks, r: Readings) -> None:
    if r.available_mb is None:
        c.unknown("available memory unknown")
    elif r.available_mb < c.policy.min_available_mb:
        c.block(f"only {r.available_mb:.0f} MiB available < {c.policy.min_available_mb}")


def _check_rss(c: _Checks, r: Readings) -> None:
    rss = r.trainer_rss_mb
    if rss is not None and rss > c.policy.memory_budget_mb:
        c.block(f"trainer RSS {rss:.0f} MiB > budget {c.policy.memory_budget_mb} MiB")


def _check_session_length(c: _Checks, r: Readings, state: StoreState) -> None:
    if state.training_since is None:
        return
    elapsed_min = (_ts(r.now) - _ts(state.training_since)) / 60.0
    if elapsed_min >= c.policy.max_session_minutes:
        c.block(f"session reached max_session_minutes ({_fmt(c.policy.max_session_minutes)} min)")


def _ts(dt: datetime) -> float:
    """POSIX timestamp; naive datetimes count as local time (so mixed datetimes never raise)."""
    return dt.timestamp()


def decide(readings: Readings, policy: PolicyConfig, state: StoreState) -> Decision:
    """May a new training session start now? Pure; never raises."""
    c = _Checks(policy)
    _check_power(c, readings)
    _check_battery_level(c, readings)
    _check_temperature(c, readings)
    _check_load(c, readings)
    _check_quiet_hours(c, readings)
    if readings.user_away is False:
        c.block("user active (signal)")
    _check_memory(c, readings)
    n, need = state.untrained_examples, policy.min_new_examples
    if n < need:
        c.block(f"no new examples ({n} < {need})" if n == 0 else f"too few new examples ({n} < {need})")
    if state.last_session_end is not None and policy.cooldown_minutes > 0:
        left_s = policy.cooldown_minutes * 60 - (_ts(readings.now) - _ts(state.last_session_end))
        if left_s > 0:
            c.block(f"cooldown: {math.ceil(left_s / 60)} min left")
    return c.decision()


def should_stop(readings: Readings, policy: PolicyConfig, state: StoreState, *, manual: bool = False) -> Decision:
    """May the running session go on? `train=False` means stop it, `reasons` say why.

    Stops on: charger unplugged (or power unknown), battery below the minimum or too hot,
    user back (signal), trainer RSS over `memory_budget_mb`, `max_session_minutes`
    passed (since `state.training_since`), outside quiet hours. Load, new data and
    cooldown never stop a session. `manual=True` (a `train-now` session, which ignored
    charging and idleness when it started): only the RSS budget, the session length
    and the battery temperature apply. Pure; never raises.
    """
    c = _Checks(policy)
    if not manual:
        _check_power(c, readings, unplugged="charger unplugged")
        _check_battery_level(c, readings)
        if readings.user_away is False:
            c.block("user back (signal)")
        _check_quiet_hours(c, readings)
    _check_temperature(c, readings)
    _check_rss(c, readings)
    _check_session_length(c, readings, state)
    return c.decision()


def decide_train_now(readings: Readings, policy: PolicyConfig, state: StoreState) -> Decision:
    """May a manual `train-now` session start? Ignores charging, idleness, quiet hours,
    cooldown and new data; still checks available memory (and refuses a battery that is
    known to be too hot). Pure; never raises."""
    c = _Checks(policy)
    _check_memory(c, readings)
    _check_temperature(c, readings)
    return c.decision()
