"""A change feed: a version counter and a condition, so that `watch` waits for changes instead of polling.

The Daemon calls `bump()` after anything that may change what `status` shows (pause, a signal, a
decision, a new reading, a supervise tick, a session's start or end, an ingest, ...). A bump is a
hint, not a diff: a watcher that wakes recomputes the status and sends a line only if it differs
from the last one it sent, so a bump too many costs one status computation and a bump too few
delays a line until the next one. Nothing here blocks a bumper: `bump()` takes a lock that is
only ever held for a few instructions.
"""

from __future__ import annotations

import threading
import time


class ChangeFeed:
    """A monotonically increasing version; `wait` blocks until it moves past what the caller saw."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._version = 0

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def bump(self) -> None:
        """Something may have changed: wake every waiter (callable from any thread, with any lock held)."""
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiter without a change (they re-check their own stop condition)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, seen: int, timeout_s: float, stop: threading.Event | None = None) -> int:
        """Block until the version differs from `seen`, `stop` is set (checked on every wake-up) or
        `timeout_s` passes; the version then (equal to `seen` on a timeout or a stop)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while self._version == seen and not (stop is not None and stop.is_set()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._version
