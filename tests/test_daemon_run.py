"""`pocketd run` as a real process: READY/STOPPING, signals, the socket's life, no torch, idle RSS, CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import cli
from pocketd.daemon.client import request
from pocketd.daemon.service import socket_path_for
from pocketd.daemon.settings import PocketdConfig

from .daemon_helpers import add_examples, fake_trainer_command, set_power, wait_for

IDLE_RSS_LIMIT_MB = 80


class Run:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.power = tmp_path / "power.json"
        set_power(self.power, False)
        for name, value in {
            "POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(self.power),
            "POCKETD_POLICY__MAX_LOAD": "1000", "POCKETD_POLICY__MIN_AVAILABLE_MB": "0",
            "POCKETD_POLICY__CHECK_INTERVAL_S": "1", "POCKETD_POLICY__MIN_BATTERY_PERCENT": "0",
            "POCKETD_DAEMON__STOP_GRACE_S": "5",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("INVOCATION_ID", raising=False)
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        self.config = PocketdConfig()
        self.socket = socket_path_for(self.config)
        self.notify_path = tmp_path / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(15)
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *extra: str, notify: bool = True) -> subprocess.Popen[str]:
        env = dict(os.environ)
        if notify:
            env["NOTIFY_SOCKET"] = str(self.notify_path)
        argv = [sys.executable, "-m", "pocketd.daemon", "run",
                "--trainer-command", " ".join(fake_trainer_command("--step-s", "0.05")), *extra]
        proc = subprocess.Popen(argv, cwd=self.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.procs.append(proc)
        return proc

    def message(self, assignment: str) -> str:
        """The next notify message holding `assignment` (READY=1, STOPPING=1); STATUS-only ones are skipped."""
        while True:
            msg = self.notify.recv(4096).decode()
            if assignment in msg.split("\n"):
                return msg

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.notify.close()


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    r = Run(tmp_path, monkeypatch)
    yield r
    r.close()


def test_run_ready_status_sigterm(run: Run) -> None:
    proc = run.start()
    ready = run.message("READY=1")
    assert ready.startswith("READY=1\nSTATUS=")
    st = request(run.socket, "status")
    assert st["daemon"]["pid"] == proc.pid
    # the idle daemon never imports torch or transformers, stays small, and has no TCP/UDP socket
    assert st["debug"] == {"torch_loaded": False, "transformers_loaded": False, "threads": st["debug"]["threads"]}
    wait_for(lambda: request(run.socket, "status")["state"] == "waiting", what="a decision")
    rss = psutil.Process(proc.pid).memory_info().rss / 2**20
    print(f"idle daemon RSS: {rss:.1f} MiB (status says {st['daemon']['rss_mb']} MiB)")
    assert rss < IDLE_RSS_LIMIT_MB
    assert psutil.Process(proc.pid).net_connections(kind="inet") == []
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    assert run.message("STOPPING=1").startswith("STOPPING=1\nSTATUS=stopping: received SIGTERM")
    assert not run.socket.exists()
    out = proc.stdout.read()
    assert "pocketd running" in out and "pocketd stopped" in out
    # a supervisor (NOTIFY_SOCKET) adds timestamps, so the daemon does not
    assert all(line.split(" ", 1)[0] in {"INFO", "WARNING", "ERROR", "DEBUG"} for line in out.splitlines() if line)


def test_second_daemon_refuses_to_start(run: Run) -> None:
    first = run.start()
    run.message("READY=1")
    second = run.start(notify=False)
    assert second.wait(30) == 1
    assert f"pocketd is already running (socket {run.socket})" in second.stderr.read()
    assert request(run.socket, "status")["daemon"]["pid"] == first.pid
    first.send_signal(signal.SIGINT)
    assert first.wait(15) == 0
    assert not run.socket.exists()


def test_trainer_stopped_when_the_daemon_is(run: Run) -> None:
    add_examples(run.config)
    set_power(run.power, True)
    proc = run.start(notify=False)
    st = wait_for(lambda: run.socket.exists() and (r := request(run.socket, "status"))["state"] == "training"
                  and r["training"]["step"] >= 2 and r, timeout=20, what="training")
    trainer_pid = st["training"]["pid"]
    assert psutil.Process(trainer_pid).nice() == psutil.Process(proc.pid).nice() + 10
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not psutil.pid_exists(trainer_pid) or psutil.Process(trainer_pid).status() == psutil.STATUS_ZOMBIE
    from pocketd.store import Store

    with Store.open(run.config.paths.database) as s:
        last = s.history.sessions()[0]
    assert last.end_reason.startswith("stopped: daemon shutdown (received SIGTERM)") and last.exit_status == 0
    assert last.steps >= 2


def test_cli_client_commands(run: Run) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["status"])
    assert result.exit_code == 3
    assert "pocketd is not running (no socket at" in result.output and "start it with `pocketd run`" in result.output
    proc = run.start(notify=False)
    wait_for(lambda: run.socket.exists() and request(run.socket, "status")["state"] == "waiting", timeout=20,
             what="the daemon")
    result = runner.invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("waiting: not charging; no new examples (0 < 1)")
    assert '"state": "waiting"' in runner.invoke(cli, ["status", "--json"]).output
    assert runner.invoke(cli, ["pause"]).output.strip() == "paused"
    assert runner.invoke(cli, ["status"]).output.startswith("waiting: paused")
    assert runner.invoke(cli, ["resume"]).output.strip() == "resumed"
    assert runner.invoke(cli, ["signal", "--away", "--for", "30"]).output.startswith("away until ")
    assert runner.invoke(cli, ["signal", "--back"]).output.strip() == "back"
    result = runner.invoke(cli, ["stop-training"])
    assert result.exit_code == 1 and "pocketd: error: not training" in result.output
    assert "events:" in runner.invoke(cli, ["history"]).output
    assert runner.invoke(cli, ["shutdown"]).output.strip() == "pocketd is stopping"
    assert proc.wait(15) == 0
