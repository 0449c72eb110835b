"""Issue 15: opt-in notifications (termux-notification, else notify-send) when a session ends and once
when training stays blocked; never blocking the daemon."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketd.daemon.supervisor import FinishedSession, Outcome, Trigger
from pocketd.daemon.usernotify import (
    MAX_PENDING,
    BlockedWatch,
    Message,
    NotifierKind,
    Topic,
    UserNotifier,
    detect_notifier,
    session_message,
)
from pocketd.trainer.job import SessionStatus

from .daemon_helpers import DaemonFactory, add_examples, set_power, wait_for
from .test_wakelock import FakeTermuxApi


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTermuxApi:
    return FakeTermuxApi(tmp_path, monkeypatch)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def _notifications(api: FakeTermuxApi) -> list[str]:
    return [c for c in api.recorded() if c.startswith("termux-notification")]


def test_a_finished_session_is_notified(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons("--steps", "3", daemon={"notifications": True, "wake_lock": "off"}, policy={"cooldown_minutes": 60},
                start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    (line,) = wait_for(lambda: _notifications(api), what="the notification")
    print(line)
    assert line == ("termux-notification --id pocketd-session --group pocketd --priority low "
                    "--title pocketd: session 1 finished --content 3 steps, validation loss 3.500, promoted. budget")


def test_blocked_too_long_is_notified_once_with_the_reason(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons(daemon={"notifications": True}, start=False)  # the fake charger is unplugged
    d.blocked_watch = BlockedWatch(0.0)  # the configured minimum is a minute; the wiring is what is tested here
    add_examples(d.config)
    d.start()
    (line,) = wait_for(lambda: _notifications(api), what="the blocked notification")
    assert "--title pocketd: training blocked for 0 min --content not charging" in line
    d.check_policy()
    d.check_policy()
    time.sleep(0.3)
    assert len(_notifications(api)) == 1  # once, not at every check


def test_no_data_or_paused_is_not_blocked(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons(daemon={"notifications": True}, start=False)
    d.blocked_watch = BlockedWatch(0.0)
    d.start()
    d.check_policy()  # nothing to train on: waiting is normal
    add_examples(d.config)
    d.set_paused(True)
    d.check_policy()  # the user's choice
    time.sleep(0.3)
    assert _notifications(api) == []


def test_off_by_default(daemons: DaemonFactory, api: FakeTermuxApi) -> None:
    d = daemons("--steps", "2", policy={"cooldown_minutes": 60}, start=False)
    assert d.config.daemon.notifications is False
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: d.snapshot().state.value != "training" and d.store_summary().last_session, what="a session")
    d.shutdown()
    assert _notifications(api) == []


def test_blocked_watch_with_an_injected_clock() -> None:
    w = BlockedWatch(3600)
    assert w.update(True, ["not charging"], 0.0) is None
    assert w.update(True, ["not charging"], 3599.0) is None
    msg = w.update(True, ["not charging", "load 3.00 > 1.50"], 7200.0)
    assert msg == Message(Topic.BLOCKED, "pocketd: training blocked for 2.0 h", "not charging; load 3.00 > 1.50")
    assert w.update(True, ["not charging"], 9000.0) is None  # once
    assert w.update(False, [], 9001.0) is None
    assert w.update(True, ["not charging"], 9002.0) is None  # a new stretch starts counting again
    assert w.update(True, ["not charging"], 9002.0 + 3600) is not None


def _finished(outcome: Outcome, status: SessionStatus | None, reason: str) -> FinishedSession:
    return FinishedSession(session_id=4, trigger=Trigger.POLICY, outcome=outcome, exit_status=0, end_reason=reason,
                           status=status, peak_rss_mb=None, duration_s=60)


def test_session_messages() -> None:
    st = SessionStatus(phase="done", step=120, val_loss=3.41, parent_val_loss=3.52, promoted=False)
    assert session_message(_finished(Outcome.FINISHED, st, "budget")) == Message(
        Topic.SESSION, "pocketd: session 4 finished",
        "120 steps, validation loss 3.520 -> 3.410, not promoted (kept the previous checkpoint). budget")
    killed = session_message(_finished(Outcome.KILLED_BY_SYSTEM, None, "killed by the system (SIGKILL, ...)"))
    assert killed.title == "pocketd: session 4 killed by the system" and killed.text.startswith("0 steps. killed")


def test_detection_prefers_termux_then_notify_send(tmp_path: Path) -> None:
    both, send_only, none = (tmp_path / n for n in ("both", "send", "none"))
    for folder, names in ((both, ("termux-notification", "notify-send")), (send_only, ("notify-send",)), (none, ())):
        folder.mkdir()
        for name in names:
            (folder / name).write_text("#!/bin/sh\n")
            (folder / name).chmod(0o700)
    assert detect_notifier({"PATH": str(both)}) is NotifierKind.TERMUX
    assert detect_notifier({"PATH": str(send_only)}) is NotifierKind.NOTIFY_SEND
    assert detect_notifier({"PATH": str(none)}) is NotifierKind.NONE


def test_notify_send_arguments(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    (tmp_path / "notify-send").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a" >> "{calls}"; done\n')
    (tmp_path / "notify-send").chmod(0o700)
    n = UserNotifier(enabled=True, env={"PATH": str(tmp_path)})
    assert n.kind is NotifierKind.NOTIFY_SEND
    assert n.send(Message(Topic.SESSION, "pocketd: session 1 finished", "3 steps"))
    n.close(wait=True)
    assert calls.read_text().splitlines() == ["--app-name=pocketd", "pocketd: session 1 finished", "3 steps"]


def test_a_hanging_notifier_never_blocks_and_drops_the_excess(tmp_path: Path) -> None:
    (tmp_path / "termux-notification").write_text("#!/bin/sh\nsleep 100\n")
    (tmp_path / "termux-notification").chmod(0o700)
    n = UserNotifier(enabled=True, env={"PATH": str(tmp_path)}, timeout_s=0.5)
    t0 = time.monotonic()
    sent = [n.send(Message(Topic.SESSION, f"t{i}", "x")) for i in range(MAX_PENDING + 3)]
    assert time.monotonic() - t0 < 0.5
    assert sent.count(True) == MAX_PENDING and sent[-1] is False
    t0 = time.monotonic()
    n.close()  # drops the queued ones; the running one ends at its timeout
    assert time.monotonic() - t0 < 3


def test_disabled_sends_nothing(tmp_path: Path) -> None:
    n = UserNotifier(enabled=False, env={"PATH": str(tmp_path)})
    assert n.kind is NotifierKind.NONE and n.send(Message(Topic.SESSION, "t", "x")) is False
