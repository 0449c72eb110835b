"""The control commands: one `cmd_<name>` handler per protocol Command (dmypy style).

Handlers run in the server's connection threads. They get validated arguments
(daemon.protocol), call the thread-safe operations of a `DaemonControl` (daemon.control;
the Daemon implements it), and return a reply dict; failures are ProtocolError subclasses,
turned into error replies by the server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from importlib import metadata
from typing import Any

import psutil

from pocketd.store import DocumentNotFound, SourceNotFound, StoreError

from .control import DaemonControl, TrainingSnapshot
from .protocol import (
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    Busy,
    Command,
    ErrorCode,
    ForgetArgs,
    HistoryArgs,
    IngestArgs,
    NoArgs,
    ProtocolError,
    Request,
    SignalArgs,
    State,
    Stream,
    WatchArgs,
    command_schemas,
    ok_reply,
)
from .watching import MAX_WATCHERS, StatusWatch

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def _version() -> str:
    try:
        return metadata.version("pocketd")
    except metadata.PackageNotFoundError:
        return "unknown"


class Commands:
    """The dispatcher the ControlServer calls."""

    def __init__(self, daemon: DaemonControl) -> None:
        self.daemon = daemon
        self._process = psutil.Process()
        self._version = _version()
        self._watchers = threading.BoundedSemaphore(MAX_WATCHERS)

    def dispatch(self, request: Request) -> dict[str, Any] | Stream:
        handler = getattr(self, request.cmd.handler_name)
        try:
            return handler(request.args)  # type: ignore[no-any-return]  # getattr: Any
        except StoreError as e:
            raise ProtocolError(str(e), ErrorCode.STORE_ERROR) from e
        finally:
            if request.cmd not in _READ_ONLY:
                self.daemon.changes.bump()  # pause, signal, ingest, ...: `watch` streams see it at once

    # -- commands ------------------------------------------------------------------------------

    def cmd_version(self, args: NoArgs) -> dict[str, Any]:
        """The protocol and pocketd versions, and every command with its arguments' JSON schema."""
        return ok_reply(
            protocol=PROTOCOL_VERSION,
            pocketd=self._version,
            request={"cmd": "the command's name", "id": f"optional: a string of at most {MAX_ID_CHARS} characters "
                     "or an integer, echoed in every reply line", "arguments": "the command's, beside cmd and id"},
            commands=command_schemas(),
            limits={"watchers": MAX_WATCHERS},
        )

    def cmd_watch(self, args: WatchArgs) -> Stream:
        """The status now, then a line per change and a heartbeat after heartbeat_s quiet seconds (watching.py)."""
        if not self._watchers.acquire(blocking=False):
            raise Busy(f"too many watchers (at most {MAX_WATCHERS}); close one or use status")
        try:
            watch = StatusWatch(lambda: self.cmd_status(NoArgs()), self.daemon.changes, args.heartbeat_s,
                                on_close=self._watchers.release)
        except BaseException:
            self._watchers.release()
            raise
        return watch.stream()

    def cmd_status(self, args: NoArgs) -> dict[str, Any]:
        snap = self.daemon.snapshot()
        summary = self.daemon.store_summary()
        data, current = summary.data, summary.checkpoint
        return ok_reply(
            state=snap.state,
            paused=snap.paused,
            reasons=list(snap.reasons),
            training=_training(snap.training) if snap.training else None,
            last_session=dataclasses.asdict(summary.last_session) if summary.last_session else None,
            data={"documents": data.documents, "examples": data.examples,
                  "untrained_examples": data.untrained_examples},
            checkpoint=None if current is None else {
                "id": current.id, "method": current.method, "steps": current.n_steps,
                "val_loss": current.val_loss, "created_at": current.created_at,
            },
            readings=snap.readings,
            away={"away": snap.away.away, "expires_at": snap.away.expires_at, "active": snap.away.active},
            backoff={"failures": snap.backoff_failures, "remaining_s": round(snap.backoff_s, 1)},
            daemon={
                "pid": os.getpid(),
                "uptime_s": round(snap.uptime_s, 1),
                "rss_mb": round(self._process.memory_info().rss / MIB, 1),
                "version": self._version,
                "socket": str(snap.socket_path),
            },
            debug={
                "torch_loaded": "torch" in sys.modules,
                "transformers_loaded": "transformers" in sys.modules,
                "threads": len(self._process.threads()) if hasattr(self._process, "threads") else None,
            },
        )

    def cmd_pause(self, args: NoArgs) -> dict[str, Any]:
        changed = self.daemon.set_paused(True)
        return ok_reply(paused=True, changed=changed)

    def cmd_resume(self, args: NoArgs) -> dict[str, Any]:
        changed = self.daemon.set_paused(False)
        return ok_reply(paused=False, changed=changed)

    def cmd_train_now(self, args: NoArgs) -> dict[str, Any]:
        session_id = self.daemon.train_now()
        return ok_reply(session_id=session_id, state=State.TRAINING)

    def cmd_stop_training(self, args: NoArgs) -> dict[str, Any]:
        stop = self.daemon.stop_training("stop-training requested")
        return ok_reply(session_id=stop.session_id, stopping=True, grace_s=stop.grace_s)

    def cmd_ingest(self, args: IngestArgs) -> dict[str, Any]:
        report = self.daemon.ingest(args.text, args.source, args.origin)
        if report.rejected:
            r = report.rejected[0]
            raise ProtocolError(f"{r.input}: {r.reason}", ErrorCode.INGEST_FAILED)
        return ok_reply(summary=report.summary(), report=report.to_dict())

    def cmd_signal(self, args: SignalArgs) -> dict[str, Any]:
        expires_at = self.daemon.signal_away(args.away, args.expires_in_s)
        return ok_reply(away=args.away, expires_at=expires_at)

    def cmd_history(self, args: HistoryArgs) -> dict[str, Any]:
        page = self.daemon.history(sessions=args.sessions, events=args.events)
        return ok_reply(sessions=[dataclasses.asdict(x) for x in page.sessions],
                        events=[dataclasses.asdict(e) for e in page.events])

    def cmd_forget(self, args: ForgetArgs) -> dict[str, Any]:
        """Forget documents as `pocketd forget` does (a running session is stopped first); the reply is
        the report (`ForgetReport.to_dict()`, the same as `pocketd forget --json`)."""
        try:
            report = self.daemon.forget([str(d) for d in args.documents], list(args.sources))
        except (DocumentNotFound, SourceNotFound) as e:
            raise ProtocolError(f"{e} (nothing was forgotten)", ErrorCode.NOT_FOUND) from e
        return ok_reply(**report.to_dict())

    def cmd_shutdown(self, args: NoArgs) -> dict[str, Any]:
        self.daemon.request_shutdown("shutdown command")
        return ok_reply(stopping=True)


_READ_ONLY = frozenset({Command.VERSION, Command.STATUS, Command.WATCH, Command.HISTORY})


def _training(t: TrainingSnapshot) -> dict[str, Any]:
    """The `training` part of the status reply."""
    st = t.progress
    left = t.time_left_s
    eta = st.eta_s if st is not None and st.eta_s is not None else max(0.0, left)
    return {
        "session_id": t.session_id,
        "trigger": t.trigger,
        "pid": t.pid,
        "started_at": t.started_at,
        "elapsed_s": round(t.elapsed_s, 1),
        "phase": st.phase if st else "starting",
        "checkpoint_id": st.checkpoint_id if st else None,
        "step": st.step if st else 0,
        "total_steps": st.total_steps if st else None,
        "loss": st.loss if st else None,
        "loss_first": st.loss_first if st else None,
        "s_per_step": st.s_per_step if st else None,
        "rss_mb": t.last_rss_mb if t.last_rss_mb is not None else (st.rss_mb if st else None),
        "peak_rss_mb": max((x for x in (t.peak_rss_mb, st.peak_rss_mb if st else None) if x is not None),
                           default=None),
        "eta_s": round(min(eta, max(0.0, left)), 1),
        "stopping": t.stop_reason,
        "stop_check": t.stop_check,
    }


def _check_registry() -> None:
    missing = [c.value for c in Command if not hasattr(Commands, c.handler_name)]
    if missing:  # a programming error, caught by the test suite at import
        raise TypeError(f"Commands lacks handlers for {missing}")


_check_registry()
