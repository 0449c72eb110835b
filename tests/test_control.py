"""daemon.control: the Daemon implements DaemonControl, and Commands needs nothing else."""

from __future__ import annotations

import inspect
from datetime import datetime, timezone
from pathlib import Path

from pocketd.daemon.changes import ChangeFeed
from pocketd.daemon.commands import Commands
from pocketd.daemon.control import (
    AwayState,
    DaemonControl,
    DaemonSnapshot,
    HistoryPage,
    StopRequested,
    StoreSummary,
    TrainingSnapshot,
)
from pocketd.daemon.protocol import State, encode, parse_request
from pocketd.daemon.readings import Decision
from pocketd.daemon.service import Daemon
from pocketd.daemon.supervisor import Trigger
from pocketd.ingest.report import IngestReport
from pocketd.store import DataCounts, Store
from pocketd.trainer.job import Phase, SessionStatus

PROTOCOL_METHODS = [n for n, v in vars(DaemonControl).items() if callable(v) and not n.startswith("_")]


def test_daemon_implements_the_protocol() -> None:
    assert PROTOCOL_METHODS
    for name in PROTOCOL_METHODS:
        want = inspect.signature(getattr(DaemonControl, name))
        got = inspect.signature(getattr(Daemon, name))
        assert list(got.parameters) == list(want.parameters), name
        assert got.return_annotation == want.return_annotation, name


class StubDaemon:
    """A DaemonControl without a daemon: what Commands sees, and all it sees."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.changes = ChangeFeed()

    def snapshot(self) -> DaemonSnapshot:
        started = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
        training = TrainingSnapshot(
            session_id=3, trigger=Trigger.TRAIN_NOW, pid=4242, started_at=started, elapsed_s=12.34,
            time_left_s=100.0, last_rss_mb=None, peak_rss_mb=300.0, stop_reason=None,
            progress=SessionStatus(phase=Phase.TRAINING, checkpoint_id=7, step=2, total_steps=9, loss=2.5,
                                   rss_mb=280.0, peak_rss_mb=310.0, eta_s=500.0, pid=4242),
            stop_check=Decision(train=True),
        )
        return DaemonSnapshot(
            state=State.TRAINING, paused=False, reasons=(), decision=None, readings=None, training=training,
            backoff_s=0.0, backoff_failures=0, away=AwayState(away=None, expires_at=None, active=None),
            uptime_s=5.0, socket_path=Path("/run/pocketd.sock"),
        )

    def store_summary(self) -> StoreSummary:
        return StoreSummary(data=DataCounts(documents=2, examples=5, untrained_examples=4), checkpoint=None,
                            last_session=None)

    def history(self, sessions: int, events: int) -> HistoryPage:
        return HistoryPage(sessions=[], events=[])

    def train_now(self) -> int:
        return 3

    def stop_training(self, reason: str) -> StopRequested:
        self.calls.append(("stop", reason))
        return StopRequested(session_id=3, grace_s=20.0)

    def set_paused(self, paused: bool) -> bool:
        return True

    def signal_away(self, away: bool, expires_in_s: float | None) -> datetime | None:
        return None

    def ingest(self, text: str, source: str, origin: str | None) -> IngestReport:
        return IngestReport()

    def request_shutdown(self, reason: str) -> None:
        self.calls.append(("shutdown", reason))


def test_commands_run_on_the_protocol_alone() -> None:
    stub = StubDaemon()
    control: DaemonControl = stub
    commands = Commands(control)
    reply = commands.dispatch(parse_request(b'{"cmd": "status"}'))
    encode(reply)  # JSON-serializable as the server sends it
    t = reply["training"]
    assert reply["state"] is State.TRAINING and reply["reasons"] == []
    assert reply["data"] == {"documents": 2, "examples": 5, "untrained_examples": 4}
    assert (t["session_id"], t["pid"], t["step"], t["phase"], t["rss_mb"], t["peak_rss_mb"]) == (
        3, 4242, 2, Phase.TRAINING, 280.0, 310.0)
    assert t["eta_s"] == 100.0  # the child's ETA, capped by the time budget left
    assert reply["daemon"]["socket"] == "/run/pocketd.sock"
    stop = commands.dispatch(parse_request(b'{"cmd": "stop-training"}'))
    assert stop == {"ok": True, "session_id": 3, "stopping": True, "grace_s": 20.0}
    assert stub.calls == [("stop", "stop-training requested")]


def test_data_counts(tmp_path: Path) -> None:
    with Store.open(tmp_path / "p.sqlite3") as store:
        assert store.docs.counts() == DataCounts(0, 0, 0)
        store.docs.add_document("a b c", ["a", "b", "c"], source="s", source_kind="file")
        counts = store.docs.counts()
        assert (counts.documents, counts.examples) == (1, 3)
        assert counts.untrained_examples == store.docs.count_untrained()
