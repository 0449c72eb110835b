"""What the control commands may see and do: a typed snapshot of the daemon and the `DaemonControl` protocol.

`Commands` (commands.py) depends on this module only, never on the Daemon (service.py): the
Daemon implements `DaemonControl`, tests may pass a stub. Every value here is a frozen copy
taken under the daemon's lock, so a handler can read it without locking anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from pocketd.ingest.report import IngestReport
from pocketd.store import Checkpoint, DataCounts
from pocketd.store.history import Event, Session
from pocketd.trainer.job import SessionStatus

from .changes import ChangeFeed
from .forgetting import ForgetReport
from .protocol import State
from .readings import Decision, Readings
from .supervisor import Trigger


@dataclass(frozen=True)
class TrainingSnapshot:
    """The running training session, as of the snapshot."""

    session_id: int
    trigger: Trigger
    pid: int
    started_at: datetime
    elapsed_s: float  # since the child was started
    time_left_s: float  # until the session's time budget (policy.max_session_minutes); negative when past it
    last_rss_mb: float | None  # the daemon's latest sample of the child's process tree
    peak_rss_mb: float | None  # the daemon's highest sample
    stop_reason: str | None  # set once a stop was requested (the child finishes its step)
    progress: SessionStatus | None  # the child's latest report, None before its first one
    stop_check: Decision | None  # the latest should-stop verdict of the supervise job


@dataclass(frozen=True)
class AwayState:
    """The "user away" signal: as last set (`away`, `expires_at`) and as the policy sees it now (`active`)."""

    away: bool | None
    expires_at: datetime | None
    active: bool | None  # None when no signal is set or it expired


@dataclass(frozen=True)
class DaemonSnapshot:
    """The daemon's in-memory state at one instant (no store access)."""

    state: State
    paused: bool
    reasons: tuple[str, ...]  # why it waits ("paused", the policy's reasons, the backoff); empty otherwise
    decision: Decision | None  # the latest policy decision, None after a session until the next check
    readings: Readings | None  # the latest device readings
    training: TrainingSnapshot | None  # None when no trainer runs
    backoff_s: float  # seconds left of the backoff after failed sessions (0 when none)
    backoff_failures: int
    away: AwayState
    uptime_s: float
    socket_path: Path


@dataclass(frozen=True)
class StoreSummary:
    """The store's part of `status`."""

    data: DataCounts
    checkpoint: Checkpoint | None  # the current checkpoint
    last_session: Session | None  # the latest session that ended


@dataclass(frozen=True)
class HistoryPage:
    sessions: list[Session]  # newest first
    events: list[Event]  # newest first


@dataclass(frozen=True)
class StopRequested:
    session_id: int
    grace_s: float  # how long the child may take to finish its step before SIGKILL


class DaemonControl(Protocol):
    """Exactly the operations the control commands use. Every method is thread-safe.

    Refusals are ProtocolError subclasses (Conflict, Refused); store failures are StoreError.
    """

    changes: ChangeFeed  # bumped whenever what `snapshot` or `store_summary` return may have changed

    def snapshot(self) -> DaemonSnapshot:
        """The in-memory state now."""
        ...

    def store_summary(self) -> StoreSummary:
        """Data counts, the current checkpoint and the last finished session."""
        ...

    def history(self, sessions: int, events: int) -> HistoryPage:
        """The latest `sessions` sessions and `events` events (0: none)."""
        ...

    def train_now(self) -> int:
        """Start a session now if memory allows; its id. Conflict if one runs, Refused if it cannot."""
        ...

    def stop_training(self, reason: str) -> StopRequested:
        """Ask the running session to stop after its step. Conflict if none runs."""
        ...

    def set_paused(self, paused: bool) -> bool:
        """Pause (a running session is stopped) or resume; whether it changed."""
        ...

    def signal_away(self, away: bool, expires_in_s: float | None) -> datetime | None:
        """Set the "user away" signal; when it expires (None: never)."""
        ...

    def ingest(self, text: str, source: str, origin: str | None) -> IngestReport:
        """Ingest one text (a rejection is in the report, not raised); wakes the policy check if data was added."""
        ...

    def forget(self, documents: list[str], sources: list[str]) -> ForgetReport:
        """Forget documents (daemon.forgetting.forget): a running session is stopped and waited for first,
        and no session starts until it is done. DocumentNotFound / SourceNotFound: nothing forgotten."""
        ...

    def request_shutdown(self, reason: str) -> None:
        """Ask the daemon to stop (it replies first)."""
        ...
