"""The README's control-socket examples (`socat`, `nc -U -N`), run exactly as written against a real
`pocketd run`: `version`, request ids, pipelined requests, a `watch` stream and an interactive session
that stays open longer than a request may take. An example whose tool is not installed is skipped
(`apt-get install socat netcat-openbsd`, `pkg install socat netcat-openbsd` on Termux)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pocketd.daemon.client import request

from .daemon_helpers import set_power, wait_for

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
SECTION = README.split("## The control socket", 1)[1].split("\n## ", 1)[0]
BLOCK = re.findall(r"^```sh\n(.*?)^```$", SECTION, flags=re.S | re.M)[0]
SETUP = [line for line in BLOCK.splitlines() if re.match(r"^\w+=", line)]
EXAMPLES = [line for line in BLOCK.splitlines() if line.strip() and line not in SETUP]
REQUEST_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real daemon (fake charger unplugged: it stays idle) and the environment the examples run in."""
    root = tmp_path_factory.mktemp("sx")
    home = root / "home"
    home.mkdir()
    (root / "run").mkdir(mode=0o700)
    set_power(root / "power.json", False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETD_") and k != "NOTIFY_SOCKET"}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_STATE_HOME=str(home / ".local/state"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_RUNTIME_DIR=str(root / "run"), POCKETD_DAEMON__POWER_PROBE="fake",
               POCKETD_DAEMON__FAKE_POWER_FILE=str(root / "power.json"),
               POCKETD_DAEMON__REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S))
    sock = root / "run" / "pocketd" / "pocketd.sock"
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "run"], env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or _answers(sock), timeout=60, what="the daemon's socket")
        assert proc.poll() is None, (root / "daemon.log").read_text()
        env["SOCK"] = str(sock)
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (root / "daemon.log").read_text()[-3000:]


def _answers(sock: Path) -> bool:
    try:
        return bool(request(sock, "status", timeout_s=5)["ok"])
    except Exception:
        return False


def tool_of(example: str) -> str:
    return "socat" if "socat" in example else "nc"


def script(example: str) -> str:
    return "\n".join([*SETUP, example]) + "\n"


def replies(out: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines and all(isinstance(r, dict) and r["ok"] is True for r in lines), out
    return lines


def test_the_readme_has_the_examples() -> None:
    assert SETUP == ["S=$XDG_RUNTIME_DIR/pocketd/pocketd.sock   # on Termux: $PREFIX/var/run/pocketd/pocketd.sock"]
    assert any("version" in e and "socat" in e for e in EXAMPLES)
    assert any("watch" in e and "nc -U -N" in e for e in EXAMPLES)
    assert any('"id"' in e and "nc -U -N" in e for e in EXAMPLES)
    assert any(e.startswith("socat - UNIX-CONNECT:$S") for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES)
def test_readme_socket_example(daemon: dict[str, str], example: str) -> None:
    tool = tool_of(example)
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install socat netcat-openbsd)")
    if '"watch"' in example:
        watch_example(daemon, example)
    elif "|" not in example:
        interactive_example(daemon, example)
    else:
        out = subprocess.run(["sh", "-c", script(example)], env=daemon, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = replies(out.stdout)
        if '"version"' in example:
            assert got[0]["protocol"] >= 2 and {c["name"] for c in got[0]["commands"]} >= {"status", "watch"}
        if '"id"' in example:
            assert [r["id"] for r in got] == [1, 2, 3]
            assert got[1]["paused"] is True and got[2]["paused"] is False


def watch_example(env: dict[str, str], example: str) -> None:
    """The stream: the status, a line for a change made meanwhile (pause), a heartbeat; then Ctrl-C."""
    proc = subprocess.Popen(["sh", "-c", script(example)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines: list[dict[str, Any]] = []
    got_first, done = threading.Event(), threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))
            got_first.set()
            if any(x.get("paused") for x in lines) and any(x["event"] == "heartbeat" for x in lines):
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert got_first.wait(30), "no first status line"
        request(Path(env["SOCK"]), "pause")
        assert done.wait(60), lines
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(30)
        request(Path(env["SOCK"]), "resume")
    assert lines[0]["event"] == "status" and lines[0]["paused"] is False
    assert all(line["ok"] is True and line["event"] in {"status", "heartbeat"} for line in lines)


def interactive_example(env: dict[str, str], example: str) -> None:
    """Requests typed one by one, with a pause longer than a request may take in between."""
    proc = subprocess.Popen(["sh", "-c", script(example)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write('{"cmd": "version", "id": "a"}\n')
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["id"] == "a"
        threading.Event().wait(2 * REQUEST_TIMEOUT_S)  # idle longer than one request may take
        proc.stdin.write('{"cmd": "status", "id": "b"}\n')
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        assert reply["id"] == "b" and reply["state"] in {"idle", "waiting"}
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
