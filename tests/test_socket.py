"""The control socket: privacy, stale sockets, limits and bad clients (against a stub dispatcher)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pocketd.daemon.client import Client, ClientError, DaemonError, DaemonNotRunning, request
from pocketd.daemon.changes import ChangeFeed
from pocketd.daemon.protocol import Command, Request, Stream, ok_reply
from pocketd.daemon.server import AlreadyRunning, ControlServer, PeerCredentials, SocketError, peer_credentials
from pocketd.daemon.watching import StatusWatch


class Stub:
    """A dispatcher: `status` echoes, `history` returns a big reply, `pause` blocks until released,
    `watch` streams {"n": ...} on every `feed` bump that changes `n`."""

    def __init__(self) -> None:
        self.calls: list[Command] = []
        self.release = threading.Event()
        self.crash = False
        self.feed = ChangeFeed()
        self.n = 0
        self.watch_closed = threading.Event()

    def dispatch(self, request: Request) -> dict[str, Any] | Stream:
        self.calls.append(request.cmd)
        if self.crash:
            raise RuntimeError("handler bug")
        if request.cmd is Command.WATCH:
            return StatusWatch(lambda: {"ok": True, "n": self.n}, self.feed, request.args.heartbeat_s,
                               on_close=self.watch_closed.set, tick_s=0.05).stream()
        if request.cmd is Command.HISTORY:
            return ok_reply(blob="x" * (8 << 20))
        if request.cmd is Command.PAUSE:
            self.release.wait(5)
        return ok_reply(cmd=request.cmd)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "pocketd" / "pocketd.sock"


@pytest.fixture
def stub() -> Stub:
    return Stub()


@pytest.fixture
def server(sock_path: Path, stub: Stub) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, stub, max_request_bytes=1024, request_timeout_s=0.5, max_connections=4,
                        slot_wait_s=0.2)
    srv.start()
    yield srv
    stub.release.set()
    srv.close()


def raw(path: Path, data: bytes, *, close_write: bool = False) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        try:
            s.sendall(data)
        except BrokenPipeError:
            pass  # answered early (forbidden, busy) and closed
        if close_write:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return json.loads(buf.split(b"\n")[0])


def test_socket_and_directory_are_private(server: ControlServer, sock_path: Path) -> None:
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    assert request(sock_path, "status")["cmd"] == "status"


def test_an_existing_open_runtime_dir_is_tightened(tmp_path: Path, stub: Stub) -> None:
    d = tmp_path / "rt"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    srv = ControlServer(d / "pocketd.sock", stub)
    srv.start()
    try:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    finally:
        srv.close()


def test_a_configured_socket_in_an_open_dir_is_refused(tmp_path: Path, stub: Stub) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o755)
    with pytest.raises(SocketError, match="accessible to others"):
        ControlServer(d / "p.sock", stub, own_dir=False).bind()
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_several_requests_on_one_connection(server: ControlServer, sock_path: Path) -> None:
    with Client(sock_path) as c:
        assert c.request("status")["cmd"] == "status"
        assert c.request("resume")["cmd"] == "resume"
        assert c.raw({"cmd": "nope"})["error"]["code"] == "unknown_command"
        assert c.request("status")["ok"] is True


def test_last_request_without_newline_is_answered(server: ControlServer, sock_path: Path) -> None:
    assert raw(sock_path, b'{"cmd": "status"}', close_write=True)["ok"] is True


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"this is not json\n", "bad_json"),
        (b"[1,2,3]\n", "bad_request"),
        (b"null\n", "bad_request"),
        (b'{"cmd": "make-coffee"}\n', "unknown_command"),
        (b'{"cmd": "signal", "away": "sometimes"}\n', "bad_args"),
        (b'{"cmd": "history", "sessions": -1}\n', "bad_args"),
    ],
)
def test_bad_requests_get_error_replies(server: ControlServer, sock_path: Path, data: bytes, code: str) -> None:
    reply = raw(sock_path, data)
    assert reply["ok"] is False and reply["error"]["code"] == code and reply["error"]["message"]
    assert request(sock_path, "status")["ok"] is True  # and the server goes on


def test_handler_bug_is_an_internal_error_reply(server: ControlServer, sock_path: Path, stub: Stub) -> None:
    stub.crash = True
    reply = raw(sock_path, b'{"cmd": "status"}\n')
    assert reply["error"]["code"] == "internal" and "handler bug" in reply["error"]["message"]
    stub.crash = False
    assert request(sock_path, "status")["ok"]


def test_oversize_request_gets_too_large_then_close(server: ControlServer, sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        try:
            s.sendall(b'{"cmd": "ingest", "text": "' + b"a" * 4096)
        except OSError:
            pass
        data = s.recv(65536)
        assert json.loads(data)["error"]["code"] == "too_large"
        assert s.recv(65536) == b""  # closed
    # a long line that arrives with its newline at once
    assert raw(sock_path, b" " * 2000 + b'{"cmd": "status"}\n')["error"]["code"] == "too_large"
    assert request(sock_path, "status")["ok"]


def test_slow_client_times_out(server: ControlServer, sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        start = time.monotonic()
        for piece in (b'{"cmd"', b': "sta'):  # dribbles, never finishes within the 0.5 s deadline
            s.sendall(piece)
            time.sleep(0.3)
        data = s.recv(65536)
        assert json.loads(data)["error"]["code"] == "timeout"
        assert time.monotonic() - start < 3
    assert request(sock_path, "status")["ok"]


def test_an_idle_connection_stays_open_between_requests(server: ControlServer, sock_path: Path) -> None:
    # regression (issue 15): an idle connection was closed after request_timeout_s (an interactive
    # `socat` broke after 10 s); the deadline is per request, from its first byte
    with Client(sock_path, timeout_s=5) as c:
        assert c.request("status")["ok"]
        threading.Event().wait(3 * server.request_timeout_s)  # idle for longer than a request may take
        assert c.request("status")["ok"]
        assert c.request("resume")["cmd"] == "resume"


def test_close_ends_idle_connections_at_once(sock_path: Path, stub: Stub) -> None:
    srv = ControlServer(sock_path, stub)
    srv.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(b'{"cmd": "status"}\n')
        assert json.loads(s.recv(65536))["ok"]
        started = time.monotonic()
        srv.close(join_timeout_s=10)
        assert s.recv(100) == b""  # closed, no error reply
        assert time.monotonic() - started < 5  # not after a join timeout
    assert not srv._connections


def test_at_the_cap_the_longest_idle_connection_makes_room(sock_path: Path, stub: Stub) -> None:
    srv = ControlServer(sock_path, stub, max_connections=4, slot_wait_s=0.2, idle_evict_s=2.0)
    srv.start()
    idle = []
    try:
        for _ in range(4):  # every slot taken by an idle client
            c = Client(sock_path, timeout_s=5).connect()
            assert c.request("status")["ok"]
            idle.append(c)
        assert raw(sock_path, b'{"cmd": "status"}\n')["error"]["code"] == "busy"  # none idle long enough
        threading.Event().wait(2.1)  # now all four have been idle for idle_evict_s
        assert request(sock_path, "status")["ok"]  # served, not `busy`
        with pytest.raises(ClientError, match="closed the connection"):
            idle[0].request("status")  # the oldest was closed for it
        assert all(c.request("status")["ok"] for c in idle[1:])
    finally:
        for c in idle:
            c.close()
        srv.close()


@pytest.mark.parametrize("rid", ["abc", 7, -(2**53), "", "x" * 128])
def test_the_request_id_is_echoed(server: ControlServer, sock_path: Path, rid: object) -> None:
    with Client(sock_path) as c:
        assert c.raw({"cmd": "status", "id": rid}) == {"ok": True, "id": rid, "cmd": "status"}
        error = c.raw({"cmd": "nope", "id": rid})
        assert error["id"] == rid and error["error"]["code"] == "unknown_command"
        assert c.raw({"cmd": "signal", "away": "x", "id": rid})["id"] == rid
        assert "id" not in c.raw({"cmd": "status"}) and "id" not in c.raw({"cmd": "status", "id": None})


@pytest.mark.parametrize("rid", [1.5, True, [1], {"a": 1}, "x" * 129, 2**53 + 1])
def test_a_bad_request_id_is_refused(server: ControlServer, sock_path: Path, rid: object) -> None:
    reply = raw(sock_path, json.dumps({"cmd": "status", "id": rid}).encode() + b"\n")
    assert reply["error"]["code"] == "bad_request" and '"id" must be' in reply["error"]["message"]
    assert "id" not in reply


def test_client_disconnecting_mid_request_and_mid_reply(server: ControlServer, sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock_path))
        s.sendall(b'{"cmd": "sta')  # and gone
    for _ in range(3):  # an 8 MiB reply, nobody reads it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            s.sendall(b'{"cmd": "history"}\n')
    assert request(sock_path, "status")["ok"]


def test_other_users_are_refused(sock_path: Path, stub: Stub) -> None:
    def someone_else(conn: socket.socket) -> PeerCredentials:
        real = peer_credentials(conn)
        assert real.uid == os.getuid() and real.pid == os.getpid()
        return PeerCredentials(real.pid, os.getuid() + 1, real.gid)

    srv = ControlServer(sock_path, stub, credentials=someone_else)
    srv.start()
    try:
        reply = raw(sock_path, b'{"cmd": "status"}\n')
        assert reply["error"]["code"] == "forbidden"
        assert stub.calls == []
    finally:
        srv.close()


def test_many_concurrent_clients_and_the_bound(server: ControlServer, sock_path: Path, stub: Stub) -> None:
    # 4 slots: 4 clients block inside `pause`; the 5th is told busy; they all finish once released
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(request(sock_path, "pause"))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert raw(sock_path, b'{"cmd": "status"}\n')["error"]["code"] == "busy"
    stub.release.set()
    for t in threads:
        t.join(5)
    assert len(results) == 4 and all(r["ok"] for r in results)


def test_many_concurrent_clients(tmp_path: Path, stub: Stub) -> None:
    path = tmp_path / "rt" / "pocketd.sock"
    srv = ControlServer(path, stub, max_connections=8)  # a burst of 64 clients queues for the 8 slots
    srv.start()
    try:
        replies: list[bool] = []

        def client() -> None:
            with Client(path) as c:
                for _ in range(5):
                    replies.append(c.raw({"cmd": "status"})["ok"])

        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert replies.count(True) == 64 * 5
    finally:
        srv.close()


def test_stale_socket_is_removed(sock_path: Path, stub: Stub) -> None:
    sock_path.parent.mkdir(parents=True, mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays, nothing listens: connect is refused
    assert sock_path.exists()
    with pytest.raises(DaemonNotRunning, match="stale socket"):
        request(sock_path, "status")
    srv = ControlServer(sock_path, stub)
    srv.start()
    try:
        assert request(sock_path, "status")["ok"]
    finally:
        srv.close()
    assert not sock_path.exists()


def test_live_daemon_is_not_displaced(server: ControlServer, sock_path: Path, stub: Stub) -> None:
    second = ControlServer(sock_path, stub)
    with pytest.raises(AlreadyRunning, match=r"pocketd is already running \(socket .*pocketd.sock\)"):
        second.bind()
    assert request(sock_path, "status")["ok"]  # the first one still answers


def test_live_daemon_detected_by_connect_without_lock(tmp_path: Path, stub: Stub) -> None:
    # a listener the lock does not know about (e.g. another lock dir): the connect probe still refuses
    path = tmp_path / "rt" / "pocketd.sock"
    path.parent.mkdir(mode=0o700)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen(1)
    try:
        with pytest.raises(AlreadyRunning):
            ControlServer(path, stub).bind()
        assert path.exists()
    finally:
        other.close()


def test_a_file_in_the_way_is_not_deleted(sock_path: Path, stub: Stub) -> None:
    sock_path.parent.mkdir(parents=True, mode=0o700)
    sock_path.write_text("precious")
    with pytest.raises(SocketError, match="not a socket"):
        ControlServer(sock_path, stub).bind()
    assert sock_path.read_text() == "precious"


def test_client_reports_not_running(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match=r"pocketd is not running \(no socket at .*\); start it with `pocketd run`"):
        request(tmp_path / "nothing" / "pocketd.sock", "status")


def test_error_reply_raises_daemon_error(server: ControlServer, sock_path: Path) -> None:
    with pytest.raises(DaemonError) as info:
        request(sock_path, "signal", away="maybe")
    assert info.value.code == "bad_args"


def test_close_removes_only_our_socket(sock_path: Path, stub: Stub) -> None:
    srv = ControlServer(sock_path, stub)
    srv.start()
    sock_path.unlink()  # someone replaced it
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(str(sock_path))
    try:
        srv.close()
        assert sock_path.exists()
    finally:
        impostor.close()


def test_long_socket_path(tmp_path: Path, stub: Stub) -> None:
    path = tmp_path / ("x" * 50) / ("y" * 50) / "pocketd.sock"
    assert len(str(path)) > 107
    srv = ControlServer(path, stub)
    srv.start()
    try:
        assert request(path, "status")["ok"]
    finally:
        srv.close()
    assert not path.exists()


def read_lines(s: socket.socket, n: int) -> list[dict[str, Any]]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        assert chunk, f"closed after {buf!r}"
        buf += chunk
    return [json.loads(x) for x in buf.split(b"\n")[:n]]


def test_a_stream_outlives_a_half_close_and_ends_with_the_client(server: ControlServer, sock_path: Path,
                                                                stub: Stub) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(b'{"cmd": "watch", "id": "w", "heartbeat_s": 1}\n')
        s.shutdown(socket.SHUT_WR)  # as `nc -N` does after its input: the watch goes on
        assert read_lines(s, 1) == [{"ok": True, "id": "w", "event": "status", "n": 0}]
        stub.n = 1
        stub.feed.bump()
        assert read_lines(s, 1) == [{"ok": True, "id": "w", "event": "status", "n": 1}]
        assert not stub.watch_closed.is_set()
    assert stub.watch_closed.wait(10)  # the client left: the stream was closed
    assert request(sock_path, "status")["ok"]


def test_close_ends_a_stream_at_once(sock_path: Path, stub: Stub) -> None:
    srv = ControlServer(sock_path, stub)
    srv.start()
    with Client(sock_path, timeout_s=10) as c:
        lines = c.watch(heartbeat_s=3600)
        assert next(lines)["event"] == "status"
        started = time.monotonic()
        srv.close(join_timeout_s=10)
        with pytest.raises(ClientError, match="closed the watch"):
            next(lines)
        assert time.monotonic() - started < 5
    assert stub.watch_closed.is_set()
