"""The wire format: request parsing and validation, reply encoding."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pocketd.daemon.protocol import (
    BadArguments,
    BadJson,
    BadRequest,
    Command,
    ErrorCode,
    HistoryArgs,
    IngestArgs,
    NoArgs,
    SignalArgs,
    UnknownCommand,
    decode_reply,
    encode,
    error_reply,
    ok_reply,
    parse_request,
    unix_address,
)


def req(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("cmd", [c.value for c in Command])
def test_every_command_parses(cmd: str) -> None:
    args = {"ingest": {"text": "hi"}, "signal": {"away": True}, "forget": {"sources": ["x"]}}.get(cmd, {})
    request = parse_request(req({"cmd": cmd, **args}))
    assert request.cmd.value == cmd


def test_arguments_are_typed() -> None:
    r = parse_request(req({"cmd": "signal", "away": False, "expires_in_s": 30}))
    assert r.args == SignalArgs(away=False, expires_in_s=30.0)
    r = parse_request(req({"cmd": "ingest", "text": "x", "source": "tasker"}))
    assert r.args == IngestArgs(text="x", source="tasker")
    assert parse_request(req({"cmd": "history"})).args == HistoryArgs()
    assert isinstance(parse_request(req({"cmd": "status"})).args, NoArgs)


@pytest.mark.parametrize(
    ("line", "error", "words"),
    [
        (b"{not json", BadJson, "not valid JSON"),
        (b"\xff\xfe{}", BadJson, "not UTF-8"),
        (b"[1, 2]", BadRequest, "got array"),
        (b'"status"', BadRequest, "got string"),
        (b"{}", BadRequest, 'no "cmd"'),
        (b'{"cmd": 3}', BadRequest, "must be a string"),
        (b'{"cmd": "fly"}', UnknownCommand, "unknown command 'fly'"),
        (b'{"cmd": "signal"}', BadArguments, "away: Field required"),
        (b'{"cmd": "signal", "away": "yes"}', BadArguments, "away: Input should be a valid boolean (got string)"),
        (b'{"cmd": "signal", "away": 1}', BadArguments, "away"),
        (b'{"cmd": "signal", "away": true, "expires_in_s": -5}', BadArguments, "expires_in_s"),
        (b'{"cmd": "ingest", "text": 42}', BadArguments, "text: Input should be a valid string (got number)"),
        (b'{"cmd": "ingest", "text": ""}', BadArguments, "text"),
        (b'{"cmd": "history", "sessions": "ten"}', BadArguments, "sessions"),
        (b'{"cmd": "history", "sessions": true}', BadArguments, "sessions"),
        (b'{"cmd": "status", "verbose": true}', BadArguments, "verbose: unknown argument"),
    ],
)
def test_bad_requests(line: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as info:
        parse_request(line)
    assert words in str(info.value)
    reply = info.value.reply()  # type: ignore[attr-defined]
    assert reply["ok"] is False and reply["error"]["code"] == info.value.code.value  # type: ignore[attr-defined]


def test_encode_handles_daemon_types() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    line = encode(ok_reply(state=ErrorCode.BUSY, at=when, path=Path("/x"), nan=math.nan, inf=math.inf))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    data = decode_reply(line)
    assert data == {"ok": True, "state": "busy", "at": when.isoformat(), "path": "/x", "nan": None, "inf": None}


def test_error_reply_shape() -> None:
    assert error_reply(ErrorCode.TOO_LARGE, "big") == {"ok": False, "error": {"code": "too_large", "message": "big"}}
    with pytest.raises(ValueError):
        decode_reply(b'{"status": 1}')


def test_long_unix_paths_go_through_proc(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with unix_address(deep / "pocketd.sock") as addr:
        assert addr.startswith("/proc/self/fd/") and addr.endswith("/pocketd.sock")
    with unix_address(tmp_path / "s.sock") as addr:
        assert addr == str(tmp_path / "s.sock")
