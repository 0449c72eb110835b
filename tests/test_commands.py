"""Every control command's happy path, over the socket, against an in-process Daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketd.daemon.client import Client, DaemonError, request
from pocketd.daemon.protocol import Command
from pocketd.daemon.statusfmt import format_history, format_status, headline

from .daemon_helpers import DaemonFactory, add_examples, set_power, wait_for


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def ask(d, cmd: str, **args):
    return request(d.socket_path, cmd, **args)


def test_status_while_waiting(daemons: DaemonFactory) -> None:
    d = daemons()
    wait_for(lambda: ask(d, "status")["state"] == "waiting", what="a decision")
    st = ask(d, "status")
    assert st["ok"] and st["paused"] is False and st["training"] is None
    assert "not charging" in st["reasons"] and any(r.startswith("no new examples") for r in st["reasons"])
    assert st["data"] == {"documents": 0, "examples": 0, "untrained_examples": 0}
    assert st["checkpoint"] is None and st["last_session"] is None
    assert st["readings"]["power"]["on_power"] is False and st["readings"]["power"]["source"] == "fake"
    assert st["daemon"]["pid"] > 0 and st["daemon"]["rss_mb"] > 0 and st["daemon"]["uptime_s"] >= 0
    assert isinstance(st["debug"]["torch_loaded"], bool)  # in process, other tests may have loaded torch
    assert headline(st).startswith("waiting: not charging; no new examples")
    assert "data: 0 documents" in format_status(st)


def test_training_status_stop_training_and_history(daemons: DaemonFactory) -> None:
    d = daemons("--step-s", "0.05", policy={"cooldown_minutes": 10}, start=False)
    add_examples(d.config, 2)
    set_power(daemons.power, True)
    d.start()
    st = wait_for(lambda: (r := ask(d, "status"))["state"] == "training" and r["training"]["step"] >= 2 and r,
                  what="training status")
    t = st["training"]
    assert t["trigger"] == "policy" and t["phase"] == "training" and t["loss"] > 0 and t["s_per_step"] == 0.05
    assert t["eta_s"] > 0 and t["checkpoint_id"] == 7 and t["pid"] == d.supervisor.running.pid
    line = headline(st)
    assert line.startswith("training: step ") and "loss " in line and "s/step" in line and "ETA" in line
    reply = ask(d, "stop-training")
    assert reply["stopping"] is True and reply["session_id"] == t["session_id"]
    wait_for(lambda: ask(d, "status")["training"] is None, what="the stop")
    wait_for(lambda: any(r.startswith("cooldown: ") for r in ask(d, "status")["reasons"]),
             what="the policy to wait for the cooldown before the next session")
    with pytest.raises(DaemonError) as info:
        ask(d, "stop-training")
    assert info.value.code == "conflict"
    hist = ask(d, "history", sessions=5, events=50)
    assert hist["sessions"][0]["end_reason"] == "stopped: stop-training requested"
    assert any(e["kind"] == "decision" for e in hist["events"])
    assert "stopped: stop-training requested" in format_history(hist)
    assert ask(d, "status")["last_session"]["id"] == t["session_id"]


def test_pause_resume(daemons: DaemonFactory) -> None:
    d = daemons("--step-s", "0.05", start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: d.supervisor.running, what="training")
    assert ask(d, "pause") == {"ok": True, "paused": True, "changed": True}
    assert ask(d, "pause")["changed"] is False
    wait_for(lambda: d.supervisor.running is None, what="pause to stop the session")
    st = ask(d, "status")
    assert st["paused"] is True and st["state"] == "waiting" and st["reasons"] == ["paused"]
    assert (d.config.paths.state_dir / "paused").exists()  # survives a restart
    assert ask(d, "resume") == {"ok": True, "paused": False, "changed": True}
    wait_for(lambda: d.supervisor.running, what="training again after resume")


def test_train_now_ignores_the_charger(daemons: DaemonFactory) -> None:
    d = daemons("--step-s", "0.05", start=False)
    add_examples(d.config)
    d.start()  # unplugged
    reply = ask(d, "train-now")
    assert reply["ok"] and reply["state"] == "training"
    wait_for(lambda: (s := d.supervisor.status()) and s.step >= 5, what="steps while unplugged")
    assert d.supervisor.running is not None and d.supervisor.running.stop_reason is None
    with pytest.raises(DaemonError) as info:
        ask(d, "train-now")
    assert info.value.code == "conflict"
    ask(d, "stop-training")
    wait_for(lambda: d.supervisor.running is None, what="the stop")
    with d.guarded_store() as s:
        assert s.history.sessions()[0].trigger == "train-now"


def test_train_now_refused_without_memory(daemons: DaemonFactory) -> None:
    d = daemons(policy={"min_available_mb": 10_000_000})
    with pytest.raises(DaemonError) as info:
        ask(d, "train-now")
    assert info.value.code == "refused" and "MiB available" in str(info.value)


def test_ingest(daemons: DaemonFactory) -> None:
    d = daemons()
    reply = ask(d, "ingest", text="Dear diary, today I wrote a test.\n\nIt passed.", source="tasker")
    assert reply["ok"] and reply["report"]["added"][0]["n_examples"] >= 1
    again = ask(d, "ingest", text="Dear diary, today I wrote a test.\n\nIt passed.", source="tasker")
    assert again["report"]["duplicates"] and not again["report"]["added"]
    with pytest.raises(DaemonError) as info:
        ask(d, "ingest", text="   \n  ")
    assert info.value.code == "ingest_failed"
    assert ask(d, "status")["data"]["documents"] == 1


def test_forget(daemons: DaemonFactory) -> None:
    """`forget` stops a running session first, replies with the report, and training resumes afterwards."""
    d = daemons("--step-s", "0.05", start=False)
    d.start()
    for text, source in [("a note from the share sheet", "tasker"), ("another one", "tasker"), ("kept", "phone")]:
        ask(d, "ingest", text=text, source=source)
    set_power(daemons.power, True)
    session = wait_for(lambda: d.supervisor.running, what="training").session_id
    reply = ask(d, "forget", sources=["tasker"])
    assert reply["ok"] and [x["source"] for x in reply["documents"]] == ["tasker", "tasker"]
    assert reply["session"]["effect"] == "stopped" and reply["session"]["session_id"] == session
    assert reply["summary"].startswith("forgot 2 documents") and reply["hashes"] == "not needed"
    assert ask(d, "status")["data"]["documents"] == 1
    assert ask(d, "history", sessions=5, events=0)["sessions"][-1]["end_reason"] == "stopped: forget requested"
    wait_for(lambda: (r := d.supervisor.running) and r.session_id != session, what="training to start again")
    for args, code in (({"documents": ["99"]}, "not_found"), ({"sources": ["nowhere"]}, "not_found"),
                       ({}, "bad_args"), ({"documents": [""]}, "bad_args"), ({"sources": "tasker"}, "bad_args")):
        with pytest.raises(DaemonError) as info:
            ask(d, "forget", **args)
        assert info.value.code == code, args
    assert ask(d, "status")["data"]["documents"] == 1


def test_signal(daemons: DaemonFactory) -> None:
    d = daemons()
    reply = ask(d, "signal", away=True, expires_in_s=600)
    assert reply["away"] is True and reply["expires_at"]
    st = ask(d, "status")
    assert st["away"]["active"] is True
    assert ask(d, "signal", away=False)["expires_at"] is None
    assert ask(d, "status")["away"]["active"] is False
    with d.guarded_store() as s:
        assert [e.message for e in s.history.events(kind="signal")][:2] == ["user back", "user away for 600 s"]


def test_user_back_stops_a_policy_session(daemons: DaemonFactory) -> None:
    d = daemons("--step-s", "0.05", start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: d.supervisor.running, what="training")
    ask(d, "signal", away=False)
    wait_for(lambda: d.supervisor.running is None, what="the stop")
    with d.guarded_store() as s:
        assert s.history.sessions()[0].end_reason == "stopped: user back (signal)"


def test_shutdown(daemons: DaemonFactory) -> None:
    d = daemons()
    assert ask(d, "shutdown") == {"ok": True, "stopping": True}
    assert d.stopping
    d.shutdown()
    assert not d.socket_path.exists()


def test_every_command_has_a_test_here() -> None:
    source = Path(__file__).read_text()
    for cmd in Command:
        assert f'"{cmd.value}"' in source


def test_one_connection_many_commands(daemons: DaemonFactory) -> None:
    d = daemons()
    with Client(d.socket_path) as c:
        for _ in range(20):
            assert c.request("status")["ok"]
        assert c.request("history")["ok"]


def test_version(daemons: DaemonFactory) -> None:
    from pocketd.daemon.protocol import PROTOCOL_VERSION

    d = daemons()
    reply = ask(d, "version")
    assert reply["protocol"] == PROTOCOL_VERSION and reply["pocketd"] == ask(d, "status")["daemon"]["version"]
    commands = {c["name"]: c for c in reply["commands"]}
    assert set(commands) == {c.value for c in Command}
    assert commands["watch"]["streams"] is True and commands["status"]["streams"] is False
    history = commands["history"]["arguments"]
    assert history["properties"]["sessions"]["maximum"] == 1000 and history["additionalProperties"] is False
    assert commands["signal"]["arguments"]["required"] == ["away"]
    assert commands["status"]["arguments"]["properties"] == {}
    assert all(c["description"] for c in commands.values())


def test_watch(daemons: DaemonFactory) -> None:
    """`watch` streams the status, a line per change (here: pause, from another connection)."""
    from pocketd.daemon.watching import MAX_WATCHERS

    d = daemons(policy={"check_interval_s": 3600})  # no policy checks to bump the feed meanwhile
    with Client(d.socket_path, timeout_s=10) as watcher:
        lines = watcher.watch(heartbeat_s=60)
        first = next(lines)
        assert first["event"] == "status" and first["paused"] is False and first["daemon"]["pid"]
        assert ask(d, "pause")["changed"] is True
        line = next(lines)
        while not line.get("paused"):  # the daemon's first policy check may come first
            assert line["event"] in {"status", "heartbeat"}, line
            line = next(lines)  # each within the client's timeout, or ClientError
        assert line["event"] == "status" and line["reasons"] == ["paused"]
        # the cap: MAX_WATCHERS streams at once (this one included), the next is told busy
        others = [Client(d.socket_path, timeout_s=10) for _ in range(MAX_WATCHERS - 1)]
        streams = [c.watch() for c in others]  # kept: a dropped generator closes its connection
        try:
            for stream in streams:
                assert next(stream)["event"] == "status"
            with pytest.raises(DaemonError) as info:
                next(Client(d.socket_path, timeout_s=10).watch())
            assert info.value.code == "busy"
        finally:
            for c in others:
                c.close()
    # the clients left: their slots come back
    wait_for(lambda: d.server._streams == set(), what="the streams to end")
    with Client(d.socket_path, timeout_s=10) as again:
        assert next(again.watch())["event"] == "status"
