"""Issue 15: the Termux wake lock is held only while a session trains (fake termux-wake-* commands record calls)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketd.daemon.settings import WakeLockMode
from pocketd.daemon.supervisor import Backoff
from pocketd.daemon.wakelock import WakeLock, wake_lock_enabled
from pocketd.store import Store

from .daemon_helpers import DaemonFactory, add_examples, set_power, wait_for


class FakeTermuxApi:
    """`termux-wake-lock`, `termux-wake-unlock` (and `termux-notification`) that append their calls to a log."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = tmp_path / "termux-bin"
        self.bin.mkdir()
        self.calls = tmp_path / "termux-calls.log"
        for name in ("termux-wake-lock", "termux-wake-unlock", "termux-notification"):
            self.script(name, "")
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")

    def script(self, name: str, extra: str) -> None:
        path = self.bin / name
        path.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{self.calls}"\n{extra}\n')
        path.chmod(0o700)

    def recorded(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def wake_calls(self) -> list[str]:
        return [c.split()[0] for c in self.recorded() if c.startswith("termux-wake")]


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTermuxApi:
    return FakeTermuxApi(tmp_path, monkeypatch)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def _ended(d, n: int) -> bool:
    with d.guarded_store() as s:
        return len([x for x in s.history.sessions() if x.ended_at]) >= n


LOCK, UNLOCK = "termux-wake-lock", "termux-wake-unlock"


@pytest.mark.parametrize("trainer_args, how", [
    (("--steps", "3"), "finished"),
    (("--mode", "crash"), "crashed"),
])
def test_one_lock_and_one_unlock_per_session(daemons: DaemonFactory, api: FakeTermuxApi, trainer_args: tuple[str, ...],
                                             how: str) -> None:
    d = daemons(*trainer_args, daemon={"wake_lock": "on"}, policy={"cooldown_minutes": 60},
                backoff=Backoff(base_s=3600), start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: _ended(d, 1), what=f"a {how} session")
    d.wake_lock.wait(5)
    assert api.wake_calls() == [LOCK, UNLOCK], how
    assert not d.wake_lock.marker.exists()


def test_unlocked_when_the_system_kills_the_trainer(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons("--step-s", "0.05", daemon={"wake_lock": "on"}, backoff=Backoff(base_s=3600), start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    running = wait_for(lambda: d.supervisor.running, what="training")
    wait_for(lambda: d.wake_lock.wait(5) and api.wake_calls() == [LOCK], what="the lock")
    assert d.wake_lock.marker.exists()
    os.kill(running.pid, signal.SIGKILL)
    wait_for(lambda: _ended(d, 1), what="the kill to be recorded")
    d.wake_lock.wait(5)
    assert api.wake_calls() == [LOCK, UNLOCK]


def test_unlocked_when_the_daemon_shuts_down_mid_session(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons("--step-s", "0.05", daemon={"wake_lock": "on"}, start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: d.supervisor.running, what="training")
    d.shutdown()
    assert api.wake_calls() == [LOCK, UNLOCK]


def test_several_sessions_pair_their_calls(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    """The fake trainer leaves its examples untrained, so sessions follow each other (cooldown 0)."""
    d = daemons("--steps", "2", daemon={"wake_lock": "on"}, start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: _ended(d, 3), what="three sessions")
    d.shutdown()
    with Store.open(d.config.paths.database) as s:
        n = len(s.history.sessions())
    calls = api.wake_calls()
    print(f"wake-lock calls for {n} sessions: {calls}")
    assert n >= 3 and calls == [LOCK, UNLOCK] * n


def test_a_hanging_wake_lock_never_blocks_the_daemon(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    """Without the Termux:API app the command hangs: it is killed after its timeout; status answers meanwhile."""
    api.script(LOCK, "sleep 100")
    d = daemons("--steps", "3", daemon={"wake_lock": "on", "power_probe_timeout_s": 1.0},
                policy={"cooldown_minutes": 60}, start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: d.supervisor.running or _ended(d, 1), what="the session to start")
    t0 = time.monotonic()
    d.snapshot()
    assert time.monotonic() - t0 < 0.5  # the daemon's lock is not held by the hanging command
    wait_for(lambda: _ended(d, 1), what="the session to end")
    assert d.wake_lock.wait(10)  # the unlock ran after the lock's timeout
    assert api.wake_calls() == [LOCK, UNLOCK]


def test_a_lock_left_by_a_dead_daemon_is_released_at_start(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons(daemon={"wake_lock": "on"}, start=False)
    d.wake_lock.marker.parent.mkdir(parents=True, exist_ok=True)
    d.wake_lock.marker.touch()
    d.start()
    d.wake_lock.wait(5)
    assert api.wake_calls() == [UNLOCK] and not d.wake_lock.marker.exists()


def test_off_means_no_calls(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons("--steps", "2", daemon={"wake_lock": "off"}, start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: _ended(d, 1), what="a session")
    d.shutdown()
    assert api.wake_calls() == []


def test_auto_is_on_only_where_termux_wake_lock_exists(api: FakeTermuxApi, tmp_path: Path) -> None:
    assert wake_lock_enabled(WakeLockMode.AUTO, {"PATH": str(api.bin)})
    assert not wake_lock_enabled(WakeLockMode.AUTO, {"PATH": str(tmp_path / "nothing")})
    assert wake_lock_enabled(WakeLockMode.ON, {"PATH": ""}) and not wake_lock_enabled(WakeLockMode.OFF)


def test_a_missing_command_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = WakeLock(enabled=True, marker=tmp_path / "m", env={"PATH": str(tmp_path)})
    lock.acquire()
    assert lock.wait(5) is False
    lock.release()
    lock.close()
    assert any("termux-wake-lock not found on PATH" in r.getMessage() for r in caplog.records)
