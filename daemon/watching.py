"""The `watch` command's stream: the status now, then a line on every change, and heartbeats.

A `StatusWatch` waits on the daemon's ChangeFeed (no polling of the status): when the daemon bumps
the feed it recomputes the status and sends it if it differs from the last line sent, ignoring the
figures that move on their own (uptime, the daemon's RSS, elapsed and remaining seconds, the time of
the last reading). After `heartbeat_s` seconds without a line it sends a heartbeat, so a client can
tell a quiet daemon from a dead connection.

Lines (each also carries the request's `id`, if it had one):
    {"ok": true, "event": "status", ...the `status` reply's fields}
    {"ok": true, "event": "heartbeat", "at": "<UTC time>"}
    {"ok": false, "error": {...}}  (the status could not be computed: the stream ends)

What bounds the latency: a pause, resume, signal, ingest, decision or session start/end bumps the
feed at once; training progress reaches the daemon when its `supervise` job reads the trainer's
status file (every `supervise_interval_s`, 2 s by default), so a new step shows within that
interval plus the step's own duration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from pocketd.store import StoreError

from .changes import ChangeFeed
from .protocol import ErrorCode, Stream, error_reply

log = logging.getLogger(__name__)

MAX_WATCHERS = 8  # concurrent `watch` streams; one more gets `busy`
TICK_S = 1.0  # how often the stream lets the server check the client and its own shutdown

# Fields that change without anything happening: not a change by themselves.
_VOLATILE: dict[str, tuple[str, ...]] = {
    "daemon": ("uptime_s", "rss_mb"),
    "training": ("elapsed_s", "eta_s"),
    "backoff": ("remaining_s",),
    "readings": ("now",),
}
_IGNORED = ("debug",)


def change_key(status: dict[str, Any]) -> dict[str, Any]:
    """The part of a status reply whose change is worth a line."""
    key = {k: v for k, v in status.items() if k not in _IGNORED}
    for section, fields in _VOLATILE.items():
        part = key.get(section)
        if isinstance(part, dict):
            key[section] = {k: v for k, v in part.items() if k not in fields}
    return key


def status_line(status: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "event": "status", **{k: v for k, v in status.items() if k != "ok"}}


class StatusWatch:
    """One `watch` stream. Construct it (the first status is computed here, so a failure is an ordinary
    error reply), hand `stream()` to the server; `close()` releases its slot (`on_close`) once."""

    def __init__(self, status: Callable[[], dict[str, Any]], feed: ChangeFeed, heartbeat_s: float,
                 on_close: Callable[[], None] = lambda: None, tick_s: float = TICK_S) -> None:
        self._status = status
        self._feed = feed
        self.heartbeat_s = heartbeat_s
        self._tick_s = tick_s
        self._on_close = on_close
        self._closed = False
        self._close_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._seen = feed.version  # taken before the first status: a change while computing it is not lost
        self._first = status()
        self._last_key = change_key(self._first)

    def stream(self) -> Stream:
        return Stream(first=status_line(self._first), lines=self._lines(), close=self.close, cancel=self.cancel)

    def cancel(self) -> None:
        """End the stream soon (from any thread): its wait wakes at once."""
        self._cancelled.set()
        self._feed.wake()

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._cancelled.set()
        self._on_close()

    def _lines(self) -> Iterator[dict[str, Any] | None]:
        last_sent = time.monotonic()
        while not self._cancelled.is_set():
            wait = min(self._tick_s, max(0.0, last_sent + self.heartbeat_s - time.monotonic()))
            version = self._feed.wait(self._seen, wait, self._cancelled)
            if self._cancelled.is_set():
                return
            line: dict[str, Any] | None = None
            if version != self._seen:
                self._seen = version
                try:
                    status = self._status()
                except StoreError as e:
                    yield error_reply(ErrorCode.STORE_ERROR, str(e))
                    return
                except Exception as e:  # a bug: logged, the stream ends with an error line, the daemon goes on
                    log.exception("watch: cannot compute the status")
                    yield error_reply(ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
                    return
                key = change_key(status)
                if key != self._last_key:
                    self._last_key = key
                    line = status_line(status)
            if line is None and time.monotonic() - last_sent >= self.heartbeat_s:
                line = {"ok": True, "event": "heartbeat", "at": datetime.now(timezone.utc).isoformat()}
            if line is not None:
                last_sent = time.monotonic()
            yield line
