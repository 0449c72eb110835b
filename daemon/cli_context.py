"""What every `pocketd` command gets: the application context, and the user-error boundary.

Its own module so that the command modules (cli_config, cli_daemon, ...) can import it while
`cli` imports them to register their commands, without an import cycle.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .config import ConfigError, LoadedConfig, load_config, parse_overrides

log = logging.getLogger(__name__)

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
            log.debug("database error", exc_info=True)
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
