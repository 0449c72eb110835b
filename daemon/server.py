"""The control socket: a Unix-domain listener, one thread per connection (bounded), peer uid checked.

Privacy: the socket is 0600 in a 0700 directory, created under umask 077; each
peer's uid is read with SO_PEERCRED and other users get a `forbidden` reply.
There is no TCP listener anywhere in pocketd.

The server knows nothing about commands: it hands each parsed Request to a
Dispatcher and writes back what it returns (one reply, or the lines of a Stream),
with the request's `id` echoed. Named exceptions (ProtocolError) become error
replies here, at the socket edge, and nowhere else.

Connections are persistent: a client may send any number of requests, one after
another, and keep the connection open between them (an interactive `socat`). Each
request has a deadline (`request_timeout_s` from its first byte); open connections
are capped (`max_connections`): at the cap, the connection idle longest is closed to
make room, and if none is idle a new client gets `busy` after `slot_wait_s`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pocketd.store import make_private_dir, tighten_dir
from pocketd.store.errors import UnsafeLocation
from pocketd.store.private import Kind, check_owned

from .protocol import (
    LOCK_NAME,
    Busy,
    ErrorCode,
    Forbidden,
    ProtocolError,
    Request,
    RequestTimeout,
    RequestTooLarge,
    Stream,
    encode,
    error_reply,
    parse_request,
    unix_address,
    with_id,
)

log = logging.getLogger(__name__)

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_READ_CHUNK = 65536
_REPLY_TIMEOUT_S = 10.0  # a client that stops reading the reply is dropped after this


class SocketError(Exception):
    """The control socket cannot be set up."""


class AlreadyRunning(SocketError):
    """Another pocketd answers on the socket."""


class Dispatcher(Protocol):
    def dispatch(self, request: Request) -> dict[str, Any] | Stream: ...


def _shutdown_read(conn: socket.socket) -> None:
    """End a connection thread's wait for a request: its recv returns the end of the stream."""
    try:
        conn.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # already closed


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the client closed its connection entirely (a half-close, `nc -N` after its input, is not)."""
    poller = select.poll()
    poller.register(conn, select.POLLHUP | select.POLLERR)
    try:
        return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))
    except OSError:
        return True


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> PeerCredentials:
    """The connecting process's credentials (Linux and Android: SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    return PeerCredentials(*_CRED.unpack(raw))


def prepare_socket_dir(directory: Path, *, own: bool) -> None:
    """Create the socket's directory 0700. `own`: pocketd's dedicated dir, tightened if readable by
    others; otherwise (a configured location) a directory open to others is refused. A directory of
    another user, one others may write to, or a symlink to an open directory is refused (never
    chmod'ed: the link's target may not be pocketd's)."""
    if not directory.exists() and not directory.is_symlink():
        make_private_dir(directory)
        return
    try:
        st = check_owned(directory, "socket directory", Kind.DIRECTORY)
    except FileNotFoundError:
        raise SocketError(f"{directory}: the socket directory is a dangling symlink") from None
    except UnsafeLocation as e:
        raise SocketError(str(e)) from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        if not own or directory.is_symlink():
            raise SocketError(
                f"{directory}: socket directory is accessible to others (mode {mode:o}); "
                f"use a 0700 directory (chmod 700 {os.path.realpath(directory)})"
            )
        try:
            tighten_dir(directory)
        except UnsafeLocation as e:
            raise SocketError(str(e)) from None


class ControlServer:
    """Listen on `path`, serve requests with `dispatcher` until close()."""

    def __init__(
        self,
        path: Path,
        dispatcher: Dispatcher,
        *,
        max_request_bytes: int = 1 << 20,
        request_timeout_s: float = 10.0,
        max_connections: int = 32,
        slot_wait_s: float = 2.0,
        idle_evict_s: float = 30.0,
        own_dir: bool = True,
        credentials: Callable[[socket.socket], PeerCredentials] = peer_credentials,
    ) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.own_dir = own_dir
        self.slot_wait_s = slot_wait_s
        self.idle_evict_s = idle_evict_s
        self._credentials = credentials
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._inode: int | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.max_connections = max_connections
        self._connections: set[threading.Thread] = set()
        self._open: dict[socket.socket, float | None] = {}  # connection -> idle since (None: serving a request)
        self._streams: set[Stream] = set()  # streaming replies being sent (`watch`)
        self._conn_lock = threading.Lock()

    # -- setup ----------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket (refusing if a live daemon answers on it)."""
        prepare_socket_dir(self.path.parent, own=self.own_dir)
        self._take_lock()
        try:
            self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old_umask = os.umask(0o077)
            try:
                with unix_address(self.path) as addr:
                    sock.bind(addr)
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRINUSE:
                    raise AlreadyRunning(f"pocketd is already running (socket {self.path})") from e
                raise SocketError(f"{self.path}: cannot create the control socket: {e.strerror or e}") from e
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            sock.listen(64)
            sock.setblocking(False)
            self._listener = sock
        except BaseException:
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        """An flock beside the socket: two daemons starting at once cannot both pass the stale check."""
        lock_path = self.path.parent / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"pocketd is already running (socket {self.path})") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketError(f"{self.path} exists and is not a socket; remove it or set daemon.socket_path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(2.0)
        try:
            with unix_address(self.path) as addr:
                probe.connect(addr)
        except ConnectionRefusedError:
            log.info("removing stale socket %s (nothing listens on it)", self.path)
            self.path.unlink(missing_ok=True)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            raise SocketError(f"{self.path}: cannot check the existing socket: {e.strerror or e}") from e
        finally:
            probe.close()
        raise AlreadyRunning(f"pocketd is already running (socket {self.path})")

    # -- serving ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind if needed and serve in a background thread."""
        if self._listener is None:
            self.bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._accept_loop, name="pocketd-accept", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def _accept_loop(self) -> None:
        listener = self._listener
        if listener is None:
            return
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in sel.select():
                    if key.fileobj is listener:
                        self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and friends: log, keep listening
            log.warning("accept failed: %s", e)
            time.sleep(0.1)
            return
        conn.setblocking(True)
        if not self._slots.acquire(blocking=False):
            # At the cap: a connection idle for idle_evict_s between requests (an open `socat` left
            # alone) makes room for this one; otherwise a burst waits briefly for a free slot.
            self._evict_idle()
            if not self._slots.acquire(timeout=self.slot_wait_s):
                log.warning("refusing a connection: too many concurrent clients")
                self._send(conn, Busy("too many concurrent connections; try again").reply())
                conn.close()
                return
        thread = threading.Thread(target=self._serve, args=(conn,), name="pocketd-conn", daemon=True)
        with self._conn_lock:
            self._connections.add(thread)
            self._open[conn] = time.monotonic()
        try:
            thread.start()
        except RuntimeError:  # cannot start new thread
            with self._conn_lock:
                self._connections.discard(thread)
                self._open.pop(conn, None)
            self._slots.release()
            conn.close()

    def _evict_idle(self) -> None:
        """Close the connection that has waited longest for its next request, if that is idle_evict_s or
        more (a client between two quick requests is never chosen).

        Its thread sees the end of the stream and ends; its client finds the connection closed between
        requests, as after a daemon restart."""
        with self._conn_lock:
            limit = time.monotonic() - self.idle_evict_s
            idle = [(since, conn) for conn, since in self._open.items() if since is not None and since <= limit]
            if not idle:
                return
            _, oldest = min(idle, key=lambda pair: pair[0])
            self._open[oldest] = None  # not chosen twice
        log.info("closing the longest-idle control connection to make room (at %d connections)",
                 self.max_connections)
        _shutdown_read(oldest)

    def _mark(self, conn: socket.socket, idle: bool) -> None:
        with self._conn_lock:
            if conn in self._open:
                self._open[conn] = time.monotonic() if idle else None

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_connection(conn)
        except Exception:  # never let one connection hurt the daemon
            log.exception("control connection failed")
        finally:
            self._slots.release()
            with self._conn_lock:
                self._connections.discard(threading.current_thread())
                self._open.pop(conn, None)

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            creds = self._credentials(conn)
        except OSError as e:
            log.warning("cannot read peer credentials: %s", e)
            self._send(conn, Forbidden("cannot verify the peer's user").reply())
            return
        if creds.uid != os.getuid():
            log.warning("refused a connection from uid %d (pid %d)", creds.uid, creds.pid)
            self._send(conn, Forbidden(f"uid {creds.uid} may not use this daemon").reply())
            return
        buffer = b""
        while not self._closing.is_set():
            try:
                line, buffer = self._read_line(conn, buffer)
            except (RequestTooLarge, RequestTimeout) as e:
                self._send(conn, e.reply())
                return
            if line is None:
                return
            if not line.strip():
                continue
            self._mark(conn, idle=False)
            request_id, result = self._handle(line)
            if isinstance(result, Stream):
                self._stream(conn, result, request_id)
                return  # a stream ends with its connection
            if not self._send(conn, with_id(result, request_id)):
                return
            self._mark(conn, idle=True)

    def _read_line(self, conn: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
        """The next request line (None at a clean end of stream) and what follows it.

        Between requests a connection may stay open as long as the client likes (it holds one of the
        `max_connections` slots); once a request has begun, all of it must arrive within
        `request_timeout_s`."""
        deadline = time.monotonic() + self.request_timeout_s if buffer.strip() else None
        while True:
            nl = buffer.find(b"\n")
            if nl >= 0:
                if nl > self.max_request_bytes:
                    raise RequestTooLarge(f"request larger than {self.max_request_bytes} bytes")
                return buffer[:nl], buffer[nl + 1:]
            if len(buffer) > self.max_request_bytes:
                raise RequestTooLarge(f"request larger than {self.max_request_bytes} bytes")
            if deadline is None and buffer.strip():
                deadline = time.monotonic() + self.request_timeout_s  # the request's first byte
            if deadline is None:
                conn.settimeout(None)  # idle: close() and _evict_idle end the wait with a shutdown
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeout(f"request not complete within {self.request_timeout_s:g} s")
                conn.settimeout(remaining)
            try:
                chunk = conn.recv(_READ_CHUNK)
            except socket.timeout:
                raise RequestTimeout(f"request not complete within {self.request_timeout_s:g} s") from None
            except OSError:  # reset by the peer
                return None, b""
            if not chunk:  # end of stream: a last request without its newline still counts
                return (buffer, b"") if buffer.strip() else (None, b"")
            buffer += chunk

    def _handle(self, line: bytes) -> tuple[str | int | None, dict[str, Any] | Stream]:
        """The request's id (None if it had none or it could not be read) and its reply or stream."""
        request_id = None
        try:
            request = parse_request(line)
            request_id = request.id
            return request_id, self.dispatcher.dispatch(request)
        except ProtocolError as e:
            return request_id, e.reply()  # the reply carries the id parse_request could read
        except Exception as e:  # a bug in a handler: the daemon goes on
            log.exception("internal error handling a request")
            return request_id, error_reply(ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _stream(self, conn: socket.socket, stream: Stream, request_id: str | int | None) -> None:
        """Send a streaming reply until it ends, the client closes the connection or the server closes."""
        with self._conn_lock:
            self._streams.add(stream)
        try:
            if self._closing.is_set() or not self._send(conn, with_id(stream.first, request_id)):
                return
            for line in stream.lines:
                if self._closing.is_set() or _peer_closed(conn):
                    return
                if line is not None and not self._send(conn, with_id(line, request_id)):
                    return
        except Exception:
            log.exception("a streaming reply failed")
        finally:
            with self._conn_lock:
                self._streams.discard(stream)
            try:
                stream.close()
            except Exception:
                log.exception("cannot close a streaming reply")

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, Any]) -> bool:
        """Write one reply; False if the client went away (which is no concern of the daemon's)."""
        try:
            data = encode(reply)
        except (TypeError, ValueError) as e:
            log.exception("cannot encode a reply")
            data = encode(error_reply(ErrorCode.INTERNAL, f"internal error: cannot encode the reply: {e}"))
        try:
            conn.settimeout(_REPLY_TIMEOUT_S)
            conn.sendall(data)
            return True
        except OSError as e:
            log.debug("client went away before reading its reply: %s", e)
            return False

    # -- shutdown ----------------------------------------------------------------------

    def close(self, join_timeout_s: float = 2.0) -> None:
        """Stop accepting, let running requests finish briefly, remove the socket (if still ours)."""
        self._closing.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(join_timeout_s)
        with self._conn_lock:  # wake the connections waiting for a request and the streams waiting for a change
            idle = [conn for conn, since in self._open.items() if since is not None]
            streams = list(self._streams)
        for conn in idle:
            _shutdown_read(conn)
        for stream in streams:
            stream.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._remove_own_socket()
        deadline = time.monotonic() + join_timeout_s
        with self._conn_lock:
            threads = list(self._connections)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._release_lock()

    def _remove_own_socket(self) -> None:
        try:
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s", self.path, e)
