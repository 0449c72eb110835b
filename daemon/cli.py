"""The `pocketd` command line: a thin layer over the library.

Library code raises named exceptions; they become one-line messages here and
nowhere else. Commands that need torch import it inside the command, so the
daemon and the quick commands stay light.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .config import ConfigError, LoadedConfig, load_config, parse_overrides

F = TypeVar("F", bound=Callable[..., Any])


class AppContext:
    """What every command gets: the config, loaded on first use."""

    def __init__(self, config_path: Path | None, overrides: list[str]) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self._loaded: LoadedConfig | None = None

    @property
    def loaded(self) -> LoadedConfig:
        if self._loaded is None:
            self._loaded = load_config(self.config_path, overrides=parse_overrides(self.overrides))
        return self._loaded

    def open_store(self) -> Any:
        from pocketd.store import Store

        return Store.open(self.loaded.config.paths.database)


pass_app = click.make_pass_decorator(AppContext)


def user_errors(fn: F) -> F:
    """Turn the library's named exceptions into `pocketd: error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pocketd.store import StoreError

        known: tuple[type[BaseException], ...] = (ConfigError, StoreError, *_extra_user_errors())
        try:
            return fn(*args, **kwargs)
        except known as e:
            click.echo(f"pocketd: error: {e}", err=True)
            sys.exit(1)
        except sqlite3.DatabaseError as e:  # a damaged page found mid-query (the header was fine at open)
            logging.getLogger(__name__).debug("database error", exc_info=True)
            click.echo(f"pocketd: error: {_database_path()}: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _database_path() -> str:
    """The configured database's path, for naming it in an error (the config is loaded by then)."""
    ctx = click.get_current_context(silent=True)
    app = ctx.find_object(AppContext) if ctx is not None else None
    if app is not None and app._loaded is not None:
        return str(app._loaded.config.paths.database)
    return "the database"


def _extra_user_errors() -> tuple[type[BaseException], ...]:
    """Error bases of the other packages, if their modules are importable without torch."""
    out: list[type[BaseException]] = []
    try:
        from pocketd.ingest.errors import IngestError

        out.append(IngestError)
    except ImportError:
        pass
    try:
        from pocketd.trainer.errors import TrainerError

        out.append(TrainerError)
    except ImportError:
        pass
    return tuple(out)


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
