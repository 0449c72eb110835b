"""The control commands: one `cmd_<name>` handler per protocol Command (dmypy style).

Handlers run in the server's connection threads. They get validated arguments
(daemon.protocol), call the Daemon's thread-safe operations, and return a reply
dict; failures are ProtocolError subclasses, turned into error replies by the server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from importlib import metadata
from typing import TYPE_CHECKING, Any

import psutil

from pocketd.store import StoreError

from .protocol import (
    Command,
    ErrorCode,
    HistoryArgs,
    IngestArgs,
    NoArgs,
    ProtocolError,
    Request,
    SignalArgs,
    State,
    ok_reply,
)
from .supervisor import RunningSession

if TYPE_CHECKING:
    from .service import Daemon

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def _version() -> str:
    try:
        return metadata.version("pocketd")
    except metadata.PackageNotFoundError:
        return "unknown"


class Commands:
    """The dispatcher the ControlServer calls."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._process = psutil.Process()
        self._version = _version()

    def dispatch(self, request: Request) -> dict[str, Any]:
        handler = getattr(self, request.cmd.handler_name)
        try:
            return handler(request.args)
        except StoreError as e:
            raise ProtocolError(str(e), ErrorCode.STORE_ERROR) from e

    # -- commands ------------------------------------------------------------------------------

    def cmd_status(self, args: NoArgs) -> dict[str, Any]:
        d = self.daemon
        snap = d.snapshot()
        running: RunningSession | None = snap["running"]
        with d.guarded_store() as s:
            documents = s.db["documents"].count
            examples = s.db["examples"].count
            untrained = s.docs.count_untrained()
            current = s.log.current()
            last = [x for x in s.history.sessions(limit=2) if x.ended_at is not None][:1]
        away, expires_at = d.away.snapshot()
        readings = snap["readings"]
        return ok_reply(
            state=snap["state"],
            paused=snap["paused"],
            reasons=snap["reasons"],
            training=self._training(running, snap) if running else None,
            last_session=dataclasses.asdict(last[0]) if last else None,
            data={"documents": documents, "examples": examples, "untrained_examples": untrained},
            checkpoint=None if current is None else {
                "id": current.id, "method": current.method, "steps": current.n_steps,
                "val_loss": current.val_loss, "created_at": current.created_at,
            },
            readings=readings,
            away={"away": away, "expires_at": expires_at, "active": d.away.current()},
            backoff={"failures": snap["backoff_failures"], "remaining_s": round(snap["backoff_s"], 1)},
            daemon={
                "pid": os.getpid(),
                "uptime_s": round(d.uptime_s, 1),
                "rss_mb": round(self._process.memory_info().rss / MIB, 1),
                "version": self._version,
                "socket": str(d.socket_path),
            },
            debug={
                "torch_loaded": "torch" in sys.modules,
                "transformers_loaded": "transformers" in sys.modules,
                "threads": len(self._process.threads()) if hasattr(self._process, "threads") else None,
            },
        )

    def _training(self, running: RunningSession, snap: dict[str, Any]) -> dict[str, Any]:
        st = self.daemon.supervisor.status()
        elapsed = time.monotonic() - running.started_mono
        left = self.daemon.config.policy.max_session_minutes * 60 - elapsed
        eta = st.eta_s if st is not None and st.eta_s is not None else max(0.0, left)
        stop_check = snap["stop_check"]
        return {
            "session_id": running.session_id,
            "trigger": running.trigger,
            "pid": running.pid,
            "started_at": running.started_at,
            "elapsed_s": round(elapsed, 1),
            "phase": st.phase if st else "starting",
            "checkpoint_id": st.checkpoint_id if st else None,
            "step": st.step if st else 0,
            "total_steps": st.total_steps if st else None,
            "loss": st.loss if st else None,
            "loss_first": st.loss_first if st else None,
            "s_per_step": st.s_per_step if st else None,
            "rss_mb": running.last_rss_mb if running.last_rss_mb is not None else (st.rss_mb if st else None),
            "peak_rss_mb": max((x for x in (running.peak_rss_mb, st.peak_rss_mb if st else None) if x is not None),
                               default=None),
            "eta_s": round(min(eta, max(0.0, left)), 1),
            "stopping": running.stop_reason,
            "stop_check": stop_check,
        }

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
        session_id = self.daemon.stop_training("stop-training requested")
        return ok_reply(session_id=session_id, stopping=True, grace_s=self.daemon.config.daemon.stop_grace_s)

    def cmd_ingest(self, args: IngestArgs) -> dict[str, Any]:
        from pocketd.ingest.pipeline import ingest_text

        d = self.daemon
        with d.guarded_store() as s:
            report = ingest_text(s, args.text, args.source, d.config.ingest, origin=args.origin)
        if report.rejected:
            r = report.rejected[0]
            raise ProtocolError(f"{r.input}: {r.reason}", ErrorCode.INGEST_FAILED)
        if report.added and d.supervisor.running is None:
            d.wake_check()
        return ok_reply(summary=report.summary(), report=report.to_dict())

    def cmd_signal(self, args: SignalArgs) -> dict[str, Any]:
        expires_at = self.daemon.signal_away(args.away, args.expires_in_s)
        return ok_reply(away=args.away, expires_at=expires_at)

    def cmd_history(self, args: HistoryArgs) -> dict[str, Any]:
        with self.daemon.guarded_store() as s:
            sessions = s.history.sessions(limit=args.sessions) if args.sessions else []
            events = s.history.events(limit=args.events) if args.events else []
        return ok_reply(sessions=[dataclasses.asdict(x) for x in sessions],
                        events=[dataclasses.asdict(e) for e in events])

    def cmd_shutdown(self, args: NoArgs) -> dict[str, Any]:
        self.daemon.request_shutdown("shutdown command")
        return ok_reply(stopping=True)


def _check_registry() -> None:
    missing = [c.value for c in Command if not hasattr(Commands, c.handler_name)]
    if missing:  # a programming error, caught by the test suite at import
        raise TypeError(f"Commands lacks handlers for {missing}")


_check_registry()
