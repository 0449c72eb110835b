"""The trainer child dies with its daemon: a liveness pipe plus Linux's parent-death signal (no torch).

The daemon (daemon.supervisor) starts the trainer with the read end of a pipe whose write end
only the daemon holds (close-on-exec, so no other child inherits it), and names it in the
environment: POCKETD_PARENT_FD (the inherited descriptor) and POCKETD_PARENT_PID (the daemon's
pid). `watch_parent` then calls `on_death` (which stops the session like SIGTERM: the current
step finishes and commits, the child exits 0) when

- the pipe reads end-of-file: every copy of the write end is closed, i.e. the daemon process
  is gone, however it died (SIGKILL included);
- PR_SET_PDEATHSIG's signal (PDEATH_SIGNAL, Linux and Android) arrives and our parent pid is no
  longer the daemon's. The kernel sends that signal when the *thread* that started us exits,
  which a live daemon does too (a socket connection's thread runs `train-now`), so the signal
  alone means nothing; only a changed parent pid does;
- the daemon is already gone when the watch starts (the parent pid differs at once).

Without the environment variables (a foreground `pocketd train`) nothing is watched.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

ENV_FD = "POCKETD_PARENT_FD"
ENV_PID = "POCKETD_PARENT_PID"
PDEATH_SIGNAL = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1

DeathCallback = Callable[[str], None]


def child_environment(env: dict[str, str], read_fd: int) -> dict[str, str]:
    """`env` plus what `watch_parent` in the child needs (for the daemon, which keeps the write end)."""
    return {**env, ENV_FD: str(read_fd), ENV_PID: str(os.getpid())}


def watch_parent(on_death: DeathCallback, environ: dict[str, str] | None = None) -> bool:
    """Start watching the daemon named in the environment; whether there is one to watch.

    `on_death(reason)` is called at most once, from a watcher thread or from the signal handler
    in the main thread (so it must only do signal-safe things, e.g. set an Event and log).
    Call it from the main thread (it installs a signal handler). Invalid variables are logged
    and ignored (the session then runs unwatched, as in the foreground).
    """
    env = os.environ if environ is None else environ
    if ENV_FD not in env and ENV_PID not in env:
        return False
    try:
        fd = int(env.get(ENV_FD, ""))
        parent = int(env.get(ENV_PID, ""))
        if fd < 0 or parent <= 0:
            raise ValueError
        os.fstat(fd)
    except (ValueError, OSError):
        log.warning("ignoring invalid %s / %s: not watching the daemon", ENV_FD, ENV_PID)
        return False
    fired = threading.Event()

    def died(reason: str) -> None:
        if not fired.is_set():
            fired.set()
            on_death(reason)

    def on_signal(_signum: int, _frame: object) -> None:
        if os.getppid() != parent:
            died("the daemon died (parent-death signal)")

    signal.signal(PDEATH_SIGNAL, on_signal)
    _set_pdeathsig(PDEATH_SIGNAL)
    threading.Thread(target=_read_until_eof, args=(fd, died), name="pocketd-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # died before the signal was armed
        died("the daemon died before the trainer started")
    return True


def _read_until_eof(fd: int, died: DeathCallback) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError as e:
        log.debug("liveness pipe: %s", e)
    died("the daemon died (liveness pipe closed)")


def _set_pdeathsig(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig) through libc; best effort (the pipe alone suffices)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:  # no prctl (not Linux): the pipe still works
        log.debug("no prctl: %s", e)
