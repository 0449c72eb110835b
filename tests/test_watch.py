"""The `watch` stream (daemon.watching) and the change feed (daemon.changes), without a daemon."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pocketd.daemon.changes import ChangeFeed
from pocketd.daemon.watching import StatusWatch, change_key
from pocketd.store import StoreError


class FakeStatus:
    def __init__(self) -> None:
        self.value: dict[str, Any] = {"ok": True, "state": "idle", "paused": False,
                                      "daemon": {"pid": 1, "uptime_s": 1.0, "rss_mb": 40.0}, "debug": {"threads": 3}}
        self.calls = 0
        self.fail: Exception | None = None

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.value.items()}


def next_line(lines: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    """The next line the stream yields that is not None (None: the server's check-the-client tick)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = next(lines)
        if line is not None:
            return line  # type: ignore[no-any-return]
    raise AssertionError(f"no line within {timeout_s} s")


def test_the_feed_wakes_a_waiter_on_a_bump() -> None:
    feed = ChangeFeed()
    seen = feed.version
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(feed.wait(seen, 30)))
    t.start()
    feed.bump()
    t.join(10)
    assert got == [seen + 1]
    assert feed.wait(seen + 1, 0) == seen + 1  # nothing new: returns at the timeout
    stop = threading.Event()
    stop.set()
    assert feed.wait(seen + 1, 30, stop) == seen + 1  # a set stop returns at once


def test_first_line_then_a_line_per_change_only() -> None:
    status, feed = FakeStatus(), ChangeFeed()
    stream = StatusWatch(status, feed, heartbeat_s=3600, tick_s=0.05).stream()
    assert stream.first["event"] == "status" and stream.first["ok"] is True and stream.first["state"] == "idle"
    lines = stream.lines
    status.value["daemon"]["uptime_s"] = 99.0  # moves on its own: not a change
    status.value["debug"] = {"threads": 9}
    feed.bump()
    status.value["paused"] = True
    feed.bump()
    line = next_line(lines)
    assert line["event"] == "status" and line["paused"] is True and line["daemon"]["uptime_s"] == 99.0
    stream.close()


def test_a_heartbeat_after_quiet_seconds() -> None:
    status, feed = FakeStatus(), ChangeFeed()
    stream = StatusWatch(status, feed, heartbeat_s=0.2, tick_s=0.05).stream()
    line = next_line(stream.lines)
    assert line["event"] == "heartbeat" and line["ok"] is True and line["at"]
    assert status.calls == 1  # no status was computed for it: nothing was bumped


def test_cancel_ends_the_stream_and_close_releases_once() -> None:
    released: list[int] = []
    feed = ChangeFeed()
    watch = StatusWatch(FakeStatus(), feed, heartbeat_s=3600, on_close=lambda: released.append(1), tick_s=30)
    stream = watch.stream()
    ended = threading.Event()

    def consume() -> None:
        for _ in stream.lines:
            pass
        ended.set()

    threading.Thread(target=consume, daemon=True).start()
    stream.cancel()
    assert ended.wait(10)  # at once, not after the 30 s tick
    stream.close()
    stream.close()
    assert released == [1]


@pytest.mark.parametrize(("error", "code"), [(StoreError("database is locked"), "store_error"),
                                             (RuntimeError("bug"), "internal")])
def test_a_failing_status_ends_the_stream_with_an_error_line(error: Exception, code: str) -> None:
    status, feed = FakeStatus(), ChangeFeed()
    stream = StatusWatch(status, feed, heartbeat_s=3600, tick_s=0.05).stream()
    status.fail = error
    feed.bump()
    line = next_line(stream.lines)
    assert line["ok"] is False and line["error"]["code"] == code
    assert list(stream.lines) == []


def test_change_key_ignores_only_the_figures_that_move_on_their_own() -> None:
    a = {"ok": True, "state": "training", "training": {"step": 3, "elapsed_s": 1.0, "eta_s": 5.0},
         "readings": {"now": "t1", "load1": 0.5}, "backoff": {"failures": 0, "remaining_s": 0},
         "daemon": {"pid": 1, "uptime_s": 1}, "debug": {"threads": 2}}
    b = {**a, "training": {"step": 3, "elapsed_s": 2.0, "eta_s": 4.0}, "readings": {"now": "t2", "load1": 0.5},
         "daemon": {"pid": 1, "uptime_s": 2}, "debug": {"threads": 5}}
    assert change_key(a) == change_key(b)
    assert change_key(a) != change_key({**b, "training": {"step": 4, "elapsed_s": 2.0, "eta_s": 4.0}})
    assert change_key(a) != change_key({**b, "readings": {"now": "t2", "load1": 0.7}})
