"""Talking to a running daemon over its control socket (used by the CLI and the benchmark)."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path
from typing import Any

from .protocol import decode_reply, encode, unix_address

_MAX_REPLY_BYTES = 64 << 20


class ClientError(Exception):
    """Base of the client's errors."""


class DaemonNotRunning(ClientError):
    """Nothing listens on the socket."""

    def __init__(self, path: Path, detail: str = "no socket") -> None:
        super().__init__(f"pocketd is not running ({detail} at {path}); start it with `pocketd run`")
        self.path = path


class DaemonError(ClientError):
    """The daemon answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BadReply(ClientError):
    """The daemon's reply could not be read."""


class Client:
    """A connection to the daemon; requests go one after another on it. Use as a context manager."""

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def connect(self) -> "Client":
        deadline = time.monotonic() + self.timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self.timeout_s)
            try:
                with unix_address(self.path) as addr:
                    sock.connect(addr)
                break
            except BlockingIOError:
                # EAGAIN: the daemon's listen backlog is full (a burst of clients). A connect with a
                # timeout does not wait for room on a Unix socket, so wait here, within the timeout.
                sock.close()
                if time.monotonic() >= deadline:
                    raise ClientError(f"cannot connect to {self.path}: pocketd is too busy "
                                      f"(no room within {self.timeout_s:g} s)") from None
                time.sleep(0.02)
            except FileNotFoundError:
                sock.close()
                raise DaemonNotRunning(self.path, "no socket") from None
            except ConnectionRefusedError:
                sock.close()
                raise DaemonNotRunning(self.path, "stale socket") from None
            except OSError as e:
                sock.close()
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise DaemonNotRunning(self.path, "no socket") from None
                raise ClientError(f"cannot connect to {self.path}: {e.strerror or e}") from e
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Client":
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request object, return the reply object as is (ok true or false)."""
        return self.raw_bytes(encode(request))

    def raw_bytes(self, data: bytes) -> dict[str, Any]:
        if self._sock is None:
            self.connect()
        sock = self._sock
        if sock is None:  # pragma: no cover - connect() raised otherwise
            raise ClientError("not connected")
        try:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon may have answered early (forbidden, busy) and closed: read that
            line = self._read_line(sock)
        except socket.timeout:
            raise ClientError(f"no reply from pocketd within {self.timeout_s:g} s") from None
        except OSError as e:
            raise ClientError(f"connection to pocketd lost: {e.strerror or e}") from e
        try:
            return decode_reply(line)
        except ValueError as e:
            raise BadReply(f"unreadable reply from pocketd: {e}") from e

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            chunk = sock.recv(65536)
            if not chunk:
                if self._buffer:
                    break
                raise ClientError("pocketd closed the connection without replying")
            self._buffer += chunk
            if len(self._buffer) > _MAX_REPLY_BYTES:
                raise BadReply("reply too large")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send a command; the reply on success, DaemonError on an error reply."""
        reply = self.raw({"cmd": cmd, **args})
        if not reply["ok"]:
            error = reply.get("error") or {}
            raise DaemonError(str(error.get("code", "unknown")), str(error.get("message", "error")))
        return reply


def request(path: Path, cmd: str, timeout_s: float = 30.0, **args: Any) -> dict[str, Any]:
    """One request on a fresh connection."""
    with Client(path, timeout_s) as client:
        return client.request(cmd, **args)
