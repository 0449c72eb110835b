"""The `pocketd` command line: a thin layer over the library.

Library code raises named exceptions; they become one-line messages here and
nowhere else. Commands that need torch import it inside the command, so the
daemon and the quick commands stay light.

Commands are registered lazily: `COMMAND_TABLE` names each command's module and its
short help, and a command's module is imported only when that command runs. So
`pocketd status` loads the client (daemon.cli_daemon, daemon.client) and not the
store, the ingest pipeline or the configuration models, and `pocketd --help` lists
every command from the table without importing any of them.
"""

from __future__ import annotations

import importlib
from gettext import gettext as _
from pathlib import Path
from typing import Any, NamedTuple

import click

# AppContext, pass_app and user_errors live in cli_context; re-exported for the command modules
# that still import them from here.
from .cli_context import AppContext, pass_app, user_errors

__all__ = ["CLIENT_COMMANDS", "COMMAND_TABLE", "AppContext", "CommandEntry", "Group", "LazyGroup", "cli", "main", "pass_app",
           "user_errors"]


class CommandEntry(NamedTuple):
    """Where a command lives (a module of this package with a COMMANDS list) and its help's first
    paragraph, which `pocketd --help` shortens exactly as click does the command's own help."""

    module: str
    help: str


# name -> entry. tests/test_cli_lazy.py checks it against the modules' COMMANDS lists.
COMMAND_TABLE: dict[str, CommandEntry] = {
    "checkpoint": CommandEntry("cli_train", "List, inspect, verify, export and import seed-replay checkpoints."),
    "config": CommandEntry("cli_config", "Show, check or create the configuration file."),
    "demo": CommandEntry(
        "cli_data", "Ingest the sample notes shipped with pocketd into the store, then show `pocketd stats`."),
    "eval": CommandEntry(
        "cli_train", "Validation loss and perplexity of the base model and of the current checkpoint."),
    "export": CommandEntry(
        "cli_model", "Export the current (or a given) checkpoint: --merged DIR, --adapter DIR or --gguf FILE."),
    "forget": CommandEntry(
        "cli_data", "Delete documents, their examples and every training step that saw them, without asking."),
    "generate": CommandEntry(
        "cli_model", 'Generate a reply to PROMPT ("-" reads it from stdin), streamed to stdout.'),
    "history": CommandEntry("cli_daemon", "Recent training sessions and decisions."),
    "ingest": CommandEntry("cli_data", "Store text from files, folders (.txt .md .jsonl .json) or stdin (-)."),
    "install-service": CommandEntry(
        "cli_service", "Install pocketd as a service (default: Termux if detected, else systemd)."),
    "pause": CommandEntry(
        "cli_daemon", "Stop training (a running session stops after its step) until `pocketd resume`."),
    "resume": CommandEntry("cli_daemon", "Let the policy start sessions again."),
    "run": CommandEntry(
        "cli_daemon", "Run the daemon in the foreground (it never forks; stop it with SIGTERM or Ctrl-C)."),
    "shutdown": CommandEntry("cli_daemon", "Stop the daemon (the trainer first, cleanly)."),
    "signal": CommandEntry(
        "cli_daemon", "Tell the daemon the user is away (screen off) or back, e.g. from Tasker."),
    "stats": CommandEntry("cli_data", "Show what is stored: documents, examples, characters, splits, sources."),
    "status": CommandEntry(
        "cli_daemon",
        "What the daemon is doing: waiting (and why), training (step, loss, ETA), data and checkpoint."),
    "stop-training": CommandEntry("cli_daemon", "Stop the running session (after its current step)."),
    "train": CommandEntry(
        "cli_train", "Run one training session in the foreground (Ctrl-C finishes the step and stops)."),
    "train-now": CommandEntry(
        "cli_daemon", "Start a session now if memory allows, ignoring charging and idleness."),
}


# The commands that only talk to the daemon. Without -v the group does not set up logging for them
# (importing logging is a good part of their budget); they set it up if they load the configuration.
CLIENT_COMMANDS = frozenset({"status", "pause", "resume", "train-now", "stop-training", "history", "signal",
                             "shutdown"})


class Group(click.Group):
    """A click group whose commands report user errors as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        return user_errors(super().invoke)(ctx)


class LazyGroup(Group):
    """A Group whose commands come from `table` and are imported only when looked up.

    `get_command` imports the command's module (from this package) and takes the command of that
    name from the module's COMMANDS list; `list_commands` and the help's command list read the table
    only. Commands added with `add_command` work as in any click group.
    """

    def __init__(self, *args: Any, table: dict[str, CommandEntry], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table = table

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.table})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is not None:
            return command
        entry = self.table.get(cmd_name)
        if entry is None:
            return None
        return load_command(cmd_name, entry)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                            list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as e:
            # click suggests close names from self.commands, which holds only the eager commands.
            raise click.exceptions.NoSuchCommand(e.command_name, possibilities=self.list_commands(ctx),
                                                 ctx=ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of `--help`, from the table: no command module is imported."""
        rows: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            if command is None:
                command = click.Command(name, help=self.table[name].help)  # shortened as click does
            if not command.hidden:
                rows.append((name, command))
        if not rows:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in rows)  # as click.Group does
        with formatter.section(_("Commands")):  # click's own title, translated as click does
            formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in rows])


def load_command(name: str, entry: CommandEntry) -> click.Command:
    """Import `entry.module` and return its command called `name` (LookupError if it has none:
    the table is out of date, a bug the table's test catches)."""
    module = importlib.import_module(f"{__package__}.{entry.module}")
    for command in module.COMMANDS:
        if command.name == name:
            return command  # type: ignore[no-any-return]
    raise LookupError(f"{module.__name__} has no command {name!r} (daemon.cli.COMMAND_TABLE is out of date)")


@click.group(cls=LazyGroup, table=COMMAND_TABLE, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Config file (default: $POCKETD_CONFIG or the user config dir).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override one setting (repeatable); beats file and environment.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="pocketd")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, overrides: tuple[str, ...], verbose: int) -> None:
    """pocketd: personalize a small language model on your own device, privately."""
    app = AppContext(config_path, list(overrides), verbose)
    ctx.obj = app
    if verbose or ctx.invoked_subcommand not in CLIENT_COMMANDS:
        app.configure_logging()


def main() -> None:
    cli(prog_name="pocketd")
