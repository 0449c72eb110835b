"""Notifications to the user (`[daemon] notifications`, opt-in); `notify.py` is for the service manager.

Sent when a session ends (steps, validation change, promoted or not) and once when training has
been blocked for `notify_blocked_after_minutes` while there is data to train on. Through
`termux-notification` in Termux, else `notify-send` when installed, else nothing (said once in
the log). The command runs with a timeout (`probes_power.run_bounded`) on a worker thread of
its own; `send` only queues, and drops a message when `MAX_PENDING` are already waiting, so a
hanging command never blocks the daemon.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

from .probes_power import DEFAULT_TIMEOUT_S, BoundedRun, FailureLog, run_bounded
from .supervisor import FinishedSession, Outcome

log = logging.getLogger(__name__)

__all__ = ["NotifierKind", "detect_notifier", "UserNotifier", "Message", "session_message", "BlockedWatch"]

MAX_PENDING = 8
MAX_TEXT = 400  # characters of the notification body
Runner = Callable[..., BoundedRun]


class NotifierKind(str, Enum):
    TERMUX = "termux-notification"
    NOTIFY_SEND = "notify-send"
    NONE = "none"


class Topic(str, Enum):
    """One notification per topic: a new one replaces the previous (termux-notification --id)."""

    SESSION = "session"
    BLOCKED = "blocked"


@dataclass(frozen=True)
class Message:
    topic: Topic
    title: str
    text: str


def detect_notifier(env: Mapping[str, str] | None = None) -> NotifierKind:
    env = os.environ if env is None else env
    for kind in (NotifierKind.TERMUX, NotifierKind.NOTIFY_SEND):
        if shutil.which(kind.value, path=env.get("PATH")) is not None:
            return kind
    return NotifierKind.NONE


def _argv(kind: NotifierKind, message: Message) -> list[str]:
    text = message.text if len(message.text) <= MAX_TEXT else message.text[:MAX_TEXT - 3] + "..."
    if kind is NotifierKind.TERMUX:
        return ["--id", f"pocketd-{message.topic.value}", "--group", "pocketd", "--priority", "low",
                "--title", message.title, "--content", text]
    return ["--app-name=pocketd", message.title, text]


class UserNotifier:
    """Queues notifications for a worker thread; `send` never blocks. Thread-safe."""

    def __init__(self, *, enabled: bool, kind: NotifierKind | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 env: Mapping[str, str] | None = None, runner: Runner = run_bounded) -> None:
        self.kind = (kind or detect_notifier(env)) if enabled else NotifierKind.NONE
        self.enabled = enabled
        self.timeout_s = timeout_s
        self.env = env
        self._runner = runner
        self._failures = FailureLog("user notification")
        self._lock = threading.Lock()
        self._pending = 0
        self._executor: ThreadPoolExecutor | None = None
        if enabled and self.kind is NotifierKind.NONE:
            log.warning("notifications are on but neither termux-notification nor notify-send is installed")

    def send(self, message: Message) -> bool:
        """Queue `message`; False when notifications are off, unavailable, or too many are waiting."""
        if self.kind is NotifierKind.NONE:
            return False
        with self._lock:
            if self._pending >= MAX_PENDING:
                log.warning("dropping a notification (%d still waiting): %s", self._pending, message.title)
                return False
            self._pending += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketd-notify")
            self._executor.submit(self._run, message)
        return True

    def close(self, wait: bool = False) -> None:
        """Stop the worker; queued messages are dropped unless `wait` (the one being sent finishes)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=not wait)

    def _run(self, message: Message) -> None:
        try:
            result = self._runner(self.kind.value, *_argv(self.kind, message), timeout_s=self.timeout_s, env=self.env)
            if result.failure is None:
                self._failures.succeeded()
            else:
                self._failures.failed(f"{self.kind.value} {result.failure}{result.hint}")
        except Exception:
            log.exception("cannot send a notification")
        finally:
            with self._lock:
                self._pending -= 1


_TITLES = {
    Outcome.FINISHED: "finished", Outcome.STOPPED: "stopped", Outcome.KILLED: "stopped (killed)",
    Outcome.FAILED: "failed", Outcome.KILLED_BY_SYSTEM: "killed by the system",
}


def session_message(finished: FinishedSession) -> Message:
    """"pocketd: session 12 finished" / "120 steps, validation loss 3.52 -> 3.41, promoted. <why it ended>"."""
    st = finished.status
    parts = [f"{st.step if st else 0} steps"]
    if st is not None and st.val_loss is not None:
        before = f"{st.parent_val_loss:.3f} -> " if st.parent_val_loss is not None else ""
        parts.append(f"validation loss {before}{st.val_loss:.3f}")
    if st is not None and st.promoted is not None:
        parts.append("promoted" if st.promoted else "not promoted (kept the previous checkpoint)")
    text = ", ".join(parts) + f". {finished.end_reason}"
    return Message(Topic.SESSION, f"pocketd: session {finished.session_id} {_TITLES[finished.outcome]}", text)


class BlockedWatch:
    """Says once when training has been blocked for `after_s` (monotonic seconds); again only after it
    was unblocked. `update` is pure apart from its own state; the daemon calls it under its lock."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._since: float | None = None
        self._told = False

    def update(self, blocked: bool, reasons: list[str], now: float) -> Message | None:
        if not blocked:
            self._since = None
            self._told = False
            return None
        if self._since is None:
            self._since = now
        if self._told or now - self._since < self.after_s:
            return None
        self._told = True
        hours = (now - self._since) / 3600
        span = f"{hours:.1f} h" if hours >= 1 else f"{(now - self._since) / 60:.0f} min"
        return Message(Topic.BLOCKED, f"pocketd: training blocked for {span}", "; ".join(reasons) or "?")
