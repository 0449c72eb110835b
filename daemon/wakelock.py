"""A Termux wake lock held only while a session trains (`[daemon] wake_lock`).

`termux-wake-lock` when a session starts, `termux-wake-unlock` when it ends, however it ended
(finished, stopped, crashed, killed by the system, or the daemon shutting down). Both are
Termux:API commands that hang without the Termux:API app, so they run with a timeout
(`probes_power.run_bounded`) on a worker thread of their own, in order: the daemon never waits
for them. A marker file (0600) says a lock may be held, so a daemon that starts after one that
died holding it releases it. Failures are logged through a `FailureLog` (no flood).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum
from pathlib import Path

from pocketd.store import make_private_dir, touch_private

from .probes_power import DEFAULT_TIMEOUT_S, BoundedRun, FailureLog, run_bounded
from .settings import WakeLockMode

log = logging.getLogger(__name__)

__all__ = ["WakeLock", "WakeCommand", "wake_lock_enabled"]

Runner = Callable[..., BoundedRun]


class WakeCommand(str, Enum):
    LOCK = "termux-wake-lock"
    UNLOCK = "termux-wake-unlock"


def wake_lock_enabled(mode: WakeLockMode, env: Mapping[str, str] | None = None) -> bool:
    """`on`/`off` as set; `auto`: on when `termux-wake-lock` is on PATH (Termux with termux-api)."""
    if mode is WakeLockMode.AUTO:
        env = os.environ if env is None else env
        return shutil.which(WakeCommand.LOCK.value, path=env.get("PATH")) is not None
    return mode is WakeLockMode.ON


class WakeLock:
    """`acquire()` at a session's start, `release()` at its end; both return at once. Thread-safe."""

    def __init__(self, *, enabled: bool, marker: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
                 env: Mapping[str, str] | None = None, runner: Runner = run_bounded) -> None:
        self.enabled = enabled
        self.marker = marker
        self.timeout_s = timeout_s
        self.env = env
        self._runner = runner
        self._failures = FailureLog("termux wake lock")
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future[bool] | None = None

    def acquire(self) -> None:
        if self.enabled:
            self._submit(WakeCommand.LOCK)

    def release(self) -> None:
        if self.enabled:
            self._submit(WakeCommand.UNLOCK)

    def release_leftover(self) -> None:
        """At start: release a lock a previous daemon took and did not release (it died)."""
        if self.marker.exists():
            log.info("releasing the wake lock a previous pocketd left held")
            self._submit(WakeCommand.UNLOCK)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the commands queued so far; whether the last one worked (True when none ran)."""
        last = self._last
        if last is None:
            return True
        try:
            return last.result(timeout=timeout_s)
        except Exception:  # TimeoutError, or the worker raised (logged there)
            return False

    def close(self) -> None:
        """Run the queued commands (each bounded by its timeout), then stop the worker."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _submit(self, command: WakeCommand) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketd-wakelock")
        self._last = self._executor.submit(self._run, command)

    def _run(self, command: WakeCommand) -> bool:
        try:
            if command is WakeCommand.LOCK:  # first: a daemon killed during the call still leaves the marker
                make_private_dir(self.marker.parent)
                touch_private(self.marker)
            result = self._runner(command.value, timeout_s=self.timeout_s, env=self.env)
            if result.failure is not None:
                self._failures.failed(f"{command.value} {result.failure}{result.hint}")
                return False
            self._failures.succeeded()
            if command is WakeCommand.UNLOCK:
                self.marker.unlink(missing_ok=True)
            log.info("%s: done", command.value)
            return True
        except Exception:
            log.exception("%s failed", command.value)
            return False
