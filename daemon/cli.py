"""The `pocketd` command line: a thin layer over the library.

Library code raises named exceptions; they become one-line messages here and
nowhere else. Commands that need torch import it inside the command, so the
daemon and the quick commands stay light.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import click

# AppContext, pass_app and user_errors live in cli_context; re-exported for the command modules
# that still import them from here.
from .cli_context import AppContext, pass_app, user_errors

__all__ = ["AppContext", "Group", "cli", "main", "pass_app", "user_errors"]


class Group(click.Group):
    """A click group whose commands report user errors as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        return user_errors(super().invoke)(ctx)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Config file (default: $POCKETD_CONFIG or the user config dir).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override one setting (repeatable); beats file and environment.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="pocketd")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, overrides: tuple[str, ...], verbose: int) -> None:
    """pocketd: personalize a small language model on your own device, privately."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = AppContext(config_path, list(overrides))


def _register() -> None:
    from . import cli_config

    cli.add_command(cli_config.config)
    for module_name in ("cli_data", "cli_train", "cli_daemon", "cli_service", "cli_model"):
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{module_name}":
                raise
            continue
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="pocketd")
