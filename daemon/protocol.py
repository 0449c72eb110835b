"""The control-socket protocol: newline-delimited JSON, one request object -> one reply object.

Request: `{"cmd": "<name>", "id": <optional>, ...args}`. Reply: `{"ok": true, ...}` or
`{"ok": false, "error": {"code": "<code>", "message": "..."}}`, with the request's `id` (a string
or an integer, if it gave a valid one) echoed in every reply line. A connection carries any number
of requests, one after another; `watch` turns its connection into a stream of lines (see `Stream`).

The request models and error codes; it opens no sockets. The client needs only the wire format
(`wire`, re-exported here), so it does not load pydantic.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The wire format (names, JSON lines, addresses) lives in `wire`, which the client imports alone;
# re-exported here for the server and the tests.
from .wire import LOCK_NAME, MAX_UNIX_PATH, SOCKET_NAME, decode_reply, encode, unix_address  # noqa: F401


PROTOCOL_VERSION = 2  # 1: request/reply only; 2: `version`, request `id`, `watch`, persistent connections
MAX_ID_CHARS = 128
MAX_ID_INT = 2**53  # integers a JSON client in any language reads exactly


class Command(str, Enum):
    VERSION = "version"
    STATUS = "status"
    WATCH = "watch"
    PAUSE = "pause"
    RESUME = "resume"
    TRAIN_NOW = "train-now"
    STOP_TRAINING = "stop-training"
    INGEST = "ingest"
    SIGNAL = "signal"
    HISTORY = "history"
    FORGET = "forget"
    SHUTDOWN = "shutdown"

    @property
    def handler_name(self) -> str:
        return "cmd_" + self.value.replace("-", "_")

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self]

    @property
    def streams(self) -> bool:
        """Whether the reply is a stream of lines (until the client closes) rather than one line."""
        return self is Command.WATCH


DESCRIPTIONS: dict[Command, str] = {
    Command.VERSION: "the protocol and pocketd versions and every command with its argument schema",
    Command.STATUS: "what the daemon is doing: state, reasons, training progress, data, checkpoint, device",
    Command.WATCH: "a stream: the status now, then a status line on every change and a heartbeat line "
                   "after heartbeat_s quiet seconds, until the client closes the connection",
    Command.PAUSE: "stop training (a running session stops after its step) until resume; persists",
    Command.RESUME: "let the policy start sessions again",
    Command.TRAIN_NOW: "start a session now if memory allows, ignoring charging and idleness",
    Command.STOP_TRAINING: "stop the running session after its current step",
    Command.INGEST: "store one text (the ingest report: added, duplicate or rejected)",
    Command.SIGNAL: "the user is away (screen off) or back, optionally expiring",
    Command.HISTORY: "recent training sessions and events, newest first",
    Command.FORGET: "forget documents by id or hash prefix, or whole sources (a running session stops first)",
    Command.SHUTDOWN: "stop the daemon cleanly",
}


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
    NOT_FOUND = "not_found"  # forget: a document id / hash prefix or source name matches nothing (nothing forgotten)
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
        self.request_id: str | int | None = None  # the request's valid id, if it had one (echoed)

    def reply(self) -> dict[str, Any]:
        return with_id(error_reply(self.code, str(self)), self.request_id)


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


class WatchArgs(Args):
    heartbeat_s: float = Field(15.0, ge=1, le=3600, allow_inf_nan=False,
                               description="a heartbeat line after this many seconds without a line")


class ForgetArgs(Args):
    """`forget`: documents by id (a number, or its text) or content-hash prefix, and whole sources; at least one."""

    documents: list[Annotated[str, Field(min_length=1, max_length=64)] | Annotated[int, Field(ge=1, le=2**62)]] = \
        Field(default_factory=list, max_length=1000)
    sources: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _something(self) -> "ForgetArgs":
        if not self.documents and not self.sources:
            raise ValueError("give documents (ids or hash prefixes) or sources (names)")
        return self


ARGS: dict[Command, type[Args]] = {
    Command.INGEST: IngestArgs,
    Command.FORGET: ForgetArgs,
    Command.SIGNAL: SignalArgs,
    Command.HISTORY: HistoryArgs,
    Command.WATCH: WatchArgs,
}


def args_model(cmd: Command) -> type[Args]:
    return ARGS.get(cmd, NoArgs)


def command_schemas() -> list[dict[str, Any]]:
    """Every command with its description, whether it streams, and its arguments' JSON schema."""
    out = []
    for cmd in Command:
        schema = args_model(cmd).model_json_schema()
        schema.pop("title", None)
        out.append({"name": cmd.value, "description": cmd.description, "streams": cmd.streams,
                    "arguments": schema})
    return out


RequestId = str | int


@dataclasses.dataclass(frozen=True)
class Request:
    cmd: Command
    args: Args
    id: RequestId | None = None  # the client's id, echoed in every reply line


@dataclasses.dataclass(eq=False)  # compared and hashed by identity (the server keeps a set of them)
class Stream:
    """A streaming reply (`watch`): the server sends `first`, then each line of `lines` as it comes.

    `lines` yields a reply dict to send, or None when it has nothing to send yet (at least once a
    second): the server then checks that the client is still there and that it is not closing. The
    stream ends when `lines` ends, the client closes the connection (a half-close, as `nc -N` does
    after its input, is not an end) or the server closes; the server then calls `close()` once.
    `cancel()` may be called from another thread (the server's close) to end it promptly.
    """

    first: dict[str, Any]
    lines: Iterator[dict[str, Any] | None]
    close: Callable[[], None] = lambda: None
    cancel: Callable[[], None] = lambda: None


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
    request_id = _request_id(data.pop("id", None))
    try:
        return _parse_command(data, request_id)
    except ProtocolError as e:
        e.request_id = request_id
        raise


def _request_id(value: Any) -> RequestId | None:
    """A valid client id (a string of at most 128 characters, or an integer within +-2**53); null is none."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_ID_INT:
        return value
    raise BadRequest(f'"id" must be a string of at most {MAX_ID_CHARS} characters or an integer within '
                     f"+-2**53, got {_json_type(value)}"
                     + (f" of {len(value)} characters" if isinstance(value, str) else ""))


def _parse_command(data: dict[str, Any], request_id: RequestId | None) -> Request:
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
    model = args_model(cmd)
    try:
        args = model.model_validate(data)
    except ValidationError as e:
        raise BadArguments(f"{cmd.value}: {_format_validation(e)}") from None
    return Request(cmd, args, request_id)


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


def with_id(reply: dict[str, Any], request_id: str | int | None) -> dict[str, Any]:
    """`reply` with the client's id (right after `ok`), or as it is when the request had none."""
    if request_id is None:
        return reply
    return {"ok": reply.get("ok"), "id": request_id, **{k: v for k, v in reply.items() if k != "ok"}}
