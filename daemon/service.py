"""The Daemon: wires the store, probes, policy, scheduler, trainer supervision, inbox and control socket.

Threads: the main thread waits for a stop request (SIGTERM/SIGINT or `shutdown`);
APScheduler's pool runs the jobs `policy-check`, `supervise` (only while a trainer
runs) and `inbox-poll`; the control server runs one thread per connection. Shared
state is guarded by `_lock` (daemon state); the store by its own lock (GuardedStore).
Lock order: `_lock` -> supervisor lock -> store lock. Probes are read outside `_lock`.

The daemon never imports torch: training runs in `python -m pocketd.trainer --job FILE`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from pocketd.ingest.pipeline import ingest_text
from pocketd.ingest.report import IngestReport
from pocketd.store import DataLock, Store, make_private_dir, touch_private
from pocketd.store.errors import StoreWriteFailed
from pocketd.trainer.job import SessionStatus, TrainingJob

from . import notify
from .changes import ChangeFeed
from .commands import Commands
from .config import check_locations
from .control import AwayState, DaemonSnapshot, HistoryPage, StopRequested, StoreSummary, TrainingSnapshot
from .forgetting import ForgetReport, StoppedSession
from .forgetting import forget as forget_documents
from .inbox import InboxWatcher
from .locations import socket_path
from .policy import decide, decide_train_now, should_stop
from .probes import AwaySignal, make_power_probe, process_tree_rss_mb, resolve_timezone, take_readings
from .protocol import Conflict, Refused, State
from .readings import Decision, Readings, StoreState
from .server import ControlServer
from .settings import PocketdConfig
from .supervisor import Backoff, FinishedSession, Outcome, TrainerStartError, TrainerSupervisor, Trigger
from .systemkill import KillAdaptation, on_android
from .usernotify import BlockedWatch, UserNotifier, session_message
from .wakelock import WakeLock, wake_lock_enabled

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STATUS_SIGNAL = signal.SIGUSR1  # log a status line and check the policy now
JOB_CHECK = "policy-check"
JOB_SUPERVISE = "supervise"
JOB_INBOX = "inbox-poll"
PAUSED_FILE = "paused"
WAKE_LOCK_MARKER = "wake-lock-held"  # in state_dir while a session's termux-wake-lock may be held

ReadingsSource = Callable[[AwaySignal, "int | None"], Readings]


def default_trainer_command() -> list[str]:
    return [sys.executable, "-m", "pocketd.trainer"]


def trainer_environment() -> dict[str, str]:
    """The child's environment: ours, without progress bars (they would flood the daemon's log)."""
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def socket_path_for(config: PocketdConfig) -> Path:
    return socket_path(config.daemon.socket_path, config.paths.runtime_dir)


class GuardedStore:
    """The store behind a lock: its sqlite connection is shared by threads but not concurrently usable."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()

    def __enter__(self) -> Store:
        self._lock.acquire()
        return self._store

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._store.close()


def _write_wake(fd: int, signum: int) -> None:
    """Wake `run()`'s loop with a byte (the signal number, 0 for none); a full pipe is awake already."""
    if fd < 0:
        return
    try:
        os.write(fd, bytes([signum & 0xFF]))
    except OSError:  # BlockingIOError (full: it wakes anyway) or closed at shutdown
        pass


def _wait_for_signals(fd: int) -> list[int]:
    """Block until `fd` (the wake pipe's read end) is readable; the signal numbers read from it."""
    select.select([fd], [], [])
    try:
        return list(os.read(fd, 512))
    except BlockingIOError:
        return []


def _abandoned_fields(status: SessionStatus | None) -> dict[str, Any]:
    """History fields of a session whose daemon died, from its trainer's last status (if any)."""
    reason = "abandoned: the daemon died during the session"
    if status is None:
        return {"end_reason": reason}
    how = f" ({status.end_reason})" if status.end_reason else " (no final status: it was killed)"
    return {"end_reason": f"{reason}; its trainer made {status.step} steps{how}", "checkpoint_id": status.checkpoint_id,
            "steps": status.step, "loss_first": status.loss_first, "loss_last": status.loss,
            "peak_rss_mb": status.peak_rss_mb, "promoted": status.promoted}


def _decision_key(decision: Decision) -> tuple[bool, tuple[str, ...]]:
    """A decision with its numbers blanked: "load 2.10 > 1.50" and "load 2.30 > 1.50" are the same state."""
    return decision.train, tuple(re.sub(r"\d+(?:\.\d+)?", "#", r) for r in decision.reasons)


class Daemon:
    """One pocketd process. `run()` blocks until stopped; `start()`/`shutdown()` for tests.

    Implements `control.DaemonControl`, the operations the control commands use.
    """

    def __init__(
        self,
        config: PocketdConfig,
        *,
        trainer_command: Sequence[str] | None = None,
        readings_source: ReadingsSource | None = None,
        supervise_interval_s: float = 2.0,
        backoff: Backoff | None = None,
        android: bool | None = None,
    ) -> None:
        self.config = config
        self.tz = resolve_timezone(config.policy.timezone)  # ValueError: reported at startup
        self.socket_path = socket_path_for(config)
        self.supervise_interval_s = supervise_interval_s
        self.away = AwaySignal()
        self.changes = ChangeFeed()  # bumped after every job run, command and session end (the `watch` stream)
        self.backoff = backoff or Backoff()
        self._readings_source = readings_source or self._probe_readings_source()
        self._probe_lock = threading.Lock()  # a probe is used from one thread at a time
        self._lock = threading.RLock()
        self._stop_requested = threading.Event()
        self._wake_w = -1  # run()'s self-pipe: signal handlers and request_shutdown wake the main loop
        self._stop_reason = ""
        self._started_mono = time.monotonic()
        self._paused = (config.paths.state_dir / PAUSED_FILE).exists()
        self._last_decision: Decision | None = None
        self._last_decision_key: tuple[bool, tuple[str, ...]] | None = None
        self._last_readings: Readings | None = None
        self._last_stop_check: Decision | None = None
        self._last_failure: str | None = None  # why the backoff is on, for `status`
        self._stopped_over_budget: set[int] = set()  # sessions the RSS probe stopped for the memory budget
        self._forgetting = False  # a `forget` is under way: no session starts (guarded by _lock)
        self._forget_lock = threading.Lock()  # one `forget` at a time
        self.store: GuardedStore | None = None
        self._data_lock: DataLock | None = None  # one trainer per database (store.datalock)
        self.android = on_android() if android is None else android  # names the phantom process killer
        self.supervisor = TrainerSupervisor(
            command=trainer_command or default_trainer_command(),
            jobs_dir=config.paths.state_dir / "jobs",
            nice=config.daemon.nice,
            stop_grace_s=config.daemon.stop_grace_s,
            rss_probe=process_tree_rss_mb,
            env=trainer_environment(),
            android=self.android,
        )
        d = config.daemon
        self.adaptation = KillAdaptation(after=d.system_kills_before_adapting, android=self.android,
                                         configured_threads=config.trainer.threads)
        self.wake_lock = WakeLock(enabled=wake_lock_enabled(d.wake_lock), timeout_s=d.power_probe_timeout_s,
                                  marker=config.paths.state_dir / WAKE_LOCK_MARKER)
        self.notifier = UserNotifier(enabled=d.notifications, timeout_s=d.power_probe_timeout_s)
        self.blocked_watch = BlockedWatch(d.notify_blocked_after_minutes * 60)
        self.inbox = InboxWatcher(config.daemon.inbox, config.ingest) if config.daemon.inbox else None
        self.server = ControlServer(
            self.socket_path,
            Commands(self),
            max_request_bytes=config.daemon.request_max_bytes,
            request_timeout_s=config.daemon.request_timeout_s,
            own_dir=config.daemon.socket_path is None,
        )
        self.scheduler = BackgroundScheduler(
            timezone=self.tz,
            executors={"default": {"type": "threadpool", "max_workers": 4}},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )

    def _probe_readings_source(self) -> ReadingsSource:
        d = self.config.daemon
        probe = make_power_probe(d.power_probe, fake_file=d.fake_power_file, timeout_s=d.power_probe_timeout_s,
                                 no_battery_means_mains=self.config.policy.no_battery_means_mains)

        def read(away: AwaySignal, trainer_pid: int | None) -> Readings:
            return take_readings(probe, tz=self.tz, away=away, trainer_pid=trainer_pid)

        return read

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def start(self) -> None:
        """Bind the socket, lock and open the store, start the scheduler.

        ConfigError for folders that are not the user's own; AlreadyRunning if another daemon
        answers on the socket; DataLocked if another daemon or `pocketd train` uses the database.
        """
        self._started_mono = time.monotonic()
        check_locations(self.config.paths)
        self.server.bind()  # first: a second daemon must not touch anything
        try:
            database = self.config.paths.database
            self._data_lock = DataLock.acquire(database, "pocketd run")
            self.store = GuardedStore(Store.open(database))
            self._close_abandoned_sessions()
            self.wake_lock.release_leftover()  # a previous daemon died holding it
            self._record_event("daemon", f"pocketd started (pid {os.getpid()})")
            self.server.start()
            self._start_scheduler()
        except BaseException:
            self.server.close()
            if self.store is not None:
                self.store.close()
                self.store = None
            self._release_data_lock()
            raise
        log.info("pocketd running (pid %d, socket %s)%s", os.getpid(), self.socket_path,
                 ", paused" if self._paused else "")

    def _start_scheduler(self) -> None:
        policy = self.config.policy
        self.scheduler.add_job(self._job(self.check_policy), "interval", seconds=policy.check_interval_s,
                               id=JOB_CHECK, name=JOB_CHECK, next_run_time=datetime.now(self.tz))
        if self.inbox is not None:
            self.scheduler.add_job(self._job(self.poll_inbox), "interval", seconds=self.config.daemon.inbox_poll_s,
                                   id=JOB_INBOX, name=JOB_INBOX, next_run_time=datetime.now(self.tz))
        self.scheduler.start()

    def run(self) -> int:
        """Run in the foreground until stopped; return the exit status (0).

        Signals (handled in this, the main thread, after the handler woke it through a pipe):
        SIGTERM, SIGINT and SIGHUP (the terminal went away) shut down cleanly: the trainer
        stops after its step, the socket is removed. SIGUSR1 logs a status line and runs the
        policy check now. The `shutdown` command also stops the loop.
        """
        wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (*SHUTDOWN_SIGNALS, STATUS_SIGNAL)}
        try:
            self.start()
            notify.ready(self.state_line())
            while not self._stop_requested.is_set():
                for signum in _wait_for_signals(wake_r):
                    self._handle_signal(signum)
            log.info("stopping: %s", self._stop_reason)
            notify.stopping(f"stopping: {self._stop_reason}")
            self.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_w, self._wake_w = self._wake_w, -1
            for fd in (wake_r, wake_w):
                os.close(fd)
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """The signal handler: only wakes the main loop (no locks here: it may interrupt a lock holder)."""
        _write_wake(self._wake_w, signum)

    def _handle_signal(self, signum: int) -> None:
        """A signal the main loop was woken for (0: a wake-up without a signal)."""
        if signum in SHUTDOWN_SIGNALS:
            self.request_shutdown(f"received {signal.Signals(signum).name}")
        elif signum == STATUS_SIGNAL:
            line = self.state_line()
            log.info("status (SIGUSR1): %s; checking the policy now", line)
            notify.status(line)
            self.wake_check()

    def request_shutdown(self, reason: str) -> None:
        """Ask the main loop to stop (from any thread)."""
        if not self._stop_requested.is_set():
            self._stop_reason = reason
            self._stop_requested.set()
            _write_wake(self._wake_w, 0)

    def shutdown(self) -> None:
        """Stop the jobs, stop the trainer cleanly (SIGTERM, SIGKILL after the grace), close the socket."""
        with self._lock:  # a session being started right now is running once we hold the lock
            self._stop_requested.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        finished = self.supervisor.stop_and_wait(f"daemon shutdown ({self._stop_reason or 'requested'})")
        with self._lock:  # after the reaper thread, if it recorded the session's end
            if finished is not None:
                self._record_finished(finished)
        self.server.close()
        self.wake_lock.close()  # runs the session's termux-wake-unlock (bounded by its timeout)
        self.notifier.close()
        with self._lock:
            if self.store is not None:
                self._record_event("daemon", f"pocketd stopped ({self._stop_reason or 'requested'})")
                self.store.close()
                self.store = None
            self._release_data_lock()
        log.info("pocketd stopped")

    def _release_data_lock(self) -> None:
        if self._data_lock is not None:
            self._data_lock.release()
            self._data_lock = None

    def _job(self, fn: Callable[[], None]) -> Callable[[], None]:
        """A scheduler job that logs its failures and is retried at its next run, never crashing the daemon."""

        last_error: list[str] = []

        def job() -> None:
            if self.stopping:
                return
            try:
                fn()
            except Exception as e:
                text = f"{type(e).__name__}: {e}"
                if last_error == [text]:  # the same failure again: one line, not another traceback
                    log.warning("job %s failed again: %s", fn.__name__, text)
                else:
                    log.exception("job %s failed; it will run again at its next interval", fn.__name__)
                last_error[:] = [text]
            else:
                last_error.clear()
            finally:
                self.changes.bump()  # readings, decisions, training progress: `watch` recomputes the status

        job.__name__ = fn.__name__
        return job

    # -- jobs ---------------------------------------------------------------------------------

    def read_device(self, trainer_pid: int | None = None) -> Readings:
        with self._probe_lock:
            readings = self._readings_source(self.away, trainer_pid)
        with self._lock:
            self._last_readings = readings
        return readings

    def store_state(self) -> StoreState:
        store = self.guarded_store()
        with store as s:
            untrained = s.docs.count_untrained()
            last = s.history.sessions(limit=1)
        last_end = None
        if last and last[0].ended_at:
            last_end = datetime.fromisoformat(last[0].ended_at)
        running = self.supervisor.running
        return StoreState(untrained_examples=untrained, last_session_end=last_end,
                          training_since=running.started_at if running else None)

    def check_policy(self) -> None:
        """The `policy-check` job: read the device, decide, start a session if the policy says train."""
        if self.supervisor.running is not None:
            return  # the supervise job watches a running session
        readings = self.read_device()
        state = self.store_state()
        with self._lock:
            if self.stopping or self.supervisor.running is not None or self._forgetting:
                return
            if self._paused:
                decision = Decision(train=False, reasons=["paused"])
            elif self.backoff.remaining_s() > 0:
                why = f": {self._last_failure.removeprefix('failed: ')}" if self._last_failure else ""
                decision = Decision(train=False, reasons=[
                    f"backing off after a failed session ({self.backoff.remaining_s():.0f} s left){why}"])
            else:
                decision = decide(readings, self.config.policy, state)
            self._note_decision(decision)
            # Blocked: there is data to train on, the user did not pause, and something else says no.
            blocked = (not self._paused and not decision.train
                       and state.untrained_examples >= max(1, self.config.policy.min_new_examples))
            alert = self.blocked_watch.update(blocked, decision.reasons, time.monotonic())
            if alert is not None:
                self.notifier.send(alert)
            if decision.train:
                try:
                    self._start_session(Trigger.POLICY, decision)
                except Refused:
                    pass  # logged and backed off in _start_session

    def _note_decision(self, decision: Decision) -> None:
        self._last_decision = decision
        key = _decision_key(decision)
        if key != self._last_decision_key:
            self._last_decision_key = key
            log.info("decision: %s", decision.summary())
            self._record_event("decision", decision.summary(), {"train": decision.train, "reasons": decision.reasons})
            notify.status(decision.summary())

    def supervise(self) -> None:
        """The `supervise` job while training: reap, sample RSS, apply should_stop, escalate to SIGKILL."""
        with self._lock:
            finished = self.supervisor.poll()
            if finished is not None:
                self._record_finished(finished)
                return
            running = self.supervisor.running
        if running is None:
            self._unschedule_supervise()
            return
        if running.term_sent_mono is not None:
            return  # already stopping; poll() above escalates after the grace period
        readings = self.read_device(running.pid)
        if readings.trainer_rss_mb is not None:
            self.supervisor.note_rss(readings.trainer_rss_mb)
        state = self.store_state()
        verdict = should_stop(readings, self.config.policy, state, manual=running.trigger is Trigger.TRAIN_NOW)
        with self._lock:
            self._last_stop_check = verdict
            if not verdict.train and self.supervisor.running is running:
                reason = "; ".join(verdict.reasons)
                rss = readings.trainer_rss_mb
                if rss is not None and rss > self.config.policy.memory_budget_mb:
                    self._stopped_over_budget.add(running.session_id)
                self._record_event("stop", f"stopping session {running.session_id}: {reason}")
                self.supervisor.request_stop(reason)

    def poll_inbox(self) -> None:
        if self.inbox is None:
            return
        with self.guarded_store() as s:
            result = self.inbox.poll(s)
        if result is not None and result.added:
            self._record_event("inbox", result.summary())
            self.wake_check()

    # -- sessions -------------------------------------------------------------------------------

    def _start_session(self, trigger: Trigger, decision: Decision | None = None) -> int:
        """Start a trainer child (call with `_lock` held); the new session's id."""
        if self.stopping:
            raise Conflict("pocketd is shutting down")
        if self._forgetting:
            raise Conflict("forgetting documents: training can start again when that is done")
        running = self.supervisor.running
        if running is not None:
            raise Conflict(f"already training (session {running.session_id}, pid {running.pid})")
        policy = self.config.policy
        paths = self.config.paths
        with self.guarded_store() as s:
            session_id = s.history.start_session(trigger.value, {"reasons": decision.reasons if decision else []})
        trainer = self.config.trainer
        if self.adaptation.threads is not None:  # fewer threads after repeated system kills (systemkill.py)
            trainer = trainer.model_copy(update={"threads": self.adaptation.threads})
        job = TrainingJob(
            database=paths.database, cache_dir=paths.cache_dir, trainer=trainer,
            memory_budget_mb=policy.memory_budget_mb, max_minutes=policy.max_session_minutes, max_steps=None,
        )
        try:
            running = self.supervisor.start(job, session_id, trigger)
        except TrainerStartError as e:
            delay = self.backoff.failed()
            self._last_failure = f"failed to start: {e}"
            log.error("%s; retrying in %.0f s", e, delay)
            with self.guarded_store() as s:
                s.history.end_session(session_id, end_reason=f"failed to start: {e}")
            self._record_event("trainer-failed", f"session {session_id}: {e}; backing off {delay:.0f} s")
            raise Refused(str(e)) from e
        self.wake_lock.acquire()  # queued before the reaper can queue the release
        self.blocked_watch.update(False, [], time.monotonic())
        threading.Thread(target=self._reap, args=(running.proc,), name="pocketd-reaper", daemon=True).start()
        self._record_event("session", f"session {session_id} started ({trigger.value}, pid {running.pid})")
        notify.status(f"training: session {session_id}")
        self.scheduler.add_job(self._job(self.supervise), "interval", seconds=self.supervise_interval_s,
                               id=JOB_SUPERVISE, name=JOB_SUPERVISE, replace_existing=True)
        return session_id

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for the child in a thread of its own, so its end is recorded at once, not at the next tick."""
        proc.wait()
        try:
            with self._lock:
                finished = self.supervisor.poll()
                if finished is not None:
                    self._record_finished(finished)
        except Exception:
            log.exception("cannot record the end of the training session")

    def _record_finished(self, finished: FinishedSession) -> None:
        """Write a finished session to history and update the backoff (call with `_lock` held)."""
        self.wake_lock.release()  # first, whatever happens below; queued after the session's acquire
        st = finished.status
        fields: dict[str, Any] = {
            "end_reason": finished.end_reason,
            "exit_status": finished.exit_status,
            "peak_rss_mb": finished.peak_rss_mb,
            "detail": {"outcome": finished.outcome.value, "trigger": finished.trigger.value,
                       "duration_s": round(finished.duration_s, 1)},
        }
        if st is not None:
            fields.update(checkpoint_id=st.checkpoint_id, steps=st.step, loss_first=st.loss_first,
                          loss_last=st.loss, promoted=st.promoted)
            fields["detail"].update(val_loss=st.val_loss, parent_val_loss=st.parent_val_loss,
                                    s_per_step=st.s_per_step)
        with self.guarded_store() as s:
            s.history.end_session(finished.session_id, **fields)
        over_budget = finished.session_id in self._stopped_over_budget
        self._stopped_over_budget.discard(finished.session_id)
        if finished.outcome is Outcome.KILLED_BY_SYSTEM:
            adapted = self.adaptation.killed()
            delay = self.backoff.failed()
            self._last_failure = finished.end_reason
            self._record_event("trainer-killed", f"session {finished.session_id} {finished.end_reason}; "
                               + (f"{adapted}; " if adapted else "") + f"backing off {delay:.0f} s",
                               {"exit_status": finished.exit_status, "in_a_row": self.adaptation.in_a_row,
                                "threads": self.adaptation.threads})
        elif finished.outcome is Outcome.FAILED or over_budget:
            # A session stopped for the memory budget would grow the same way at once: back off too.
            self.adaptation.survived()
            delay = self.backoff.failed()
            self._last_failure = finished.end_reason
            self._record_event("trainer-failed", f"session {finished.session_id} {finished.end_reason}; "
                               f"backing off {delay:.0f} s", {"exit_status": finished.exit_status})
        else:
            self.adaptation.survived()
            self.backoff.succeeded()
        self._unschedule_supervise()
        self._last_decision = None  # decided before the session; the next check decides afresh
        self._last_stop_check = None
        notify.status(f"session {finished.session_id} {finished.end_reason}")
        self.notifier.send(session_message(finished))
        self.changes.bump()
        if not self.stopping:
            self.wake_check()

    def _unschedule_supervise(self) -> None:
        try:
            self.scheduler.remove_job(JOB_SUPERVISE)
        except (JobLookupError, SchedulerNotRunningError):
            pass

    def _close_abandoned_sessions(self) -> None:
        """Sessions left open by a daemon that died: stop their orphaned trainers, close them.

        An orphan normally stopped itself when its daemon died (trainer.parentwatch); its last
        status file tells how far it got, and goes into the session's record.
        """
        for pid in self.supervisor.orphan_pids():
            log.warning("stopping an orphaned trainer (pid %d) left by a previous daemon", pid)
            self.supervisor.terminate_orphan(pid)
        with self.guarded_store() as s:
            for sess in s.history.sessions(limit=20):
                if sess.ended_at is None:
                    s.history.end_session(sess.id, **_abandoned_fields(self.supervisor.leftover_status(sess.id)))
        self.supervisor.remove_leftovers()

    def wake_check(self) -> None:
        """Run the policy check soon (after resume or an away signal) instead of at its next interval."""
        try:
            self.scheduler.modify_job(JOB_CHECK, next_run_time=datetime.now(self.tz))
        except (JobLookupError, SchedulerNotRunningError):
            pass

    # -- operations for the control commands ------------------------------------------------------

    def train_now(self) -> int:
        """Start a session now if memory allows (ignoring charging and idleness); its id."""
        if self.stopping:
            raise Conflict("pocketd is shutting down")
        running = self.supervisor.running
        if running is not None:
            raise Conflict(f"already training (session {running.session_id})")
        readings = self.read_device()
        state = self.store_state()
        decision = decide_train_now(readings, self.config.policy, state)
        if not decision.train:
            raise Refused("cannot train now: " + "; ".join(decision.reasons))
        with self._lock:
            return self._start_session(Trigger.TRAIN_NOW, decision)

    def stop_training(self, reason: str) -> StopRequested:
        """Ask the running session to stop after its current step; Conflict if none runs."""
        with self._lock:
            running = self.supervisor.running
            if running is None:
                raise Conflict("not training")
            self._record_event("stop", f"stopping session {running.session_id}: {reason}")
            self.supervisor.request_stop(reason)
            return StopRequested(session_id=running.session_id, grace_s=self.config.daemon.stop_grace_s)

    def set_paused(self, paused: bool) -> bool:
        """Pause (no new sessions; a running one is stopped) or resume; whether it changed."""
        marker = self.config.paths.state_dir / PAUSED_FILE
        with self._lock:
            changed = paused != self._paused
            self._paused = paused
            if paused:
                make_private_dir(marker.parent)
                touch_private(marker)
                if self.supervisor.running is not None:
                    self.supervisor.request_stop("paused")
            else:
                marker.unlink(missing_ok=True)
            if changed:
                self._record_event("pause" if paused else "resume", "paused" if paused else "resumed")
        if not paused:
            self.wake_check()
        return changed

    def signal_away(self, away: bool, expires_in_s: float | None) -> datetime | None:
        expires_at = datetime.now(timezone.utc) + timedelta(seconds=expires_in_s) if expires_in_s else None
        self.away.set(away, expires_at)
        self._record_event("signal", ("user away" if away else "user back")
                           + (f" for {expires_in_s:g} s" if expires_in_s else ""))
        if away:
            self.wake_check()
        return expires_at

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused

    def snapshot(self) -> DaemonSnapshot:
        """The in-memory state now (no store access; the child's status file is read after the lock)."""
        with self._lock:
            running = self.supervisor.running
            decision = self._last_decision
            if running is not None:
                state = State.TRAINING
            elif self._paused or (decision is not None and not decision.train):
                state = State.WAITING
            else:
                state = State.IDLE
            reasons = ("paused",) if self._paused and running is None else (
                tuple(decision.reasons) if decision is not None and not decision.train else ())
            paused = self._paused
            readings = self._last_readings
            stop_check = self._last_stop_check if running else None
            backoff_s = self.backoff.remaining_s()
            backoff_failures = self.backoff.failures
            training = None
            if running is not None:  # copied under the lock: the supervisor updates it in place
                elapsed = time.monotonic() - running.started_mono
                training = TrainingSnapshot(
                    session_id=running.session_id, trigger=running.trigger, pid=running.pid,
                    started_at=running.started_at, elapsed_s=elapsed,
                    time_left_s=self.config.policy.max_session_minutes * 60 - elapsed,
                    last_rss_mb=running.last_rss_mb, peak_rss_mb=running.peak_rss_mb,
                    stop_reason=running.stop_reason, progress=None, stop_check=stop_check,
                )
        if training is not None:
            training = dataclasses.replace(training, progress=self.supervisor.status())
        away, expires_at = self.away.snapshot()
        return DaemonSnapshot(
            state=state, paused=paused, reasons=reasons, decision=decision, readings=readings,
            training=training, backoff_s=backoff_s, backoff_failures=backoff_failures,
            away=AwayState(away=away, expires_at=expires_at, active=self.away.current()),
            uptime_s=self.uptime_s, socket_path=self.socket_path,
        )

    def store_summary(self) -> StoreSummary:
        """Data counts, the current checkpoint and the last finished session, in one store visit."""
        with self.guarded_store() as s:
            data = s.docs.counts()
            current = s.log.current()
            ended = [x for x in s.history.sessions(limit=2) if x.ended_at is not None][:1]
        return StoreSummary(data=data, checkpoint=current, last_session=ended[0] if ended else None)

    def history(self, sessions: int, events: int) -> HistoryPage:
        """The latest `sessions` sessions and `events` events, newest first (0: none of them)."""
        with self.guarded_store() as s:
            return HistoryPage(sessions=s.history.sessions(limit=sessions) if sessions else [],
                               events=s.history.events(limit=events) if events else [])

    def forget(self, documents: list[str], sources: list[str]) -> ForgetReport:
        """Forget documents (daemon.forgetting.forget) with no session running: a running one is stopped and
        waited for first (SIGKILL after daemon.stop_grace_s), and none starts until forgetting is done.
        The rebuilt chain's hashes are left to the next session (this process never loads torch)."""
        with self._forget_lock:
            with self._lock:
                if self.stopping:
                    raise Conflict("pocketd is shutting down")
                self._forgetting = True
                running = self.supervisor.running
            try:
                stopped = None
                if running is not None:
                    progress = self.supervisor.status()
                    self._record_event("stop", f"stopping session {running.session_id}: forget requested")
                    finished = self.supervisor.stop_and_wait("forget requested")
                    with self._lock:  # unless the reaper thread recorded it already
                        if finished is not None:
                            self._record_finished(finished)
                    stopped = StoppedSession(running.session_id, running.pid,
                                             progress.checkpoint_id if progress else None)
                with self.guarded_store() as s:
                    report = forget_documents(s, self.config, documents=documents, sources=sources, stopped=stopped)
            finally:
                with self._lock:
                    self._forgetting = False
        self._record_event("forget", report.summary, {"documents": [d.id for d in report.documents],
                                                      "dropped_checkpoints": list(report.dropped_checkpoints)})
        self.wake_check()
        return report

    def ingest(self, text: str, source: str, origin: str | None) -> IngestReport:
        """Ingest one text into the store; if it added data and nothing trains, check the policy soon.

        StoreWriteFailed (a `store_error` reply) if the database refuses the write, e.g. the disk is
        full; the document's transaction is rolled back, nothing stored before is lost.
        """
        with self.guarded_store() as s:
            try:
                report = ingest_text(s, text, source, self.config.ingest, origin=origin)
            except (sqlite3.OperationalError, OSError) as e:
                log.warning("socket ingest failed to write: %s", e)
                raise StoreWriteFailed(f"{self.config.paths.database}: cannot store the text: {e}") from e
        if report.added and self.supervisor.running is None:
            self.wake_check()
        return report

    def state_line(self) -> str:
        snap = self.snapshot()
        if snap.training is not None:
            return f"training: session {snap.training.session_id}"
        if snap.state is State.WAITING:
            return "waiting: " + "; ".join(snap.reasons)
        return "idle"

    # -- helpers ----------------------------------------------------------------------------------

    def guarded_store(self) -> GuardedStore:
        if self.store is None:
            raise Conflict("the store is not open")
        return self.store

    def _record_event(self, kind: str, message: str, detail: dict[str, Any] | None = None) -> None:
        if self.store is None:
            return
        try:
            with self.store as s:
                s.history.record_event(kind, message, detail)
        except Exception:  # history is best effort; never let it stop supervision
            log.exception("cannot record event %r", message)
