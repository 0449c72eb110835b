"""The training child process: start it niced in its own session, watch it, stop it, reap it.

The supervisor knows processes, not the store or the policy: the daemon (service.py)
decides when to start and stop and records sessions. Stopping is SIGTERM to the
child's process group (the trainer finishes its step, commits and exits 0), then
SIGKILL after the grace period. Crashes are backed off exponentially. A child that dies by a
signal the supervisor did not send (SIGTERM only after `request_stop`, SIGKILL only after the
grace) is KILLED_BY_SYSTEM, with the likely cause named (systemkill.py: on Android the phantom
process killer, elsewhere the OOM killer).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from pydantic import ValidationError

from pocketd.store import atomic_write, make_private_dir, tighten_dir
from pocketd.store.private import TMP_SUFFIX
from pocketd.trainer.job import ExitCode, SessionStatus, TrainingJob
from pocketd.trainer.parentwatch import child_environment

from .systemkill import system_kill_reason

log = logging.getLogger(__name__)

RssProbe = Callable[[int], "float | None"]


class Trigger(str, Enum):
    POLICY = "policy"  # the policy check said train
    TRAIN_NOW = "train-now"  # the user asked (`pocketd train-now`)


class Outcome(str, Enum):
    FINISHED = "finished"  # exit 0 on its own (budget reached, nothing to train, ...)
    STOPPED = "stopped"  # exit after our SIGTERM
    KILLED = "killed"  # did not exit within the grace period: SIGKILL
    FAILED = "failed"  # non-zero exit
    KILLED_BY_SYSTEM = "killed-by-system"  # died by a signal we did not send (Android's phantom process killer, OOM)

    @property
    def is_failure(self) -> bool:
        return self in (Outcome.FAILED, Outcome.KILLED_BY_SYSTEM)


class TrainerStartError(Exception):
    """The trainer child could not be started."""


@dataclass
class RunningSession:
    session_id: int
    trigger: Trigger
    proc: subprocess.Popen[bytes]
    job_path: Path
    status_path: Path
    started_at: datetime
    started_mono: float
    peak_rss_mb: float | None = None
    last_rss_mb: float | None = None
    stop_reason: str | None = None
    term_sent_mono: float | None = None
    killed: bool = False
    liveness_fd: int | None = None  # the write end of the child's liveness pipe (trainer.parentwatch)

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(frozen=True)
class FinishedSession:
    session_id: int
    trigger: Trigger
    outcome: Outcome
    exit_status: int  # the return code; -N for a signal
    end_reason: str  # a sentence for history: "stopped: charger unplugged", "crashed: exit 1 (CRASH)"
    status: SessionStatus | None
    peak_rss_mb: float | None
    duration_s: float


@dataclass
class Backoff:
    """Exponential backoff after failed sessions: base, 2*base, 4*base, ... capped."""

    base_s: float = 60.0
    cap_s: float = 3600.0
    failures: int = 0
    until_mono: float = 0.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def failed(self) -> float:
        delay = min(self.cap_s, self.base_s * (2 ** self.failures))
        self.failures += 1
        self.until_mono = self.clock() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.until_mono = 0.0

    def remaining_s(self) -> float:
        return max(0.0, self.until_mono - self.clock())


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    try:
        return f"exit {code} ({ExitCode(code).name})"
    except ValueError:
        return f"exit {code}"


def read_status(path: Path) -> SessionStatus | None:
    """The trainer's last SessionStatus, or None if not written yet or unreadable."""
    try:
        return SessionStatus.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as e:
        log.debug("cannot read trainer status %s: %s", path, e)
        return None


class TrainerSupervisor:
    """At most one trainer child at a time. Thread-safe."""

    def __init__(
        self,
        *,
        command: Sequence[str],
        jobs_dir: Path,
        nice: int = 10,
        stop_grace_s: float = 60.0,
        rss_probe: RssProbe | None = None,
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        android: bool = False,
    ) -> None:
        """`android`: name Android's phantom process killer as the likely cause of a kill we did not send."""
        self.command = list(command)
        self.android = android
        self.jobs_dir = jobs_dir
        self.nice = nice
        self.stop_grace_s = stop_grace_s
        self.rss_probe = rss_probe
        self.env = env
        self.clock = clock
        self._lock = threading.RLock()
        self._running: RunningSession | None = None

    @property
    def running(self) -> RunningSession | None:
        with self._lock:
            return self._running

    def start(self, job: TrainingJob, session_id: int, trigger: Trigger) -> RunningSession:
        """Write the job file (0600) and start `command --job FILE` niced, in a new session."""
        with self._lock:
            if self._running is not None:
                raise TrainerStartError(f"a trainer is already running (pid {self._running.pid})")
            tighten_dir(make_private_dir(self.jobs_dir))
            job_path = self.jobs_dir / f"session-{session_id}.job.json"
            status_path = self.jobs_dir / f"session-{session_id}.status.json"
            status_path.unlink(missing_ok=True)
            job = job.model_copy(update={"status_file": status_path})
            job.write(job_path)
            argv = [*self.command, "--job", str(job_path)]
            # The child watches the read end: EOF means this process died (trainer.parentwatch).
            # Both ends are close-on-exec; pass_fds hands the read end to this child only.
            alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
            try:
                proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                    argv,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: signals reach the whole tree
                    env=child_environment(dict(os.environ if self.env is None else self.env), alive_r),
                    close_fds=True,
                    pass_fds=(alive_r,),
                )
            except OSError as e:
                os.close(alive_w)
                job_path.unlink(missing_ok=True)
                raise TrainerStartError(f"cannot start the trainer ({argv[0]}): {e.strerror or e}") from e
            finally:
                os.close(alive_r)
            self._renice(proc.pid)
            atomic_write(self._pid_path(session_id), f"{proc.pid}\n")
            self._running = RunningSession(
                session_id=session_id, trigger=trigger, proc=proc, job_path=job_path, status_path=status_path,
                started_at=datetime.now(timezone.utc), started_mono=self.clock(), liveness_fd=alive_w,
            )
            log.info("trainer started: session %d, pid %d (%s)", session_id, proc.pid, trigger.value)
            return self._running

    def _pid_path(self, session_id: int) -> Path:
        return self.jobs_dir / f"session-{session_id}.pid"

    def _renice(self, pid: int) -> None:
        """Set the child's niceness from here: preexec_fn is unsafe in a threaded process.

        The child spends its first seconds importing torch, so the brief window at the
        daemon's own priority does not matter.
        """
        if self.nice <= 0:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice))
        except OSError as e:
            log.warning("cannot renice the trainer (pid %d): %s", pid, e)

    def status(self) -> SessionStatus | None:
        running = self.running
        return read_status(running.status_path) if running else None

    def note_rss(self, rss_mb: float) -> None:
        """Remember an RSS sample of the running child (the peak goes to history)."""
        with self._lock:
            running = self._running
            if running is not None:
                running.last_rss_mb = rss_mb
                running.peak_rss_mb = max(rss_mb, running.peak_rss_mb or 0.0)

    def sample_rss(self) -> float | None:
        """Sample the child's process-tree RSS with `rss_probe` and remember it."""
        running = self.running
        if running is None or self.rss_probe is None:
            return None
        rss = self.rss_probe(running.pid)
        if rss is not None:
            self.note_rss(rss)
        return rss

    # -- orphans of a daemon that died ------------------------------------------------------

    def orphan_pids(self) -> list[int]:
        """Trainers still running from job files a previous daemon left behind (their pid files match).

        Their files stay until `remove_leftovers` (the last status tells how far each session got).
        """
        out: list[int] = []
        if not self.jobs_dir.is_dir():
            return out
        for pid_path in sorted(self.jobs_dir.glob("session-*.pid")):
            pid = _read_pid(pid_path)
            if pid > 0 and _runs_job(pid, pid_path.with_suffix(".job.json")):
                out.append(pid)
        return out

    def leftover_status(self, session_id: int) -> SessionStatus | None:
        """The last status a previous daemon's trainer wrote for `session_id` (None if there is none)."""
        return read_status(self.jobs_dir / f"session-{session_id}.status.json")

    def remove_leftovers(self) -> None:
        """Remove the job, pid and status files of sessions whose trainer no longer runs (not ours)."""
        if not self.jobs_dir.is_dir():
            return
        running = self.running
        for pid_path in sorted(self.jobs_dir.glob("session-*.pid")):
            pid = _read_pid(pid_path)
            job_path = pid_path.with_suffix(".job.json")
            if (running is not None and running.pid == pid) or (pid > 0 and _runs_job(pid, job_path)):
                continue
            for leftover in (pid_path, job_path, pid_path.with_suffix(".status.json")):
                leftover.unlink(missing_ok=True)

    def terminate_orphan(self, pid: int) -> None:
        """SIGTERM an orphaned trainer's group, SIGKILL it after the grace period."""
        for sig, wait_s in ((signal.SIGTERM, self.stop_grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except OSError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return
                time.sleep(0.1)

    def request_stop(self, reason: str) -> bool:
        """SIGTERM the trainer's process group (once); SIGKILL follows in poll() after the grace period."""
        with self._lock:
            running = self._running
            if running is None:
                return False
            if running.term_sent_mono is None:
                running.stop_reason = reason
                running.term_sent_mono = self.clock()
                log.info("stopping the trainer (pid %d): %s", running.pid, reason)
                self._signal(running, signal.SIGTERM)
            return True

    def poll(self) -> FinishedSession | None:
        """Reap the child if it exited (returning how), or SIGKILL it once its grace period is over."""
        with self._lock:
            running = self._running
            if running is None:
                return None
            code = running.proc.poll()
            if code is None:
                if (running.term_sent_mono is not None and not running.killed
                        and self.clock() - running.term_sent_mono >= self.stop_grace_s):
                    log.warning("trainer (pid %d) still running %.0f s after SIGTERM: SIGKILL",
                                running.pid, self.stop_grace_s)
                    running.killed = True
                    self._signal(running, signal.SIGKILL)
                return None
            return self._finish(running, code)

    def stop_and_wait(self, reason: str, grace_s: float | None = None) -> FinishedSession | None:
        """Stop the trainer and wait for it (SIGKILL after the grace period): for daemon shutdown."""
        grace = self.stop_grace_s if grace_s is None else grace_s
        if not self.request_stop(reason):
            return None
        running = self.running
        if running is None:
            return None
        try:
            running.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with self._lock:
                running.killed = True
                log.warning("trainer (pid %d) did not stop within %.0f s: SIGKILL", running.pid, grace)
                self._signal(running, signal.SIGKILL)
            running.proc.wait()
        return self.poll()

    def _signal(self, running: RunningSession, sig: signal.Signals) -> None:
        try:
            os.killpg(running.pid, sig)  # pgid == pid (start_new_session)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                running.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _finish(self, running: RunningSession, code: int) -> FinishedSession:
        if running.killed:
            try:  # leftovers of the group, if any
                os.killpg(running.pid, signal.SIGKILL)
            except OSError:
                pass
        status = read_status(running.status_path)
        peak = max((x for x in (running.peak_rss_mb, status.peak_rss_mb if status else None) if x is not None),
                   default=None)
        outcome, reason = self._classify(running, code, status, android=self.android)
        finished = FinishedSession(
            session_id=running.session_id, trigger=running.trigger, outcome=outcome, exit_status=code,
            end_reason=reason, status=status, peak_rss_mb=peak,
            duration_s=self.clock() - running.started_mono,
        )
        log_fn = log.warning if outcome.is_failure else log.info
        log_fn("trainer session %d ended: %s (%s, %.0f s)", running.session_id, reason,
               exit_description(code), finished.duration_s)
        if running.liveness_fd is not None:
            os.close(running.liveness_fd)
            running.liveness_fd = None
        for path in (running.job_path, running.status_path, self._pid_path(running.session_id)):
            path.unlink(missing_ok=True)
        for tmp in self.jobs_dir.glob(f".session-{running.session_id}.*{TMP_SUFFIX}"):  # a write cut by SIGKILL
            tmp.unlink(missing_ok=True)
        self._running = None
        return finished

    @staticmethod
    def _classify(running: RunningSession, code: int, status: SessionStatus | None,
                  android: bool = False) -> tuple[Outcome, str]:
        if code < 0 and not _sent_by_us(running, -code):
            return Outcome.KILLED_BY_SYSTEM, system_kill_reason(-code, android=android)
        if running.killed:
            return Outcome.KILLED, f"killed after the grace period ({running.stop_reason})"
        if running.stop_reason is not None and (code == ExitCode.OK or code == -signal.SIGTERM):
            return Outcome.STOPPED, f"stopped: {running.stop_reason}"
        if code == ExitCode.OK:
            return Outcome.FINISHED, (status.end_reason if status and status.end_reason else "finished")
        detail = status.end_reason if status and status.end_reason else None
        if code == ExitCode.REFUSED_BUDGET:  # the trainer's message names the setting; say it in words too
            detail = "the memory budget is too small" + (f": {detail}" if detail else "")
        text = f"failed: {exit_description(code)}" + (f": {detail}" if detail else "")
        return Outcome.FAILED, text


def _sent_by_us(running: RunningSession, sig: int) -> bool:
    """Whether the supervisor sent `sig` to this trainer (SIGTERM to stop it, SIGKILL after the grace)."""
    return ((sig == signal.SIGTERM and running.term_sent_mono is not None)
            or (sig == signal.SIGKILL and running.killed))


def _read_pid(path: Path) -> int:
    """The pid in a pid file; 0 if unreadable or not a positive number."""
    try:
        pid = int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return 0
    return pid if 0 < pid < 1 << 22 else 0


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _runs_job(pid: int, job_path: Path) -> bool:
    """Whether process `pid` is a trainer running `job_path` (not a recycled pid)."""
    try:
        import psutil

        return str(job_path) in psutil.Process(pid).cmdline()
    except Exception:
        return False
