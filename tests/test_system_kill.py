"""Issue 15: a trainer killed by a signal pocketd did not send (Android's phantom process killer, the OOM
killer) is recorded as killed by the system, status/history name the likely cause, and repeated kills
make the daemon use fewer torch threads (on Android) while the backoff grows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketd.daemon.client import request
from pocketd.daemon.supervisor import Backoff, Outcome, Trigger
from pocketd.daemon.systemkill import README_SECTION, KillAdaptation, on_android, system_kill_reason
from pocketd.store import Store

from .daemon_helpers import DaemonFactory, add_examples, set_power, wait_for
from .test_daemon_run import Run
from .test_supervisor import fake_info, finish, job, supervisor

README = Path(__file__).resolve().parents[1] / "README.md"


def _kill_from_outside(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    os.kill(pid, sig)  # not the process group: the phantom process killer kills the one process


def test_a_sigkill_we_did_not_send_is_a_system_kill(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--step-s", "0.05")
    sup.android = True
    sup.start(job(tmp_path), 1, Trigger.POLICY)
    _kill_from_outside(fake_info(sup, 1)["pid"])
    done = finish(sup)
    assert done.outcome is Outcome.KILLED_BY_SYSTEM and done.outcome.is_failure
    assert done.exit_status == -signal.SIGKILL
    assert done.end_reason.startswith("killed by the system (SIGKILL, not sent by pocketd): most likely Android's "
                                      "phantom process killer")
    assert f'"{README_SECTION}"' in done.end_reason


def test_a_kill_during_our_stop_is_still_the_systems(tmp_path: Path) -> None:
    """We sent SIGTERM; the child died by SIGKILL before our grace ran out: not ours."""
    sup = supervisor(tmp_path, "--mode", "ignore-term", grace=30)
    sup.start(job(tmp_path), 1, Trigger.POLICY)
    pid = fake_info(sup, 1)["pid"]
    sup.request_stop("charger unplugged")
    _kill_from_outside(pid)
    done = finish(sup)
    assert done.outcome is Outcome.KILLED_BY_SYSTEM
    assert "out-of-memory killer" in done.end_reason  # not Android: the Linux wording


def test_our_own_signals_are_not_system_kills(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--mode", "ignore-term", grace=0.3)
    sup.start(job(tmp_path), 1, Trigger.POLICY)
    fake_info(sup, 1)
    sup.request_stop("test")
    done = finish(sup)
    assert done.outcome is Outcome.KILLED and done.exit_status == -signal.SIGKILL


def test_reasons_and_android_detection() -> None:
    assert "phantom process killer" in system_kill_reason(signal.SIGKILL, android=True)
    assert "journalctl -k" in system_kill_reason(signal.SIGKILL, android=False)
    assert system_kill_reason(signal.SIGSEGV, android=False).endswith("another process signalled it")
    assert on_android({"ANDROID_ROOT": "/system"}, build_prop=Path("/nonexistent"))
    assert on_android({"PREFIX": "/data/data/com.termux/files/usr"}, build_prop=Path("/nonexistent"))
    assert not on_android({"PREFIX": "/usr"}, build_prop=Path("/nonexistent"))


def test_the_readme_section_exists_with_the_mitigations() -> None:
    text = README.read_text()
    section = text[text.index(f"### {README_SECTION}"):].split("\n## ")[0]
    for words in ("Disable child process restrictions", "device_config", "settings put global",
                  "battery optimi", "termux-app issue 2366"):
        assert words.lower() in section.lower(), words


def test_adaptation_halves_threads_on_android_only() -> None:
    a = KillAdaptation(after=2, android=True, configured_threads=None, cpu_count=8)
    assert a.killed() is None and a.threads is None
    said = a.killed()
    assert a.threads == 4 and said is not None and "4 torch threads instead of 8" in said
    a.survived()
    assert a.killed() is None and a.threads == 4  # the count restarts; the lower thread count stays
    assert a.killed() is not None and a.threads == 2
    a.killed(), a.killed()
    assert a.threads == 1
    a.killed()
    assert "cannot lower its CPU use further" in (a.killed() or "")
    linux = KillAdaptation(after=2, android=False, configured_threads=4)
    assert [linux.killed() for _ in range(5)] == [None] * 5 and linux.threads is None
    never = KillAdaptation(after=0, android=True, configured_threads=4)
    assert never.killed() is None and never.threads is None


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def _sessions(d):
    with d.guarded_store() as s:
        return s.history.sessions()


def test_repeated_kills_make_the_daemon_use_fewer_threads(daemons: DaemonFactory) -> None:
    d = daemons("--step-s", "0.05", backoff=Backoff(base_s=0.2, cap_s=1), android=True, start=False,
                daemon={"system_kills_before_adapting": 2})
    d.adaptation.cpu_count = 4
    add_examples(d.config)
    set_power(daemons.power, True)
    d.start()
    jobs = d.supervisor.jobs_dir
    for session in (1, 2):
        info = json.loads(wait_for(lambda: (p := jobs / f"session-{session}.job.json.fake.json").exists() and p,
                                   what=f"session {session}").read_text())
        assert info["threads"] is None  # the configured value (torch's choice)
        _kill_from_outside(info["pid"])
        wait_for(lambda: any(s.id == session and s.ended_at for s in _sessions(d)), what="the kill to be recorded")
    third = json.loads(wait_for(lambda: (p := jobs / "session-3.job.json.fake.json").exists() and p,
                                timeout=15, what="the third session").read_text())
    assert third["threads"] == 2  # halved from 4 after two kills in a row
    with d.guarded_store() as s:
        killed = s.history.events(kind="trainer-killed")
    assert len(killed) == 2
    assert "2 system kills in a row: next sessions use 2 torch threads instead of 4" in killed[0].message
    assert d.backoff.failures >= 2 and d.server.path.exists()  # the daemon survives and backs off


# -- on a real daemon ------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    monkeypatch.setenv("ANDROID_ROOT", "/system")  # what Android sets for every app process, Termux included
    r = Run(tmp_path, monkeypatch)
    yield r
    r.close()


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pocketd.daemon", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_phantom_kill_on_a_real_daemon(run: Run) -> None:
    """`pocketd run` with the fake trainer; SIGKILL the trainer from outside; status and history say why."""
    add_examples(run.config)
    set_power(run.power, True)
    proc = run.start(notify=False)
    st = wait_for(lambda: run.socket.exists() and (r := request(run.socket, "status"))["state"] == "training"
                  and r["training"]["step"] >= 1 and r, timeout=30, what="training")
    trainer_pid, session_id = st["training"]["pid"], st["training"]["session_id"]
    _kill_from_outside(trainer_pid)
    reply = wait_for(lambda: (r := request(run.socket, "status"))["state"] == "waiting" and r, timeout=15,
                     what="the kill to be noticed")
    assert proc.poll() is None  # the daemon survives
    status_text, history_text = _cli("status"), _cli("history")
    print("status after the kill:\n" + status_text + "\nhistory after the kill:\n" + history_text)
    cause = ("killed by the system (SIGKILL, not sent by pocketd): most likely Android's phantom process killer; "
             f'see the README section "{README_SECTION}"')
    assert reply["last_session"]["id"] == session_id and reply["last_session"]["end_reason"].startswith(cause)
    assert any("backing off after a failed session" in r and cause in r for r in reply["reasons"])
    flat = " ".join  # the CLI may wrap long lines to the terminal
    assert cause in flat(status_text.split()) and cause in flat(history_text.split())
    with Store.open(run.config.paths.database) as s:
        last = s.history.sessions()[0]
    assert last.exit_status == -signal.SIGKILL and last.detail["outcome"] == "killed-by-system"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
