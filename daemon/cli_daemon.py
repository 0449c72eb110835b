"""`pocketd run` (the daemon, in the foreground) and the commands that talk to it over the socket.

The client commands must start at once: this module imports only click, the client and the
status formatter at module level (`run` imports the daemon and logging inside the command).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from .cli_context import AppContext, pass_app
from .client import Client, ClientError, DaemonNotRunning, request
from .statusfmt import format_history, format_status

F = TypeVar("F", bound=Callable[..., Any])

EXIT_NOT_RUNNING = 3  # like `systemctl status` for a stopped unit
_SUPERVISORS = {"runsv", "s6-supervise", "supervise", "systemd", "supervisord"}


def client_errors(fn: F) -> F:
    """Socket problems as one line: exit 3 when the daemon is not running, 1 for an error reply."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DaemonNotRunning as e:
            click.echo(f"pocketd: {e}", err=True)
            sys.exit(EXIT_NOT_RUNNING)
        except ClientError as e:
            click.echo(f"pocketd: error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _ask(app: AppContext, cmd: str, **args: Any) -> dict[str, Any]:
    """One request to the daemon; its reply (DaemonError on an error reply, see client_errors)."""
    endpoint = app.endpoint()
    return request(endpoint.socket_path, cmd, timeout_s=endpoint.request_timeout_s + 60, **args)


# -- run ---------------------------------------------------------------------------------------


def under_supervisor(environ: Mapping[str, str] | None = None, parent_name: str | None = None) -> bool:
    """Whether a service manager collects our output (and timestamps it): systemd, runit/svlogd, s6."""
    env = os.environ if environ is None else environ
    if any(env.get(k) for k in ("INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET")):
        return True
    if parent_name is None:
        try:
            import psutil

            parent_name = psutil.Process(os.getppid()).name()
        except Exception:
            parent_name = ""
    return parent_name in _SUPERVISORS


def configure_logging(level: str, supervised: bool) -> None:
    """Log to stdout, line-buffered; timestamps only when no supervisor adds its own."""
    import logging  # here, not at the top: the client commands do not load it

    fmt = "%(levelname)s %(name)s: %(message)s"
    if not supervised:
        fmt = "%(asctime)s " + fmt
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    logging.basicConfig(level=level, format=fmt, stream=sys.stdout, force=True)
    if logging.getLevelName(level) > logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every job run at INFO


@click.command()
@click.option("--trainer-command", hidden=True, default=None,
              help="Run this instead of `python -m pocketd.trainer` (tests, wrappers); --job FILE is appended.")
@pass_app
def run(app: AppContext, trainer_command: str | None) -> None:
    """Run the daemon in the foreground (it never forks; stop it with SIGTERM or Ctrl-C)."""
    import logging

    from .server import SocketError
    from .service import Daemon

    config = app.loaded.config
    root = logging.getLogger()
    level = config.daemon.log_level
    if root.level < logging.WARNING and root.level < logging.getLevelName(level):  # -v / -vv
        level = logging.getLevelName(root.level)
    configure_logging(level, under_supervisor())
    try:
        daemon = Daemon(config, trainer_command=shlex.split(trainer_command) if trainer_command else None)
        code = daemon.run()
    except (SocketError, ValueError) as e:
        click.echo(f"pocketd: error: {e}", err=True)
        sys.exit(1)
    sys.exit(code)


# -- client commands ----------------------------------------------------------------------------


WATCH_HEARTBEAT_S = 15.0


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
@click.option("--watch", is_flag=True,
              help="Print the status again on every change (streamed by the daemon) until Ctrl-C; "
                   "with --json one JSON object per line, heartbeats included.")
@pass_app
@client_errors
def status(app: AppContext, as_json: bool, watch: bool) -> None:
    """What the daemon is doing: waiting (and why), training (step, loss, ETA), data and checkpoint."""
    if not watch:
        _print_status(_ask(app, "status"), as_json)
        return
    endpoint = app.endpoint()
    interactive = sys.stdout.isatty() and not as_json
    first = True
    try:
        for line in Client(endpoint.socket_path, endpoint.request_timeout_s + 60).watch(WATCH_HEARTBEAT_S):
            if as_json:
                click.echo(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
                continue
            if line.get("event") != "status":
                continue  # a heartbeat: nothing changed
            if interactive:
                click.clear()
            elif not first:
                click.echo("")
            first = False
            click.echo(format_status(line))
    except KeyboardInterrupt:
        pass


def _print_status(reply: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
    else:
        click.echo(format_status(reply))


def _simple(cmd: str, doc: str, message: Callable[[dict[str, Any]], str]) -> click.Command:
    @click.command(name=cmd, help=doc)
    @click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
    @pass_app
    @client_errors
    def command(app: AppContext, as_json: bool) -> None:
        reply = _ask(app, cmd)
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False) if as_json else message(reply))

    return command


pause = _simple("pause", "Stop training (a running session stops after its step) until `pocketd resume`.",
                lambda r: "paused" if r.get("changed") else "already paused")
resume = _simple("resume", "Let the policy start sessions again.",
                 lambda r: "resumed" if r.get("changed") else "not paused")
train_now = _simple("train-now", "Start a session now if memory allows, ignoring charging and idleness.",
                    lambda r: f"training: session {r['session_id']} started")
stop_training = _simple("stop-training", "Stop the running session (after its current step).",
                        lambda r: f"stopping session {r['session_id']} (SIGKILL after {r['grace_s']:g} s)")
shutdown = _simple("shutdown", "Stop the daemon (the trainer first, cleanly).", lambda r: "pocketd is stopping")


@click.command(name="history")
@click.option("-n", "--sessions", default=10, show_default=True, help="How many recent sessions.")
@click.option("-e", "--events", default=20, show_default=True, help="How many recent events.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
@pass_app
@client_errors
def history(app: AppContext, sessions: int, events: int, as_json: bool) -> None:
    """Recent training sessions and decisions."""
    reply = _ask(app, "history", sessions=sessions, events=events)
    click.echo(json.dumps(reply, indent=2, ensure_ascii=False) if as_json else format_history(reply))


@click.command(name="signal")
@click.option("--away/--back", "away", required=True, help="The user is away (screen off) / back.")
@click.option("--for", "minutes", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MINUTES",
              help="The signal expires after MINUTES (default: until the next signal).")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
@pass_app
@client_errors
def signal_cmd(app: AppContext, away: bool, minutes: float | None, as_json: bool) -> None:
    """Tell the daemon the user is away (screen off) or back, e.g. from Tasker."""
    args: dict[str, Any] = {"away": away}
    if minutes is not None:
        args["expires_in_s"] = minutes * 60
    reply = _ask(app, "signal", **args)
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    until = f" until {reply['expires_at']}" if reply.get("expires_at") else ""
    click.echo(("away" if away else "back") + until)


COMMANDS = [run, status, pause, resume, train_now, stop_training, history, signal_cmd, shutdown]
