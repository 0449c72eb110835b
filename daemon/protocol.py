"""The control-socket protocol: newline-delimited JSON, one request object -> one reply object.

Request: `{"cmd": "<name>", ...args}`. Reply: `{"ok": true, ...}` or
`{"ok": false, "error": {"code": "<code>", "message": "..."}}`.

This module is shared by the server and the client; it opens no sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SOCKET_NAME = "pocketd.sock"
LOCK_NAME = "pocketd.lock"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL


class Command(str, Enum):
    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    TRAIN_NOW = "train-now"
    STOP_TRAINING = "stop-training"
    INGEST = "ingest"
    SIGNAL = "signal"
    HISTORY = "history"
    SHUTDOWN = "shutdown"

    @property
    def handler_name(self) -> str:
        return "cmd_" + self.value.replace("-", "_")


class ErrorCode(str, Enum):
    BAD_JSON = "bad_json"  # the request line is not JSON (or not UTF-8)
    BAD_REQUEST = "bad_request"  # JSON, but not an object with a string "cmd"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"  # an argument is missing, unknown or of the wrong type
    TOO_LARGE = "too_large"  # the request passed daemon.request_max_bytes
    TIMEOUT = "timeout"  # the request did not arrive within daemon.request_timeout_s
    FORBIDDEN = "forbidden"  # the peer is another user
    BUSY = "busy"  # too many concurrent connections
    REFUSED = "refused"  # the daemon will not do it now (train-now without memory, ...)
    CONFLICT = "conflict"  # wrong state (already training, not training, shutting down)
    INGEST_FAILED = "ingest_failed"  # the ingest library rejected the text
    STORE_ERROR = "store_error"
    INTERNAL = "internal"  # a bug: logged with a traceback by the daemon


class State(str, Enum):
    """What the daemon is doing, as `status` reports it."""

    IDLE = "idle"  # nothing decided yet, or the policy allows training and a session is about to start
    WAITING = "waiting"  # the policy (or pause, or a crash backoff) says not now; see reasons
    TRAINING = "training"  # a trainer child process is running


# -- errors -------------------------------------------------------------------


class ProtocolError(Exception):
    """A request that gets an error reply. Raised anywhere below the socket edge; translated there."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def reply(self) -> dict[str, Any]:
        return error_reply(self.code, str(self))


class BadJson(ProtocolError):
    code = ErrorCode.BAD_JSON


class BadRequest(ProtocolError):
    code = ErrorCode.BAD_REQUEST


class UnknownCommand(ProtocolError):
    code = ErrorCode.UNKNOWN_COMMAND


class BadArguments(ProtocolError):
    code = ErrorCode.BAD_ARGS


class RequestTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class RequestTimeout(ProtocolError):
    code = ErrorCode.TIMEOUT


class Forbidden(ProtocolError):
    code = ErrorCode.FORBIDDEN


class Busy(ProtocolError):
    code = ErrorCode.BUSY


class Refused(ProtocolError):
    code = ErrorCode.REFUSED


class Conflict(ProtocolError):
    code = ErrorCode.CONFLICT


# -- arguments ----------------------------------------------------------------


class Args(BaseModel):
    """Base of every command's arguments: strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoArgs(Args):
    pass


class IngestArgs(Args):
    text: str = Field(min_length=1)
    source: str = Field("socket", min_length=1, max_length=200)
    origin: str | None = Field(None, max_length=1000)


class SignalArgs(Args):
    away: bool
    expires_in_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)


class HistoryArgs(Args):
    sessions: int = Field(10, ge=0, le=1000)
    events: int = Field(20, ge=0, le=1000)


ARGS: dict[Command, type[Args]] = {
    Command.INGEST: IngestArgs,
    Command.SIGNAL: SignalArgs,
    Command.HISTORY: HistoryArgs,
}


@dataclasses.dataclass(frozen=True)
class Request:
    cmd: Command
    args: Args


def parse_request(line: bytes) -> Request:
    """Decode and validate one request line; a ProtocolError subclass says what is wrong."""
    try:
        data = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadJson(f"request is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadJson(f"request is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # `[[[[...` a few thousand deep: refused like any other bad JSON, not a bug
        raise BadJson("request is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request must be a JSON object, got {_json_type(data)}")
    name = data.pop("cmd", None)
    if name is None:
        raise BadRequest('request has no "cmd" field')
    if not isinstance(name, str):
        raise BadRequest(f'"cmd" must be a string, got {_json_type(name)}')
    try:
        cmd = Command(name)
    except ValueError:
        known = ", ".join(c.value for c in Command)
        raise UnknownCommand(f"unknown command {name!r} (commands: {known})") from None
    model = ARGS.get(cmd, NoArgs)
    try:
        args = model.model_validate(data)
    except ValidationError as e:
        raise BadArguments(f"{cmd.value}: {_format_validation(e)}") from None
    return Request(cmd, args)


def _format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "arguments"
        msg = "unknown argument" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] not in {"extra_forbidden", "missing"}:
            msg += f" (got {_json_type(err.get('input'))})"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# -- replies --------------------------------------------------------------------


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error_reply(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code.value, "message": message}}


def _default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(message: dict[str, Any]) -> bytes:
    """One message as a JSON line (NaN and infinities become null)."""
    text = json.dumps(message, default=_default, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    if "NaN" in text or "Infinity" in text:
        text = json.dumps(_finite(json.loads(text)), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def decode_reply(line: bytes) -> dict[str, Any]:
    data = json.loads(line.decode("utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ValueError(f"not a pocketd reply: {line[:200]!r}")
    return data


# -- addresses --------------------------------------------------------------------


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for bind/connect; long paths go through /proc/self/fd/N of the open directory.

    sun_path holds 107 bytes; pytest temp dirs and deep Termux prefixes can be longer.
    """
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_UNIX_PATH:
        yield text
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(os.fsencode(short)) > MAX_UNIX_PATH:
            raise OSError(f"socket name too long: {path.name}")
        yield short
    finally:
        os.close(fd)
