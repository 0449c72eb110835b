"""What every `pocketd` command gets: the application context, and the user-error boundary.

Its own module so that the command modules (cli_config, cli_daemon, ...) can import it while
`cli` imports them to register their commands, without an import cycle.

It imports neither the configuration (pydantic), the store (sqlite_utils) nor logging at module
level: the client commands (`pocketd status`) reach a daemon that runs with default settings
without them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .locations import Endpoint, default_endpoint, socket_path

if TYPE_CHECKING:
    from .config import LoadedConfig

F = TypeVar("F", bound=Callable[..., Any])

# The library's named error bases, by module: each becomes `pocketd: error: ...`. An exception can
# only be an instance of a class whose module is loaded, so they are looked up in sys.modules and
# never imported here (importing the store or the config to catch their errors would cost every
# quick command the time this module saves).
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("pocketd.daemon.config", "ConfigError"),
    ("pocketd.store.errors", "StoreError"),
    ("pocketd.ingest.errors", "IngestError"),
    ("pocketd.trainer.errors", "TrainerError"),
)


class AppContext:
    """What every command gets: the config, loaded on first use, and the log output's setup."""

    def __init__(self, config_path: Path | None, overrides: list[str], verbose: int = 0) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.verbose = verbose
        self._loaded: LoadedConfig | None = None
        self._logging_configured = False

    def configure_logging(self) -> None:
        """The CLI's log output on stderr, "LEVEL name: message": WARNING and up, INFO with -v, DEBUG
        with -vv. The group does it before a command runs, except for the client commands without -v:
        they log nothing unless they load the configuration, which does it first (see `loaded`)."""
        if self._logging_configured:
            return
        self._logging_configured = True
        import logging

        level = logging.WARNING - 10 * min(self.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")

    @property
    def loaded(self) -> LoadedConfig:
        """The whole configuration, validated (ConfigError naming the field when a value is invalid)."""
        if self._loaded is None:
            self.configure_logging()  # loading may warn: in the CLI's format, as with every command
            from .config import load_config, parse_overrides

            self._loaded = load_config(self.config_path, overrides=parse_overrides(self.overrides))
        return self._loaded

    def endpoint(self) -> Endpoint:
        """The daemon's socket and request timeout. With nothing configured these are the defaults,
        found without loading the configuration; otherwise from the loaded (validated) configuration."""
        if self._loaded is None and (quick := default_endpoint(self.config_path, self.overrides)) is not None:
            return quick
        config = self.loaded.config
        return Endpoint(socket_path(config.daemon.socket_path, config.paths.runtime_dir),
                        config.daemon.request_timeout_s)

    def open_store(self) -> Any:
        from pocketd.store import Store

        return Store.open(self.loaded.config.paths.database)


pass_app = click.make_pass_decorator(AppContext)


def user_errors(fn: F) -> F:
    """Turn the library's named exceptions into `pocketd: error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, user_error_types()):
                click.echo(f"pocketd: error: {e}", err=True)
                sys.exit(1)
            sqlite3 = sys.modules.get("sqlite3")
            if sqlite3 is not None and isinstance(e, sqlite3.DatabaseError):
                # a damaged page found mid-query (the header was fine at open)
                import logging

                logging.getLogger(__name__).debug("database error", exc_info=True)
                click.echo(f"pocketd: error: {_database_path()}: {e}", err=True)
                sys.exit(1)
            raise

    return wrapper  # type: ignore[return-value]


def user_error_types() -> tuple[type[BaseException], ...]:
    """The error bases of USER_ERRORS whose modules are loaded (the others cannot have been raised)."""
    out: list[type[BaseException]] = []
    for module_name, name in USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return tuple(out)


def _database_path() -> str:
    """The configured database's path, for naming it in an error (the config is loaded by then)."""
    ctx = click.get_current_context(silent=True)
    app = ctx.find_object(AppContext) if ctx is not None else None
    if app is not None and app._loaded is not None:
        return str(app._loaded.config.paths.database)
    return "the database"

