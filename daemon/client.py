"""Talking to a running daemon over its control socket (used by the CLI and the benchmark)."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .wire import decode_reply, encode, unix_address

_MAX_REPLY_BYTES = 64 << 20


class ClientError(Exception):
    """Base of the client's errors."""


def start_hint(environ: Mapping[str, str] | None = None) -> str:
    """How to start pocketd as it was installed: `sv up pocketd` for a termux-services (runit) service
    ($PREFIX/var/service/pocketd), `systemctl --user start pocketd` for a systemd user unit
    ($XDG_CONFIG_HOME/systemd/user/pocketd.service), else `pocketd run`. Two stat calls, no imports."""
    env = os.environ if environ is None else environ
    prefix = env.get("PREFIX", "")
    if os.path.isabs(prefix) and os.path.isdir(os.path.join(prefix, "var", "service", "pocketd")):
        return "sv up pocketd"
    config_home = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(config_home):  # unset or relative: the XDG default
        home = env.get("HOME", "")
        config_home = os.path.join(home, ".config") if os.path.isabs(home) else ""
    if config_home and os.path.isfile(os.path.join(config_home, "systemd", "user", "pocketd.service")):
        return "systemctl --user start pocketd"
    return "pocketd run"


class DaemonNotRunning(ClientError):
    """Nothing listens on the socket. The message says how to start it (see `start_hint`)."""

    def __init__(self, path: Path, detail: str = "no socket", hint: str | None = None) -> None:
        super().__init__(f"pocketd is not running ({detail} at {path}); start it with `{hint or start_hint()}`")
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
        return _checked(self.raw({"cmd": cmd, **args}))

    def watch(self, heartbeat_s: float = 15.0) -> Iterator[dict[str, Any]]:
        """Send `watch` and yield its lines (`event` "status" or "heartbeat") as they come, until the
        caller stops iterating (the connection is then closed) or the stream fails: DaemonError for an
        error line, ClientError when the daemon closes the connection (it stopped) or says nothing for
        twice the heartbeat interval."""
        first = self.request("watch", heartbeat_s=heartbeat_s)
        sock = self._sock
        if sock is None:  # pragma: no cover - request() connected
            raise ClientError("not connected")
        sock.settimeout(max(self.timeout_s, 2 * heartbeat_s + 5))
        try:
            yield first
            while True:
                try:
                    line = self._read_line(sock)
                except socket.timeout:
                    raise ClientError(f"pocketd sent nothing for {2 * heartbeat_s + 5:g} s (no heartbeat)") from None
                except ClientError:
                    raise ClientError("pocketd closed the watch (the daemon stopped)") from None
                except OSError as e:
                    raise ClientError(f"connection to pocketd lost: {e.strerror or e}") from e
                try:
                    reply = decode_reply(line)
                except ValueError as e:
                    raise BadReply(f"unreadable line from pocketd: {e}") from e
                yield _checked(reply)
        finally:
            self.close()


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply["ok"]:
        error = reply.get("error") or {}
        raise DaemonError(str(error.get("code", "unknown")), str(error.get("message", "error")))
    return reply


def request(path: Path, cmd: str, timeout_s: float = 30.0, **args: Any) -> dict[str, Any]:
    """One request on a fresh connection."""
    with Client(path, timeout_s) as client:
        return client.request(cmd, **args)
