"""The control socket: a Unix-domain listener, one thread per connection (bounded), peer uid checked.

Privacy: the socket is 0600 in a 0700 directory, created under umask 077; each
peer's uid is read with SO_PEERCRED and other users get a `forbidden` reply.
There is no TCP listener anywhere in pocketd.

The server knows nothing about commands: it hands each parsed Request to a
Dispatcher and writes back what it returns. Named exceptions (ProtocolError)
become error replies here, at the socket edge, and nowhere else.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
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

from pocketd.store import make_private_dir

from .protocol import (
    LOCK_NAME,
    Busy,
    ErrorCode,
    Forbidden,
    ProtocolError,
    Request,
    RequestTimeout,
    RequestTooLarge,
    encode,
    error_reply,
    parse_request,
    unix_address,
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
    def dispatch(self, request: Request) -> dict[str, Any]: ...


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
    """Create the socket's directory 0700. `own`: pocketd's dedicated dir, tightened if too open;
    otherwise (a configured location) a directory open to others is refused."""
    if not directory.exists():
        make_private_dir(directory)
        return
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise SocketError(f"{directory}: not a directory")
    if st.st_uid != os.getuid():
        raise SocketError(f"{directory}: socket directory belongs to another user (uid {st.st_uid})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        if not own:
            raise SocketError(
                f"{directory}: socket directory is accessible to others (mode {stat.S_IMODE(st.st_mode):o}); "
                "use a 0700 directory"
            )
        directory.chmod(0o700)


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
        own_dir: bool = True,
        credentials: Callable[[socket.socket], PeerCredentials] = peer_credentials,
    ) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.own_dir = own_dir
        self.slot_wait_s = slot_wait_s
        self._credentials = credentials
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._inode: int | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._connections: set[threading.Thread] = set()
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
        if not self._slots.acquire(timeout=self.slot_wait_s):  # a burst waits briefly for a free slot
            log.warning("refusing a connection: too many concurrent clients")
            self._send(conn, Busy("too many concurrent connections; try again").reply())
            conn.close()
            return
        thread = threading.Thread(target=self._serve, args=(conn,), name="pocketd-conn", daemon=True)
        with self._conn_lock:
            self._connections.add(thread)
        try:
            thread.start()
        except RuntimeError:  # cannot start new thread
            with self._conn_lock:
                self._connections.discard(thread)
            self._slots.release()
            conn.close()

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
            except RequestTooLarge as e:
                self._send(conn, e.reply())
                return
            except RequestTimeout as e:
                self._send(conn, e.reply())
                return
            if line is None:
                return
            if not line.strip():
                continue
            if not self._send(conn, self._handle(line)):
                return

    def _read_line(self, conn: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
        """The next request line (None at a clean end of stream) and what follows it."""
        deadline = time.monotonic() + self.request_timeout_s
        while True:
            nl = buffer.find(b"\n")
            if nl >= 0:
                if nl > self.max_request_bytes:
                    raise RequestTooLarge(f"request larger than {self.max_request_bytes} bytes")
                return buffer[:nl], buffer[nl + 1:]
            if len(buffer) > self.max_request_bytes:
                raise RequestTooLarge(f"request larger than {self.max_request_bytes} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._timed_out(buffer)
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(_READ_CHUNK)
            except socket.timeout:
                return self._timed_out(buffer)
            except OSError:  # reset by the peer
                return None, b""
            if not chunk:  # end of stream: a last request without its newline still counts
                return (buffer, b"") if buffer.strip() else (None, b"")
            buffer += chunk

    def _timed_out(self, buffer: bytes) -> tuple[None, bytes]:
        if buffer.strip():
            raise RequestTimeout(f"request not complete within {self.request_timeout_s:g} s")
        return None, b""  # an idle connection between requests: just close it

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(line)
            return self.dispatcher.dispatch(request)
        except ProtocolError as e:
            return e.reply()
        except Exception as e:  # a bug in a handler: the daemon goes on
            log.exception("internal error handling a request")
            return error_reply(ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

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
