"""Forgetting documents: the one use case behind `pocketd forget` and the socket's `forget`.

It spans the ingest side (which documents), the trainer's log (which steps and checkpoints go, the
current chain rebuilt or fallen back) and the activation cache, so it lives in the top layer. It
never imports torch: the daemon runs it in its own process.

Contract of `forget`:
- every name is resolved first; DocumentNotFound / SourceNotFound (nothing changed) if one matches
  nothing;
- deleting the documents, rewriting the log and counting the other documents of dropped steps as
  untrained happen in ONE transaction: a failure or a kill leaves all or nothing;
- a training session cannot keep what it computed on the documents: the store refuses, in the same
  transaction as its commit, a step naming a forgotten document or a write to a dropped checkpoint
  (DocumentsForgotten), and the session ends cleanly on that. The report says what happened to a
  running session (stopped first by the daemon, or cut / guarded when forget ran beside it);
- a chain rebuilt without the documents is hashed at once only if the caller passes a recorder
  (the CLI replays it in-process); otherwise its hashes are pending: the next training session
  records the end hash after replaying it, and `checkpoint verify` says "NOT verified" until then.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pocketd.ingest.forget import resolve
from pocketd.ingest.report import plural
from pocketd.store import Store
from pocketd.trainer.config import activation_cache_dir
from pocketd.trainer.errors import TrainerError
from pocketd.trainer.forget import forget_in_log
from pocketd.trainer.job import Phase

from .settings import PocketdConfig
from .supervisor import read_status

log = logging.getLogger(__name__)

HashRecorder = Callable[[Store, int], None]  # (store, rebuilt checkpoint id): replay it and store its hashes


class SessionEffect(str, Enum):
    """What forgetting did to a training session running at the time."""

    NONE = "none"  # no session was seen training
    STOPPED = "stopped"  # the daemon stopped the running session before forgetting
    CUT = "cut"  # a session trains a candidate forget dropped: its next commit is refused and it ends
    GUARDED = "guarded"  # a session trains; a step that used a forgotten document is refused and ends it


class HashState(str, Enum):
    """Whether the hashes of a chain forget rebuilt are stored (what `checkpoint verify` compares)."""

    NOT_NEEDED = "not needed"  # no chain was rebuilt
    RECORDED = "recorded"  # replayed once, its hashes stored
    PENDING = "pending"  # not hashed yet: the next training session records its end hash


@dataclass(frozen=True)
class ForgottenDocument:
    id: int
    content_hash: str
    source: str
    origin: str | None
    n_examples: int


@dataclass(frozen=True)
class StoppedSession:
    """A session the daemon stopped (and waited for) before forgetting."""

    session_id: int
    pid: int
    checkpoint_id: int | None  # the candidate it trained (None: it had not opened one)


@dataclass(frozen=True)
class SessionReport:
    effect: SessionEffect
    message: str
    session_id: int | None = None
    pid: int | None = None
    checkpoint_id: int | None = None  # the candidate the session trained
    candidate_dropped: bool = False


@dataclass(frozen=True)
class ForgetReport:
    """What `forget` did. `to_dict()` is the socket's reply and `pocketd forget --json`."""

    documents: tuple[ForgottenDocument, ...]
    dropped_steps: dict[int, int] = field(default_factory=dict)  # checkpoint -> steps dropped from the current chain
    dropped_checkpoints: tuple[int, ...] = ()  # dropped whole (status forgotten)
    current_checkpoint: int | None = None  # after forgetting (None: the base model)
    rebuilt: bool = False  # the current chain was rebuilt without the documents' steps
    fell_back: bool = False  # the current checkpoint was dropped whole; its newest clean ancestor is current
    untrained_examples: int = 0  # examples of other documents in dropped steps: trained again
    orphan_documents: tuple[int, ...] = ()  # deleted earlier by a pocketd without the guards; their steps dropped now
    activation_cache_cleared: bool = False
    hashes: HashState = HashState.NOT_NEEDED
    session: SessionReport = SessionReport(SessionEffect.NONE, "no training session was running")

    @property
    def summary(self) -> str:
        parts = [f"forgot {plural(len(self.documents), 'document')}"]
        n_steps = sum(self.dropped_steps.values())
        if n_steps:
            parts.append(f"dropped {plural(n_steps, 'training step')}")
        if self.dropped_checkpoints:
            parts.append(f"dropped {plural(len(self.dropped_checkpoints), 'checkpoint')}")
        if self.session.effect is not SessionEffect.NONE:
            parts.append(self.session.message)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "documents": [vars(d) for d in self.documents],
            "dropped_steps": [{"checkpoint_id": c, "steps": n} for c, n in sorted(self.dropped_steps.items())],
            "dropped_checkpoints": list(self.dropped_checkpoints),
            "current_checkpoint": self.current_checkpoint,
            "rebuilt": self.rebuilt,
            "fell_back": self.fell_back,
            "untrained_examples": self.untrained_examples,
            "orphan_documents": list(self.orphan_documents),
            "activation_cache_cleared": self.activation_cache_cleared,
            "hashes": self.hashes.value,
            "session": {**vars(self.session), "effect": self.session.effect.value},
        }

    def lines(self) -> list[str]:
        """The report as `pocketd forget` prints it."""
        out = [f"deleted document {d.id} ({d.content_hash[:12]}, {plural(d.n_examples, 'example')}, "
               f"source {d.source}, from {d.origin})" for d in self.documents]
        if self.dropped_steps:
            out.append(f"dropped {plural(sum(self.dropped_steps.values()), 'training step')} that used these "
                       f"documents from {plural(len(self.dropped_steps), 'checkpoint')}")
        if self.dropped_checkpoints:
            out.append(f"dropped {plural(len(self.dropped_checkpoints), 'checkpoint')} whole "
                       f"({', '.join(map(str, self.dropped_checkpoints))}): trained on these documents or "
                       "continuing one that was (side tensors cannot drop single steps)")
        if self.orphan_documents:
            out.append(f"also dropped the steps of {plural(len(self.orphan_documents), 'document')} deleted earlier")
        if self.rebuilt:
            out.append(f"rebuilt the current checkpoint without them: checkpoint {self.current_checkpoint}"
                       + ("" if self.hashes is HashState.RECORDED else
                          " (not hashed yet: the next training session records its hash)"))
        if self.fell_back:
            out.append("the current checkpoint is now "
                       + (f"checkpoint {self.current_checkpoint}" if self.current_checkpoint else "the base model")
                       + "; the next training session retrains the side part without these documents")
        if self.untrained_examples:
            out.append(f"{plural(self.untrained_examples, 'example')} of other documents in the dropped steps "
                       "will be trained again")
        if self.activation_cache_cleared:
            out.append("cleared the activation cache")
        if self.session.effect is not SessionEffect.NONE:
            out.append(self.session.message)
        out.append(f"deleted {plural(len(self.documents), 'document')}")
        return out


def forget(store: Store, config: PocketdConfig, *, documents: Sequence[str | int] = (), sources: Sequence[str] = (),
           record_hashes: HashRecorder | None = None, stopped: StoppedSession | None = None,
           ) -> ForgetReport:
    """Forget documents by id / hash prefix (`documents`) and source name (`sources`); see the module
    docstring for the contract. `stopped`: the session the caller stopped first (the daemon); without
    it, a trainer running beside us is looked up from the daemon's status files."""
    if not documents and not sources:
        raise ValueError("forget needs at least one document reference or source name")
    with store.db.atomic():  # documents, log and trained counts: all or nothing
        targets = resolve(store, documents, sources)
        ids = [d.id for d in targets]
        done = forget_in_log(store, ids)
        store.docs.delete_documents(ids)
    log.info("forgot %d documents (%d checkpoints dropped)", len(ids), len(done.dropped))
    cleared = _clear_activation_cache(config.paths.cache_dir) if ids or done.dropped else False
    current = store.log.current()
    hashes = HashState.NOT_NEEDED
    if done.result.rebuilt and current is not None:
        hashes = HashState.PENDING
        if record_hashes is not None:
            try:
                record_hashes(store, current.id)
                hashes = HashState.RECORDED
            except TrainerError as e:  # forgetting is done; only the hashes wait for the next session
                log.warning("cannot record the hashes of rebuilt checkpoint %d now: %s", current.id, e)
    return ForgetReport(
        documents=tuple(ForgottenDocument(d.id, d.content_hash, d.source, d.origin, d.n_examples) for d in targets),
        dropped_steps=done.dropped_steps, dropped_checkpoints=done.dropped_whole,
        current_checkpoint=current.id if current else None, rebuilt=done.result.rebuilt,
        fell_back=done.result.fell_back, untrained_examples=done.untrained_examples,
        orphan_documents=done.orphan_documents, activation_cache_cleared=cleared, hashes=hashes,
        session=_session_report(config, stopped, done.dropped),
    )


def _clear_activation_cache(cache_dir: Path) -> bool:
    """Cached activations are derived from the text: forgetting drops the whole cache. Whether it was there."""
    path = activation_cache_dir(cache_dir)
    if not path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("cannot remove the whole activation cache %s", path)
    return True


def _session_report(config: PocketdConfig, stopped: StoppedSession | None, dropped: set[int]) -> SessionReport:
    if stopped is not None:
        cut = stopped.checkpoint_id in dropped
        return SessionReport(
            SessionEffect.STOPPED,
            f"stopped training session {stopped.session_id} first"
            + (f"; its candidate checkpoint {stopped.checkpoint_id} was dropped" if cut else ""),
            stopped.session_id, stopped.pid, stopped.checkpoint_id, cut)
    for session_id, pid, checkpoint_id in running_trainers(config):
        if checkpoint_id is not None and checkpoint_id in dropped:
            return SessionReport(
                SessionEffect.CUT, f"a running session was cut: it trained checkpoint {checkpoint_id}, which was "
                "dropped; it ends at its next commit, keeping nothing", session_id, pid, checkpoint_id, True)
        return SessionReport(
            SessionEffect.GUARDED, "a session is training: a step that used a forgotten document is refused at "
            "commit and ends it", session_id, pid, checkpoint_id)
    return SessionReport(SessionEffect.NONE, "no training session was running")


def running_trainers(config: PocketdConfig) -> list[tuple[int | None, int, int | None]]:
    """(session id, pid, candidate checkpoint id) of the daemon's trainers alive now, from the status files
    its supervisor keeps in `state_dir/jobs` (a `pocketd train` in the foreground writes none)."""
    jobs = config.paths.state_dir / "jobs"
    out: list[tuple[int | None, int, int | None]] = []
    if not jobs.is_dir():
        return out
    for path in sorted(jobs.glob("session-*.status.json")):
        status = read_status(path)
        if status is None or status.phase is Phase.DONE or not _alive(status.pid):
            continue
        try:
            session_id: int | None = int(path.name.split("-")[1].split(".")[0])
        except ValueError:
            session_id = None
        out.append((session_id, status.pid, status.checkpoint_id))
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
