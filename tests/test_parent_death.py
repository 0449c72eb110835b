"""Issue 13 item 6: the trainer dies with its daemon; SIGHUP and SIGUSR1 reach the daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pocketd.daemon.client import DaemonNotRunning, request
from pocketd.daemon.service import socket_path_for
from pocketd.daemon.settings import PocketdConfig
from pocketd.store import Store

from .daemon_helpers import add_examples, fake_trainer_command, set_power, wait_for

# The child side: watch the parent named in the environment, write why it "died" to argv[1], exit.
CHILD = textwrap.dedent("""
    import sys, threading, time
    from pocketd.trainer.parentwatch import watch_parent
    done = threading.Event()
    reasons = []
    watch_parent(lambda r: (reasons.append(r), done.set()))
    open(sys.argv[1] + ".armed", "w").close()
    while not done.wait(0.05):
        pass
    open(sys.argv[1], "w").write(reasons[0])
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_parent_death_signal_alone_stops_the_child(tmp_path: Path) -> None:
    """The pipe's write end stays open here (this test holds it), so only PR_SET_PDEATHSIG can tell."""
    r, w = os.pipe()
    out = tmp_path / "reason"
    parent_src = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, POCKETD_PARENT_FD="{r}", POCKETD_PARENT_PID=str(os.getpid()))
        subprocess.Popen([sys.executable, "-c", {CHILD!r}, {str(out)!r}], env=env, pass_fds=({r},))
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_src], pass_fds=(r,))
    os.close(r)
    try:
        wait_for(lambda: Path(f"{out}.armed").exists(), timeout=30, what="the child to arm its watch")
        parent.kill()
        parent.wait()
        reason = wait_for(lambda: out.exists() and out.read_text(), timeout=30, what="the child to notice")
        assert reason == "the daemon died (parent-death signal)"
    finally:
        os.close(w)
        if parent.poll() is None:
            parent.kill()


def test_the_liveness_pipe_alone_stops_the_child(tmp_path: Path) -> None:
    """No parent-death signal involved: the (fake) daemon closes its end, as the kernel does when it dies."""
    r, w = os.pipe()
    out = tmp_path / "reason"
    env = dict(os.environ, POCKETD_PARENT_FD=str(r), POCKETD_PARENT_PID=str(os.getpid()))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], env=env, pass_fds=(r,))
    os.close(r)
    wait_for(lambda: Path(f"{out}.armed").exists(), timeout=30, what="the child to arm its watch")
    os.close(w)
    assert child.wait(30) == 0
    assert out.read_text() == "the daemon died (liveness pipe closed)"


# -- the daemon, as a real process ---------------------------------------------------------------


class Daemon:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.power = tmp_path / "power.json"
        set_power(self.power, False)
        for name, value in {
            "POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(self.power),
            "POCKETD_POLICY__MAX_LOAD": "1000", "POCKETD_POLICY__MIN_AVAILABLE_MB": "0",
            "POCKETD_POLICY__CHECK_INTERVAL_S": "1", "POCKETD_POLICY__MIN_BATTERY_PERCENT": "0",
            "POCKETD_DAEMON__STOP_GRACE_S": "10",
        }.items():
            monkeypatch.setenv(name, value)
        self.config = PocketdConfig()
        self.socket = socket_path_for(self.config)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, log_name: str = "daemon.log") -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.tmp / log_name
        argv = [sys.executable, "-m", "pocketd.daemon", "run",
                "--trainer-command", " ".join(fake_trainer_command("--step-s", "0.05"))]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, cwd=self.tmp, stdout=log_file, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        wait_for(lambda: self._answers(proc), timeout=30, what="the daemon's socket")
        return proc, log_path

    def _answers(self, proc: subprocess.Popen[bytes]) -> bool:
        assert proc.poll() is None, "the daemon exited"
        try:
            return request(self.socket, "status")["daemon"]["pid"] == proc.pid
        except DaemonNotRunning:
            return False

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    d = Daemon(tmp_path, monkeypatch)
    yield d
    d.close()


def _step(sock: Path) -> int:
    st = request(sock, "status")
    return (st.get("training") or {}).get("step") or 0


def test_a_killed_daemons_trainer_stops_itself_and_the_next_daemon_says_so(daemon: Daemon) -> None:
    add_examples(daemon.config)
    proc, _ = daemon.start()
    reply = request(daemon.socket, "train-now")  # started from a connection thread, which then exits
    trainer_pid = request(daemon.socket, "status")["training"]["pid"]
    # That thread's exit sends the parent-death signal: the trainer must go on (its parent is alive).
    first = wait_for(lambda: _step(daemon.socket), timeout=30, what="a first step")
    wait_for(lambda: _step(daemon.socket) >= first + 20, timeout=60, what="20 more steps")
    job_dir = daemon.config.paths.state_dir / "jobs"
    status_file = job_dir / f"session-{reply['session_id']}.status.json"

    os.kill(proc.pid, signal.SIGKILL)  # no cleanup at all
    proc.wait()
    wait_for(lambda: _gone(trainer_pid), timeout=30, what="the orphaned trainer to stop")
    final = json.loads(status_file.read_text())
    # Either watch may notice first: the liveness pipe's EOF or the parent-death signal.
    assert final["phase"] == "done" and final["end_reason"] in (
        "stopped: the daemon died (liveness pipe closed)", "stopped: the daemon died (parent-death signal)")
    steps = final["step"]
    assert steps >= first + 20

    daemon.start("second.log")
    with Store.open(daemon.config.paths.database) as s:
        sess = next(x for x in s.history.sessions() if x.id == reply["session_id"])
    assert sess.end_reason.startswith("abandoned: the daemon died during the session; its trainer made "
                                      f"{steps} steps (stopped: the daemon died")
    assert sess.steps == steps and sess.checkpoint_id == 7
    assert not status_file.exists()  # the leftovers are cleared once recorded


def test_sighup_is_a_clean_shutdown(daemon: Daemon) -> None:
    add_examples(daemon.config)
    proc, log_path = daemon.start()
    request(daemon.socket, "train-now")
    trainer_pid = request(daemon.socket, "status")["training"]["pid"]
    os.kill(proc.pid, signal.SIGHUP)
    assert proc.wait(30) == 0
    assert not daemon.socket.exists()  # no stale socket
    assert _gone(trainer_pid)
    with Store.open(daemon.config.paths.database) as s:
        assert s.history.sessions()[0].end_reason == "stopped: daemon shutdown (received SIGHUP)"
        assert s.history.events(limit=1)[0].message == "pocketd stopped (received SIGHUP)"
    assert "stopping: received SIGHUP" in log_path.read_text()


def test_sigusr1_logs_a_status_line_and_checks_the_policy(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POCKETD_POLICY__CHECK_INTERVAL_S", "3600")  # only the start and SIGUSR1 check
    proc, log_path = daemon.start()
    wait_for(lambda: "decision: waiting" in log_path.read_text(), timeout=30, what="the first decision")
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for(lambda: "status (SIGUSR1): waiting: " in log_path.read_text(), timeout=30, what="the status line")
    assert proc.poll() is None and request(daemon.socket, "status")["ok"]
    add_examples(daemon.config)
    set_power(daemon.power, True)
    os.kill(proc.pid, signal.SIGUSR1)  # the policy check runs now, not at its next interval
    wait_for(lambda: request(daemon.socket, "status")["state"] == "training", timeout=30, what="training")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
