"""What the daemon decided and did: training sessions and events, for `pocketd history`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from .clock import utcnow


@dataclass(frozen=True)
class Session:
    id: int
    started_at: str
    ended_at: str | None
    trigger: str
    end_reason: str | None
    exit_status: int | None
    checkpoint_id: int | None
    steps: int | None
    loss_first: float | None
    loss_last: float | None
    promoted: bool | None
    peak_rss_mb: float | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class Event:
    id: int
    at: str
    kind: str
    message: str
    detail: dict[str, Any]


_SESSION_COLS = (
    "id, started_at, ended_at, trigger, end_reason, exit_status, checkpoint_id, steps, "
    "loss_first, loss_last, promoted, peak_rss_mb, detail"
)


class History:
    def __init__(self, db: Database) -> None:
        self.db = db

    def start_session(self, trigger: str, detail: dict[str, Any] | None = None) -> int:
        with self.db.atomic():
            return int(
                self.db["sessions"].insert(
                    {"started_at": utcnow(), "trigger": trigger, "detail": json.dumps(detail or {})}
                ).last_pk
            )

    def end_session(self, session_id: int, **fields: Any) -> None:
        """Record how a session ended: end_reason, exit_status, checkpoint_id, steps, losses, promoted, peak_rss_mb."""
        allowed = {"end_reason", "exit_status", "checkpoint_id", "steps", "loss_first", "loss_last",
                   "promoted", "peak_rss_mb", "detail"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"end_session: unknown fields {sorted(unknown)}")
        if "detail" in fields:
            fields["detail"] = json.dumps(fields["detail"])
        with self.db.atomic():
            self.db["sessions"].update(session_id, {"ended_at": utcnow(), **fields})

    def sessions(self, limit: int = 20) -> list[Session]:
        rows = self.db.execute(f"select {_SESSION_COLS} from sessions order by id desc limit ?", [limit])
        return [
            Session(*r[:10], None if r[10] is None else bool(r[10]), r[11], json.loads(r[12] or "{}"))
            for r in rows
        ]

    def record_event(self, kind: str, message: str, detail: dict[str, Any] | None = None) -> int:
        with self.db.atomic():
            return int(
                self.db["events"].insert(
                    {"at": utcnow(), "kind": kind, "message": message, "detail": json.dumps(detail or {})}
                ).last_pk
            )

    def events(self, limit: int = 50, kind: str | None = None) -> list[Event]:
        where, params = ("where kind = ?", [kind]) if kind else ("", [])
        rows = self.db.execute(f"select id, at, kind, message, detail from events {where} order by id desc limit ?",
                               [*params, limit])
        return [Event(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}")) for r in rows]
