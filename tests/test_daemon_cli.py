"""Pieces of `pocketd run` and the client CLI that need no daemon: log format, status text."""

from __future__ import annotations

import pocketd.daemon.cli  # noqa: F401  (first: it registers the command modules)
from pocketd.daemon.cli_daemon import under_supervisor
from pocketd.daemon.statusfmt import duration, format_status, headline


def test_supervisor_detection() -> None:
    assert under_supervisor({"INVOCATION_ID": "abc"}, parent_name="bash")
    assert under_supervisor({"NOTIFY_SOCKET": "/run/x"}, parent_name="bash")
    assert under_supervisor({}, parent_name="runsv")
    assert not under_supervisor({}, parent_name="bash")


def test_headlines() -> None:
    assert headline({"state": "idle"}) == "idle"
    assert headline({"state": "waiting", "reasons": ["not charging", "load 2.10 > 1.50"]}) == \
        "waiting: not charging; load 2.10 > 1.50"
    training = {"state": "training", "training": {"phase": "training", "step": 12, "loss": 3.2111,
                                                  "s_per_step": 1.8, "rss_mb": 640.4, "eta_s": 240}}
    assert headline(training) == "training: step 12, loss 3.21, 1.8 s/step, RSS 640 MiB, ETA 4 min"
    loading = {"state": "training", "training": {"phase": "loading", "session_id": 3}}
    assert headline(loading) == "training: loading (session 3)"
    stopping = {"state": "training", "training": {"phase": "training", "step": 5, "stopping": "charger unplugged"}}
    assert headline(stopping) == "training: stopping (charger unplugged), step 5"


def test_durations() -> None:
    assert [duration(x) for x in (None, 5, 119, 3600 * 2 + 180)] == ["?", "5 s", "2 min", "2 h 3 min"]


def test_full_status_text() -> None:
    reply = {
        "state": "waiting", "paused": True, "reasons": ["paused"],
        "data": {"documents": 3, "examples": 9, "untrained_examples": 4},
        "checkpoint": {"id": 2, "method": "side", "steps": 150, "val_loss": 3.02},
        "last_session": {"id": 5, "started_at": "2025-01-01T10:00:00+00:00", "ended_at": "2025-01-01T10:30:00+00:00",
                         "end_reason": "stopped: charger unplugged", "steps": 35, "loss_first": 3.4,
                         "loss_last": 3.2, "promoted": False},
        "readings": {"now": "2025-01-01T11:00:00+00:00", "load1": 0.42, "available_mb": 2048.0,
                     "power": {"on_power": True, "percent": 80.0, "temperature_c": 31.0, "status": "CHARGING",
                               "has_battery": True}},
        "backoff": {"failures": 0, "remaining_s": 0},
        "away": {"active": None},
        "daemon": {"pid": 1, "uptime_s": 7200, "rss_mb": 45.2, "version": "0.1.0"},
    }
    text = format_status(reply)
    assert text.splitlines()[0] == "waiting: paused"
    assert "data: 3 documents, 9 examples, 4 untrained" in text
    assert "checkpoint: #2 (side), 150 steps, val loss 3.02" in text
    assert "last session: #5 2025-01-01 " in text and ", 35 steps\n  stopped: charger unplugged\n" in text
    assert "\n  loss 3.40 -> 3.20, not promoted\n" in text
    assert "device: on power (CHARGING, 80%, 31.0 °C)\n  load 0.42, 2048 MiB available, read 2025-01-01 " in text
    assert "daemon: pid 1, up 2 h 0 min, RSS 45 MiB" in text
