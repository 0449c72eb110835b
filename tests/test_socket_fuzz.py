"""Fuzzing the control socket against a real in-process daemon (real command handlers, fake trainer).

Every test sends hostile or odd input (random bytes, truncated and oversized JSON, deep
nesting, wrong argument types for every command, unknown commands, unicode, pipelined
requests without a final newline, clients that leave mid-reply) and checks the contract:
each non-blank request line gets exactly one reply, a JSON object on one line with `ok`,
and on failure an `error` whose code is a known ErrorCode (never `internal`: that is a
bug). Afterwards the daemon still answers `status` and has logged no errors.

bench/socket_fuzz.py does the same at volume against a real `pocketd run` that trains.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketd.daemon.client import request
from pocketd.daemon.protocol import ARGS, Command, ErrorCode, unix_address
from pocketd.daemon.settings import PathsConfig

from .daemon_helpers import add_examples, fake_trainer_command, make_config, set_power, wait_for

MAX_REQUEST = 16 * 1024  # the daemon's request_max_bytes here (small, so fuzzing can cross it)
CODES = {c.value for c in ErrorCode}
REAL = [c.value for c in Command]
# valid `shutdown` would end the fixture daemon; `watch` streams until the client closes (its own tests)
UNSAFE = {Command.SHUTDOWN.value, Command.WATCH.value}
SAFE = [c for c in REAL if c not in UNSAFE]

# the fixtures are per test on purpose: one daemon takes every example, and must survive them all
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# -- the daemon under test ----------------------------------------------------------------------------


class _Errors(logging.Handler):
    """Collects the daemon's ERROR records (an `internal error` or a failed connection is a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from pocketd.daemon.service import Daemon

    root = tmp_path_factory.mktemp("fuzz")
    set_power(root / "power.json", True)  # plugged: the fake trainer runs while we fuzz
    config = make_config(root, daemon={"request_max_bytes": MAX_REQUEST, "request_timeout_s": 2.0})
    config.paths = PathsConfig(data_dir=root / "data", cache_dir=root / "cache", state_dir=root / "state",
                               runtime_dir=root / "run" / "pocketd")
    add_examples(config)
    errors = _Errors()
    logging.getLogger("pocketd.daemon").addHandler(errors)
    d = Daemon(config, trainer_command=fake_trainer_command("--step-s", "0.05"), supervise_interval_s=0.2)
    d.start()
    d.fuzz_errors = errors
    try:
        wait_for(lambda: d.supervisor.running, what="the fake trainer to start")
        yield d
    finally:
        logging.getLogger("pocketd.daemon").removeHandler(errors)
        d.shutdown()


@pytest.fixture
def sock(fuzz_daemon: Any) -> Iterator[Path]:
    fuzz_daemon.fuzz_errors.records.clear()
    yield fuzz_daemon.socket_path
    assert_alive(fuzz_daemon)


def assert_alive(d: Any) -> None:
    reply = request(d.socket_path, "status", timeout_s=10)
    assert reply["ok"] is True and reply["state"] in {"idle", "waiting", "training"}
    assert reply["daemon"]["pid"] > 0
    assert d.server._thread is not None and d.server._thread.is_alive()
    logged = [f"{r.name}: {r.getMessage()}" for r in d.fuzz_errors.records]
    assert not logged, logged


# -- talking raw bytes ---------------------------------------------------------------------------------


def exchange(path: Path, data: bytes, *, timeout: float = 15.0) -> bytes:
    """Send `data`, close our side, read everything the daemon says until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        with unix_address(path) as addr:
            s.connect(addr)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early (too_large) and closed
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return out
            out += chunk
        return out


def expected_replies(data: bytes) -> int:
    """How many replies `data` (sent whole, then EOF) must get: one per non-blank line."""
    return sum(1 for piece in data.split(b"\n") if piece.strip())


def check(raw: bytes, expected: int | None = None) -> list[dict[str, Any]]:
    """`raw` is a sequence of well-formed replies, each one JSON object per line; return them."""
    assert raw == b"" or raw.endswith(b"\n"), f"reply not newline-terminated: {raw[-200:]!r}"
    replies = []
    for line in raw.split(b"\n")[:-1]:
        reply = json.loads(line.decode("utf-8"))
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), line[:300]
        if not reply["ok"]:
            assert set(reply) - {"id"} == {"ok", "error"}, reply  # `id`: the request's, echoed
            error = reply["error"]
            assert isinstance(error, dict) and set(error) == {"code", "message"}, reply
            assert error["code"] in CODES and isinstance(error["message"], str) and error["message"], reply
            assert error["code"] != ErrorCode.INTERNAL.value, reply  # a handler bug
        replies.append(reply)
    if expected is not None:
        assert len(replies) == expected, (expected, raw[:500])
    return replies


def one(path: Path, data: bytes) -> dict[str, Any]:
    (reply,) = check(exchange(path, data), 1)
    return reply


# -- strategies ------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
any_cmd = st.sampled_from(SAFE) | st.text(max_size=20) | json_values


def dumps(obj: Any, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def structured_requests(draw: st.DrawFn) -> dict[str, Any]:
    obj = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=5))
    if draw(st.booleans()):
        obj["cmd"] = draw(any_cmd)
    if isinstance(obj.get("cmd"), str) and obj["cmd"] in UNSAFE:
        del obj["cmd"]
    return obj


NOT_STR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) \
    | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
NOT_BOOL = st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10) \
    | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
NOT_INT = st.text(max_size=10) | st.lists(json_scalars, max_size=3) | st.none() | st.booleans() \
    | st.floats(allow_nan=False).filter(lambda x: x != int(x) if x == x and abs(x) != float("inf") else True) \
    | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
NOT_NUMBER_OR_NULL = st.text(max_size=10) | st.booleans() | st.lists(json_scalars, max_size=3) \
    | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)

NOT_LIST = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10) \
    | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)

VALID = {"ingest": {"text": "a note"}, "signal": {"away": False}, "history": {"sessions": 1, "events": 1},
         "forget": {"sources": ["no such source"]}, "watch": {"heartbeat_s": 5}}
WRONG = {
    "ingest": {"text": NOT_STR, "source": NOT_STR, "origin": NOT_STR.filter(lambda v: v is not None)},
    "signal": {"away": NOT_BOOL, "expires_in_s": NOT_NUMBER_OR_NULL},
    "history": {"sessions": NOT_INT, "events": NOT_INT},
    "forget": {"documents": NOT_LIST, "sources": NOT_LIST},
    "watch": {"heartbeat_s": NOT_NUMBER_OR_NULL | st.none()},
}


def test_the_wrong_type_table_covers_every_command_with_arguments() -> None:
    assert set(WRONG) == {c.value for c in ARGS}
    for cmd, model in ARGS.items():
        assert set(WRONG[cmd.value]) == set(model.model_fields), cmd


# -- the tests ---------------------------------------------------------------------------------------------


@FUZZ
@given(obj=structured_requests(), ascii_only=st.booleans())
def test_structured_requests_get_well_formed_replies(sock: Path, obj: dict[str, Any], ascii_only: bool) -> None:
    data = dumps(obj, ascii_only) + b"\n"
    if len(data) > MAX_REQUEST:
        return
    reply = one(sock, data)
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        assert reply["error"]["code"] == "bad_request"
    elif cmd not in REAL:
        assert reply["error"]["code"] == "unknown_command"
        assert "unknown command" in reply["error"]["message"]


@FUZZ
@given(cmd=st.sampled_from(REAL), data=st.data())
def test_wrong_argument_types_for_every_command(sock: Path, cmd: str, data: st.DataObject) -> None:
    wrong = WRONG.get(cmd)
    if wrong is None:  # no arguments: any argument at all is refused (this covers `shutdown` too)
        args = data.draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in {"cmd", "id"}),
                                         json_values, min_size=1, max_size=3))
        bad = set(args)
    else:
        bad = set(data.draw(st.sets(st.sampled_from(sorted(wrong)), min_size=1)))
        args = {**VALID[cmd], **{name: data.draw(wrong[name], label=name) for name in bad}}
    reply = one(sock, dumps({"cmd": cmd, **args}, data.draw(st.booleans())) + b"\n")
    assert reply["ok"] is False and reply["error"]["code"] == "bad_args", reply
    message = reply["error"]["message"]
    assert message.startswith(f"{cmd}: ") and any(name in message for name in bad), message


@pytest.mark.parametrize("cmd", ["ingest", "signal"])
def test_missing_required_arguments(sock: Path, cmd: str) -> None:
    reply = one(sock, dumps({"cmd": cmd}, True) + b"\n")
    assert reply["error"]["code"] == "bad_args" and "Field required" in reply["error"]["message"]


@FUZZ
@given(name=st.sampled_from(REAL), mangle=st.sampled_from(["upper", "space", "underscore", "prefix", "nul"]))
def test_near_miss_command_names_are_unknown(sock: Path, name: str, mangle: str) -> None:
    bad = {"upper": name.upper(), "space": f" {name}", "underscore": name.replace("-", "_") + "_",
           "prefix": f"x{name}", "nul": f"{name}\x00"}[mangle]
    assert one(sock, dumps({"cmd": bad}, True) + b"\n")["error"]["code"] == "unknown_command"


@FUZZ
@given(payload=st.binary(max_size=2048)
       | st.text(alphabet='{}[]":,0123456789.eE+-truefalsnul \\\t\r\n', max_size=300).map(str.encode))
def test_random_bytes(sock: Path, payload: bytes) -> None:
    check(exchange(sock, payload), expected_replies(payload))


@FUZZ
@given(obj=structured_requests() | st.builds(lambda c: {"cmd": c}, st.sampled_from(SAFE)), cut=st.floats(0, 1))
def test_truncated_json(sock: Path, obj: dict[str, Any], cut: float) -> None:
    data = dumps(obj, True)
    piece = data[: min(len(data) - 1, int(cut * len(data)))]
    if not piece.strip() or b"\n" in piece:
        return
    reply = one(sock, piece)  # no newline: the end of the stream ends the request
    assert reply["error"]["code"] == "bad_json", (piece, reply)


@FUZZ
@given(depth=st.integers(1, 20_000), opener=st.sampled_from(["[", '{"a":']), where=st.sampled_from(
    ["top", "cmd", "argument", "ingest-text", "history-sessions"]))
def test_deep_nesting(sock: Path, depth: int, opener: str, where: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    line = {"top": nested, "cmd": f'{{"cmd":{nested}}}', "argument": f'{{"cmd":"status","deep":{nested}}}',
            "ingest-text": f'{{"cmd":"ingest","text":{nested}}}',
            "history-sessions": f'{{"cmd":"history","sessions":{nested}}}'}[where].encode()
    if len(line) >= MAX_REQUEST:
        line = line[: MAX_REQUEST]  # still hostile: an unterminated deep prefix
    reply = one(sock, line + b"\n")
    assert reply["error"]["code"] in {"bad_json", "bad_request", "bad_args"}, reply


def test_deep_nesting_is_bad_json_not_an_internal_error(sock: Path) -> None:
    # regression: json.loads raised RecursionError, which came back as `internal` with a logged traceback
    for line in (b"[" * 5000, b'{"cmd":"status","x":' + b"[" * 5000 + b"]" * 5000 + b"}"):
        reply = one(sock, line + b"\n")
        assert reply["error"]["code"] == "bad_json" and "nested too deeply" in reply["error"]["message"]


@FUZZ
@given(text=st.text(min_size=1, max_size=200), source=st.text(min_size=1, max_size=40),
       escapes=st.lists(st.sampled_from(["\\ud800", "\\udfff", "\\u0000", "\\ufeff", "\\uffff", "\\ud83d\\ude00"]),
                        max_size=3))
def test_unicode_in_commands_and_arguments(sock: Path, text: str, source: str, escapes: list[str]) -> None:
    # full unicode through ingest (stored or refused by the ingest library with a reason)
    reply = one(sock, dumps({"cmd": "ingest", "text": text, "source": source}, False) + b"\n")
    if not reply["ok"]:
        assert reply["error"]["code"] in {"ingest_failed", "bad_args"}, reply
    # lone surrogates and other odd escapes, in the command name, an argument and a key
    esc = "".join(escapes)
    for line in (f'{{"cmd":"status{esc}"}}', f'{{"cmd":"ingest","text":"x{esc}"}}', f'{{"cmd":"status","{esc}k":1}}'):
        check(exchange(sock, line.encode() + b"\n"), 1)


@FUZZ
@given(size=st.integers(MAX_REQUEST - 64, MAX_REQUEST + 64), newline=st.booleans())
def test_requests_around_the_size_limit(sock: Path, size: int, newline: bool) -> None:
    head = b'{"cmd":"status","pad":"'
    line = head + b"a" * max(0, size - len(head) - 2) + b'"}'
    reply = one(sock, line + (b"\n" if newline else b""))
    if len(line) > MAX_REQUEST:
        assert reply["error"]["code"] == "too_large"
    else:
        assert reply["error"]["code"] == "bad_args" and "pad: unknown argument" in reply["error"]["message"]


def test_huge_json_is_refused_and_the_connection_closed(sock: Path) -> None:
    huge = json.dumps({"cmd": "ingest", "text": "z" * (8 * MAX_REQUEST)}).encode()
    for data in (huge + b"\n", huge, b'{"cmd":"status"}\n' + huge + b"\n" + b'{"cmd":"status"}\n'):
        replies = check(exchange(sock, data))
        assert replies[-1]["error"]["code"] == "too_large"
        assert all(r["ok"] for r in replies[:-1])  # what came before the huge line was answered


@FUZZ
@given(lines=st.lists(st.sampled_from([b'{"cmd":"status"}', b'{"cmd":"history","sessions":2}', b"junk",
                                       b'{"cmd":"nope"}', b"", b"   ", b'{"cmd":"history","sessions":"x"}',
                                       b'{"cmd":"train-now"}', b"[]"]), min_size=1, max_size=20),
       trailing_newline=st.booleans())
def test_pipelined_requests_in_order(sock: Path, lines: list[bytes], trailing_newline: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    replies = check(exchange(sock, data), expected_replies(data))
    asked = [ln for ln in lines if ln.strip()]
    for line, reply in zip(asked, replies):
        if line == b'{"cmd":"status"}':
            assert reply["ok"] and "state" in reply
        elif line == b"junk":
            assert reply["error"]["code"] == "bad_json"
        elif line == b'{"cmd":"nope"}':
            assert reply["error"]["code"] == "unknown_command"
        elif line == b'{"cmd":"train-now"}':
            assert reply["ok"] or reply["error"]["code"] in {"conflict", "refused"}


def test_clients_leaving_mid_reply(sock: Path) -> None:
    for read_bytes in (0, 1, 100, 5000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            with unix_address(sock) as addr:
                s.connect(addr)
            s.sendall(b'{"cmd":"history","sessions":1000,"events":1000}\n' * 50 + b'{"cmd":"status"}\n' * 50)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < read_bytes:
                chunk = s.recv(read_bytes - len(got))
                if not chunk:
                    break
                got += chunk
        # and gone, with most replies unread


def test_concurrent_fuzzing_clients(sock: Path) -> None:
    rnd = random.Random(5)
    payloads = [
        b'{"cmd":"status"}\n', b'{"cmd":"history"}\n', b"\xff\xfe\n", b"{\n", b'{"cmd": 1}\n',
        b'{"cmd":"signal","away":"yes"}\n', b"[" * 3000 + b"\n", b'{"cmd":"status"}',
    ]
    failures: list[BaseException] = []

    def client(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(15):
                data = r.choice(payloads) if r.random() < 0.7 else bytes(r.getrandbits(8) for _ in range(r.randrange(64)))
                check(exchange(sock, data), expected_replies(data))
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=client, args=(rnd.randrange(1 << 30),)) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]


def test_socket_ingest_while_the_trainer_writes(sock: Path, fuzz_daemon: Any) -> None:
    # regression (found by bench/socket_fuzz.py): a socket ingest committing while the trainer's
    # connection was inside a read-then-write transaction made the trainer's write fail at once
    # with "database is locked" (a deferred transaction cannot wait for a newer snapshot), which
    # crashed the training session; the other way round the ingest got an `internal` reply.
    from pocketd.store import Store

    inside = threading.Event()
    errors: list[BaseException] = []

    def trainer_like_commit() -> None:
        try:
            with Store.open(fuzz_daemon.config.paths.database) as store, store.db.atomic():
                store.db.execute("select count(*) from documents").fetchone()  # read first ...
                inside.set()
                threading.Event().wait(0.5)  # ... while the daemon ingests over the socket ...
                store.db.execute("insert into sources (name, kind, created_at) values (?, ?, ?)",  # ... then write
                                 [f"trainer-like-{random.random()}", "text", "2026-01-01T00:00:00+00:00"])
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    t = threading.Thread(target=trainer_like_commit)
    t.start()
    assert inside.wait(10)
    note = f"a note written while the trainer commits {random.random()}"
    reply = one(sock, dumps({"cmd": "ingest", "text": note, "source": "race"}, True) + b"\n")
    t.join(30)
    assert not errors, errors
    assert reply["ok"] is True and reply["report"], reply


def test_a_burst_of_clients_larger_than_the_backlog_waits_for_room(tmp_path: Path) -> None:
    # regression (found by bench/socket_fuzz.py with 100 concurrent `status` clients): when the
    # daemon is at its connection bound, new connections queue in the listen backlog; once that
    # was full, a client's connect (with a timeout) failed at once with EAGAIN ("Resource
    # temporarily unavailable") instead of waiting for room within its timeout.
    from pocketd.daemon.protocol import Request, ok_reply
    from pocketd.daemon.server import ControlServer

    release = threading.Event()

    class Slow:
        def dispatch(self, req: Request) -> dict[str, Any]:
            release.wait(10)
            return ok_reply(cmd=req.cmd)

    path = tmp_path / "rt" / "pocketd.sock"
    srv = ControlServer(path, Slow(), max_connections=1, slot_wait_s=20)
    srv.start()
    results: list[Any] = []

    def client() -> None:
        try:
            results.append(request(path, "status", timeout_s=20)["ok"])
        except Exception as e:  # noqa: BLE001 - asserted below
            results.append(e)

    threads = [threading.Thread(target=client) for _ in range(120)]  # > backlog (64) + the one slot
    try:
        for t in threads:
            t.start()
        threading.Event().wait(0.5)
        release.set()
        for t in threads:
            t.join(30)
    finally:
        release.set()
        srv.close()
    errors = [r for r in results if r is not True]
    assert len(results) == 120 and not errors, errors[:3]
