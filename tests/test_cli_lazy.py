"""A client that answers at once: commands load lazily, and the client commands (`pocketd status`,
`pause`, `resume`, `signal`, `history`, ...) import only the client, not the store, the daemon's
service, the configuration models or logging, while their output and errors stay as they were."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import click
import platformdirs
import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import CLIENT_COMMANDS, COMMAND_TABLE, cli, load_command
from pocketd.daemon.cli_context import AppContext
from pocketd.daemon.locations import (
    CONFIG_NAME,
    Endpoint,
    default_config_path,
    default_endpoint,
    default_runtime_dir,
    socket_path,
)
from pocketd.daemon.statusfmt import format_history, format_status
from pocketd.daemon.wire import SOCKET_NAME, encode, unix_address

DAEMON_DIR = Path(__file__).resolve().parent.parent / "daemon"
# What a client command must not load (the issue's list, and what made `pocketd status` slow).
HEAVY = ("sqlite_utils", "pocketd.daemon.service", "torch", "transformers", "apscheduler", "psutil", "pydantic",
         "pocketd.store", "pocketd.ingest", "pocketd.daemon.config", "pocketd.daemon.protocol", "platformdirs",
         "logging")
COMMAND_MODULES = ("cli_config", "cli_data", "cli_train", "cli_daemon", "cli_service", "cli_model")

STATUS_REPLY: dict[str, Any] = {
    "ok": True, "state": "waiting", "paused": False, "reasons": ["not charging", "load 2.10 > 1.50"],
    "data": {"documents": 3, "examples": 9, "untrained_examples": 4},
    "checkpoint": {"id": 2, "method": "mezo", "steps": 150, "val_loss": 3.02},
    "last_session": None,
    "readings": {"now": "2025-01-01T11:00:00+00:00", "load1": 2.1, "available_mb": 2048.0,
                 "power": {"on_power": False, "percent": 80.0, "has_battery": True}},
    "backoff": {"failures": 0, "remaining_s": 0}, "away": {"active": None},
    "daemon": {"pid": 1, "uptime_s": 7200, "rss_mb": 45.2, "version": "0.1.0"},
}
HISTORY_REPLY: dict[str, Any] = {
    "ok": True,
    "sessions": [{"id": 4, "started_at": "2025-01-01T10:00:00+00:00", "trigger": "policy",
                  "end_reason": "budget", "steps": 20, "loss_first": 3.5, "loss_last": 3.1, "promoted": True}],
    "events": [{"at": "2025-01-01T10:30:00+00:00", "kind": "session", "message": "session 4 ended"}],
}
REPLIES: dict[str, dict[str, Any]] = {
    "status": STATUS_REPLY, "history": HISTORY_REPLY, "pause": {"ok": True, "changed": True},
    "resume": {"ok": True, "changed": False}, "signal": {"ok": True, "expires_at": "2025-01-01T12:00:00+00:00"},
}

# Runs the CLI like the console script, then reports which modules it loaded.
WRAPPER = """
import json, sys
sys.argv = ["pocketd", *sys.argv[1:]]
code = 0
try:
    from pocketd.daemon.cli import main
    main()
except SystemExit as e:
    code = e.code
sys.stdout.flush()
sys.stderr.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
sys.exit(code)
"""


class FakeDaemon:
    """A control socket that answers each request line with a canned reply, in a thread; records requests."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with unix_address(path) as addr:
            self._sock.bind(addr)
        self._sock.listen(8)
        self._sock.settimeout(0.1)  # the accept loop's chance to see `close`, not a wait for a result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                buffer = b""
                while b"\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buffer += chunk
                request = json.loads(buffer.partition(b"\n")[0])
                self.requests.append(request)
                conn.sendall(encode(REPLIES.get(request["cmd"], {"ok": True})))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._sock.close()


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Any:
    daemon = FakeDaemon(tmp_path / "run" / "pocketd" / SOCKET_NAME)  # the default: $XDG_RUNTIME_DIR/pocketd
    yield daemon
    daemon.close()


def run_pocketd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str, list[str]]:
    """`pocketd ARGS` in a fresh interpreter: exit status, stdout, stderr, the modules it loaded."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=120,
                          env=env if env is not None else dict(os.environ), stdin=subprocess.DEVNULL)
    err, sep, modules = proc.stderr.rpartition("\nMODULES ")
    assert sep, proc.stderr[-3000:]
    return proc.returncode, proc.stdout, err, json.loads(modules)


def heavy_loaded(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


# -- the client commands -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "request_sent", "output"), [
    (["status"], {"cmd": "status"}, format_status(STATUS_REPLY) + "\n"),
    (["status", "--json"], {"cmd": "status"}, json.dumps(STATUS_REPLY, indent=2, ensure_ascii=False) + "\n"),
    (["pause"], {"cmd": "pause"}, "paused\n"),
    (["resume"], {"cmd": "resume"}, "not paused\n"),
    (["history", "-n", "3"], {"cmd": "history", "sessions": 3, "events": 20}, format_history(HISTORY_REPLY) + "\n"),
    (["signal", "--away", "--for", "5"], {"cmd": "signal", "away": True, "expires_in_s": 300.0},
     "away until 2025-01-01T12:00:00+00:00\n"),
])
def test_client_commands_load_only_the_client(fake_daemon: FakeDaemon, args: list[str],
                                              request_sent: dict[str, Any], output: str) -> None:
    code, out, err, modules = run_pocketd(*args)
    assert (code, err) == (0, ""), err
    assert out == output
    assert fake_daemon.requests == [request_sent]
    assert heavy_loaded(modules) == []
    assert not [m for m in modules if m.startswith("pocketd.daemon.cli_") and m not in
                ("pocketd.daemon.cli_context", "pocketd.daemon.cli_daemon")]


def test_not_running_is_exit_3_and_light(tmp_path: Path) -> None:
    code, out, err, modules = run_pocketd("status")
    sock = tmp_path / "run" / "pocketd" / SOCKET_NAME
    assert (code, out) == (3, "")
    assert err == f"pocketd: pocketd is not running (no socket at {sock}); start it with `pocketd run`\n"
    assert heavy_loaded(modules) == []


@pytest.mark.parametrize("how", ["file", "env", "set"])
def test_a_configured_socket_is_used(tmp_path: Path, isolated_home: Path, how: str) -> None:
    other = tmp_path / "elsewhere" / "control.sock"
    daemon = FakeDaemon(other)
    env, args = dict(os.environ), ["status"]
    if how == "file":
        write_default_config(f'[daemon]\nsocket_path = "{other}"\n')
    elif how == "env":
        env["POCKETD_DAEMON__SOCKET_PATH"] = str(other)
    else:
        args = ["--set", f"daemon.socket_path={other}", "status"]
    try:
        code, out, err, _ = run_pocketd(*args, env=env)
    finally:
        daemon.close()
    assert (code, err) == (0, ""), err
    assert out == format_status(STATUS_REPLY) + "\n"
    assert daemon.requests == [{"cmd": "status"}]


def test_an_invalid_config_file_is_still_refused_with_the_field(fake_daemon: FakeDaemon) -> None:
    write_default_config("[daemon]\nrequest_timeout_s = -1\n")
    code, out, err, _ = run_pocketd("status")
    assert (code, out) == (1, "")
    assert err.startswith("pocketd: error: invalid configuration:") and "daemon.request_timeout_s" in err, err
    assert fake_daemon.requests == []


def test_an_invalid_setting_elsewhere_in_the_file_is_refused_too(fake_daemon: FakeDaemon) -> None:
    write_default_config("[policy]\nmax_load = -3\n")
    code, _, err, _ = run_pocketd("pause")
    assert code == 1 and "policy.max_load" in err, err
    assert fake_daemon.requests == []


def test_a_malformed_pocketd_variable_is_refused(fake_daemon: FakeDaemon) -> None:
    code, _, err, _ = run_pocketd("status", env={**os.environ, "POCKETD_NOPE": "1"})
    assert code == 1 and err.startswith("pocketd: error: POCKETD_NOPE: expected POCKETD_<SECTION>__<FIELD>"), err
    assert fake_daemon.requests == []


def write_default_config(text: str) -> Path:
    path = default_config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- the endpoint without the config loader --------------------------------------------------------------------


def test_the_quick_endpoint_is_the_loaded_configs() -> None:
    from pocketd.daemon.config import load_config
    from pocketd.daemon.settings import DaemonConfig

    config = load_config().config
    loaded = Endpoint(socket_path(config.daemon.socket_path, config.paths.runtime_dir), config.daemon.request_timeout_s)
    assert default_endpoint(None, []) == loaded
    assert AppContext(None, []).endpoint() == loaded
    assert config.paths.runtime_dir == default_runtime_dir()
    assert loaded.request_timeout_s == DaemonConfig().request_timeout_s


@pytest.mark.parametrize(("config_path", "overrides", "env"), [
    (Path("/x/config.toml"), [], {}),
    (None, ["daemon.request_timeout_s=3"], {}),
    (None, [], {"POCKETD_CONFIG": "/x/config.toml"}),
    (None, [], {"POCKETD_DAEMON__REQUEST_TIMEOUT_S": "3"}),
])
def test_anything_configured_means_loading_the_config(monkeypatch: pytest.MonkeyPatch, config_path: Path | None,
                                                      overrides: list[str], env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_endpoint(config_path, overrides) is None


def test_a_default_config_file_means_loading_the_config() -> None:
    assert default_endpoint(None, []) is not None
    write_default_config("")
    assert default_endpoint(None, []) is None


@pytest.mark.parametrize("env", [
    {},
    {"XDG_CONFIG_HOME": None},
    {"XDG_CONFIG_HOME": ""},
    {"XDG_CONFIG_HOME": "relative/dir"},
    {"XDG_CONFIG_HOME": "   "},
    {"XDG_CONFIG_HOME": "/abs/with/slash/"},
    {"XDG_CONFIG_HOME": None, "HOME": "/"},
    {"XDG_CONFIG_HOME": None, "HOME": "relative-home"},
    {"XDG_CONFIG_HOME": None, "ANDROID_DATA": "/data", "ANDROID_ROOT": "/system",
     "PREFIX": "/data/data/com.termux/files/usr"},
    {"ANDROID_DATA": "/data", "ANDROID_ROOT": "/system", "SHELL": None, "PREFIX": None},
])
def test_the_default_config_path_is_platformdirs(monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    try:
        expected: Path | str = Path(platformdirs.user_config_dir("pocketd")) / CONFIG_NAME
    except RuntimeError as e:  # newer platformdirs refuse a relative HOME
        expected = str(e)
    try:
        got: Path | str = default_config_path()
    except RuntimeError as e:
        got = str(e)
    assert got == expected


# -- lazy registration -----------------------------------------------------------------------------------------------


def test_the_table_names_every_command_of_every_module() -> None:
    modules = sorted(p.stem for p in DAEMON_DIR.glob("cli_*.py") if p.stem != "cli_context")
    assert modules == sorted(COMMAND_MODULES)
    real: dict[str, str] = {}
    for name in modules:
        for command in importlib.import_module(f"pocketd.daemon.{name}").COMMANDS:
            assert command.name not in real, f"{command.name} is defined twice"
            real[command.name] = name
    assert {name: entry.module for name, entry in COMMAND_TABLE.items()} == real
    assert CLIENT_COMMANDS <= {name for name, module in real.items() if module == "cli_daemon"}


@pytest.mark.parametrize("name", sorted(COMMAND_TABLE))
def test_the_tables_help_shortens_like_the_commands_own(name: str) -> None:
    command = load_command(name, COMMAND_TABLE[name])
    assert not command.hidden and not command.deprecated and not command.short_help
    stub = click.Command(name, help=COMMAND_TABLE[name].help)
    for limit in range(0, 160):
        assert stub.get_short_help_str(limit) == command.get_short_help_str(limit), (name, limit)


@pytest.mark.parametrize("width", [40, 80, 120])
def test_the_command_list_is_the_one_click_would_print(width: int) -> None:
    plain = click.Group("pocketd", commands={n: load_command(n, e) for n, e in COMMAND_TABLE.items()})

    def listing(group: click.Group) -> str:
        formatter = click.HelpFormatter(width=width)
        group.format_commands(click.Context(group), formatter)
        return formatter.getvalue()

    assert listing(cli) == listing(plain)
    assert cli.list_commands(click.Context(cli)) == sorted(COMMAND_TABLE)


def test_help_lists_every_command_and_imports_none() -> None:
    code, out, err, modules = run_pocketd("--help")
    assert (code, err) == (0, "")
    listed = out.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == sorted(COMMAND_TABLE)
    assert not [m for m in modules if m.startswith("pocketd.daemon.cli_") and m != "pocketd.daemon.cli_context"]
    assert heavy_loaded(modules) == []


def test_an_unknown_command_still_gets_suggestions() -> None:
    result = CliRunner().invoke(cli, ["stauts"])
    assert result.exit_code == 2
    assert "Error: No such command 'stauts'. (Did you mean one of: 'stats', 'status'?)" in result.output


@pytest.mark.parametrize(("args", "configured"), [
    (["config", "show"], True),  # every other command: set up before it runs, as before
    (["-v", "status"], True),  # -v asks for log output
    (["status"], False),  # a client command sets it up only if it loads the configuration
])
def test_logging_is_set_up_as_before(fake_daemon: FakeDaemon, args: list[str], configured: bool) -> None:
    code = WRAPPER.replace("sys.stdout.flush()", "sys.stdout.flush()\n"
                           "import logging\n"
                           "h = logging.getLogger().handlers\n"
                           "print('HANDLER', h[0].formatter._fmt if h else None, logging.getLogger().level)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    handler = proc.stdout.rsplit("HANDLER ", 1)[1].strip()
    if not configured:
        assert handler == "None 30"
    elif "-v" in args:
        assert handler == "%(levelname)s %(name)s: %(message)s 20"
    else:
        assert handler == "%(levelname)s %(name)s: %(message)s 30"
