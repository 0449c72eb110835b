"""Training supervision: the child process contract, stop/kill, crashes and backoff, with the fake trainer."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketd.daemon.supervisor import Backoff, Outcome, TrainerSupervisor, Trigger, exit_description
from pocketd.trainer.job import TrainingJob

from .daemon_helpers import DaemonFactory, add_examples, fake_trainer_command, set_power, wait_for


def job(tmp_path: Path) -> TrainingJob:
    return TrainingJob(database=tmp_path / "db.sqlite3", cache_dir=tmp_path / "cache", memory_budget_mb=700,
                       max_minutes=3.0)


def supervisor(tmp_path: Path, *args: str, grace: float = 2.0) -> TrainerSupervisor:
    return TrainerSupervisor(command=fake_trainer_command(*args), jobs_dir=tmp_path / "state" / "jobs", nice=5,
                             stop_grace_s=grace)


def fake_info(sup: TrainerSupervisor, session_id: int) -> dict:
    path = sup.jobs_dir / f"session-{session_id}.job.json.fake.json"
    wait_for(path.exists, what="the fake trainer to start")
    return json.loads(path.read_text())


def finish(sup: TrainerSupervisor, timeout: float = 10.0):
    return wait_for(sup.poll, timeout=timeout, what="the trainer to exit")


def test_start_contract_and_clean_stop(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--step-s", "0.05")
    running = sup.start(job(tmp_path), 1, Trigger.POLICY)
    assert stat.S_IMODE(running.job_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sup.jobs_dir.stat().st_mode) == 0o700
    written = TrainingJob.read(running.job_path)
    assert written.status_file == running.status_path and written.memory_budget_mb == 700
    info = fake_info(sup, 1)
    assert info["pid"] == running.pid == info["pgid"] == info["sid"]  # its own session and group
    assert info["nice"] == os.getpriority(os.PRIO_PROCESS, 0) + 5
    assert info["argv"][-2:] == ["--job", str(running.job_path)]
    wait_for(lambda: (s := sup.status()) is not None and s.step >= 2, what="status with steps")
    assert sup.sample_rss() is None or sup.running.peak_rss_mb > 0  # no rss_probe configured here
    assert sup.request_stop("charger unplugged")
    assert sup.request_stop("again") is True  # idempotent: one SIGTERM, first reason kept
    done = finish(sup, timeout=2.0)
    assert done.outcome is Outcome.STOPPED and done.exit_status == 0
    assert done.end_reason == "stopped: charger unplugged"
    assert done.status is not None and done.status.step >= 2 and done.status.end_reason == "stop signal"
    assert done.peak_rss_mb == 55.0  # from the status file
    assert sup.running is None and not running.job_path.exists() and not running.status_path.exists()


def test_trainer_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--mode", "ignore-term", grace=0.5)
    sup.start(job(tmp_path), 2, Trigger.POLICY)
    fake_info(sup, 2)
    start = time.monotonic()
    sup.request_stop("user back (signal)")
    done = finish(sup)
    assert 0.5 <= time.monotonic() - start < 5
    assert done.outcome is Outcome.KILLED and done.exit_status == -signal.SIGKILL
    assert "killed after the grace period (user back (signal))" == done.end_reason


def test_stop_and_wait_kills_a_stubborn_trainer(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--mode", "ignore-term")
    sup.start(job(tmp_path), 3, Trigger.POLICY)
    fake_info(sup, 3)
    done = sup.stop_and_wait("daemon shutdown", grace_s=0.3)
    assert done is not None and done.outcome is Outcome.KILLED
    assert sup.stop_and_wait("nothing runs") is None


@pytest.mark.parametrize(("args", "code", "words"), [
    (("--mode", "crash"), 1, "failed: exit 1 (CRASH)"),
    (("--mode", "exit-code", "--code", "3"), 3, "failed: exit 3 (REFUSED_BUDGET)"),
])
def test_crash_is_a_failed_outcome(tmp_path: Path, args: tuple[str, ...], code: int, words: str) -> None:
    sup = supervisor(tmp_path, *args)
    sup.start(job(tmp_path), 4, Trigger.POLICY)
    done = finish(sup)
    assert done.outcome is Outcome.FAILED and done.exit_status == code and done.end_reason.startswith(words)


def test_finishing_on_its_own(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--steps", "3", "--step-s", "0.01")
    sup.start(job(tmp_path), 5, Trigger.TRAIN_NOW)
    done = finish(sup)
    assert done.outcome is Outcome.FINISHED and done.end_reason == "budget"
    assert done.status.promoted is True and done.status.step == 3


def test_orphans_of_a_dead_daemon_are_stopped(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--step-s", "0.05")
    running = sup.start(job(tmp_path), 6, Trigger.POLICY)
    fake_info(sup, 6)
    successor = supervisor(tmp_path)  # the next daemon, same jobs dir
    assert successor.orphan_pids() == [running.pid]
    successor.terminate_orphan(running.pid)
    assert running.proc.wait(5) == 0  # it got SIGTERM and finished its step


def test_exit_descriptions() -> None:
    assert exit_description(0) == "exit 0 (OK)"
    assert exit_description(-9) == "signal SIGKILL"
    assert exit_description(77) == "exit 77"


def test_backoff_is_exponential_and_capped() -> None:
    now = [100.0]
    b = Backoff(base_s=10, cap_s=35, clock=lambda: now[0])
    assert [b.failed() for _ in range(4)] == [10, 20, 35, 35]
    assert b.remaining_s() == 35
    now[0] += 40
    assert b.remaining_s() == 0
    b.succeeded()
    assert b.failures == 0 and b.failed() == 10


# -- the daemon supervising (in process) --------------------------------------------------------------


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def sessions(d):
    with d.guarded_store() as s:
        return s.history.sessions()


def events(d, kind=None):
    with d.guarded_store() as s:
        return s.history.events(kind=kind)


def test_plugged_starts_unplugged_stops(daemons: DaemonFactory) -> None:
    d = daemons("--step-s", "0.05", start=False)
    add_examples(d.config)
    d.start()
    wait_for(lambda: d.snapshot().state.value == "waiting", what="a first decision")
    assert d.supervisor.running is None and "not charging" in d.snapshot().reasons
    set_power(daemons.power, True)
    d.wake_check()
    running = wait_for(lambda: d.supervisor.running, what="training to start")
    assert running.trigger is Trigger.POLICY
    wait_for(lambda: (s := d.supervisor.status()) is not None and s.step >= 3, what="some steps")
    set_power(daemons.power, False)
    unplugged = time.monotonic()
    wait_for(lambda: d.supervisor.running is None, timeout=5, what="training to stop")
    assert time.monotonic() - unplugged < 2.0  # one supervise tick (0.2 s) plus one step
    last = sessions(d)[0]
    assert last.trigger == "policy" and last.end_reason == "stopped: charger unplugged"
    assert last.exit_status == 0 and last.steps >= 3 and last.loss_first and last.loss_last < last.loss_first
    assert last.peak_rss_mb and last.detail["outcome"] == "stopped"
    kinds = [e.kind for e in events(d)]
    assert "session" in kinds and "stop" in kinds
    # decisions are recorded when they change, not every tick
    time.sleep(1.5)
    decisions = [e.message for e in events(d, "decision")]
    assert all(decisions[i] != decisions[i + 1] for i in range(len(decisions) - 1)), decisions
    assert d.server.path.exists()  # the daemon keeps running


def test_stubborn_trainer_is_killed_by_the_daemon(daemons: DaemonFactory) -> None:
    d = daemons("--mode", "ignore-term", daemon={"stop_grace_s": 0.5}, start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: d.supervisor.running and d.supervisor.status(), what="training")
    set_power(daemons.power, False)
    wait_for(lambda: d.supervisor.running is None, timeout=5, what="the kill")
    last = sessions(d)[0]
    assert last.exit_status == -signal.SIGKILL and last.end_reason.startswith("killed after the grace period")


def test_crash_backs_off_and_retries(daemons: DaemonFactory) -> None:
    d = daemons("--mode", "crash", backoff=Backoff(base_s=1.5, cap_s=10), start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    wait_for(lambda: sessions(d) and sessions(d)[0].ended_at, what="a crashed session")
    first = sessions(d)[0]
    assert first.exit_status == 1 and first.end_reason.startswith("failed: exit 1 (CRASH)")
    snap = d.snapshot()
    assert d.backoff.failures == 1 and snap.backoff_s > 0
    wait_for(lambda: d.snapshot().state.value == "waiting", what="waiting in backoff")
    assert any("backing off" in r for r in d.snapshot().reasons)
    assert len(sessions(d)) == 1  # nothing new during the backoff
    wait_for(lambda: len(sessions(d)) >= 2, timeout=6, what="the retry after the backoff")
    wait_for(lambda: d.backoff.failures >= 2, what="the second failure")
    assert d.backoff.remaining_s() > 1.5  # doubled
    assert [e for e in events(d, "trainer-failed")]
    assert d.server.path.exists()


def test_failing_job_does_not_kill_the_daemon(daemons: DaemonFactory) -> None:
    calls = []

    def flaky(away, pid):
        calls.append(pid)
        if len(calls) <= 2:
            raise OSError("probe exploded")
        from pocketd.daemon.probes import take_readings
        from pocketd.daemon.probes_power import FakePowerProbe

        return take_readings(FakePowerProbe(daemons.power), away=away, trainer_pid=pid)

    d = daemons(readings_source=flaky)
    wait_for(lambda: len(calls) >= 3, timeout=5, what="the check job to run again after failures")
    wait_for(lambda: d.snapshot().state.value == "waiting", what="a decision after the failures")


def test_daemon_shutdown_stops_the_trainer_cleanly(daemons: DaemonFactory) -> None:
    d = daemons("--step-s", "0.05", start=False)
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    running = wait_for(lambda: d.supervisor.running, what="training")
    wait_for(d.supervisor.status, what="the first step")  # its SIGTERM handler is installed
    d.request_shutdown("test")
    d.shutdown()
    assert running.proc.returncode == 0
    from pocketd.store import Store

    with Store.open(d.config.paths.database) as s:
        last = s.history.sessions()[0]
        assert last.end_reason == "stopped: daemon shutdown (test)" and last.exit_status == 0
    assert not d.socket_path.exists()


def test_abandoned_sessions_are_closed_at_start(daemons: DaemonFactory) -> None:
    d = daemons(start=False)
    from pocketd.store import Store

    with Store.open(d.config.paths.database) as s:
        sid = s.history.start_session("policy")
    d.start()
    assert sessions(d)[0].id == sid and sessions(d)[0].end_reason.startswith("abandoned")
