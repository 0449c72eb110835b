"""`pocketd config show | check | init`."""

from __future__ import annotations

from pathlib import Path

import click

from pocketd.store import atomic_write, make_private_dir

from .cli_context import AppContext, pass_app
from .config import default_config_path, render, validate_file


@click.group()
def config() -> None:
    """Show, check or create the configuration file."""


@config.command()
@pass_app
def show(app: AppContext) -> None:
    """Print the effective configuration and where each value came from."""
    loaded = app.loaded
    click.echo(f"# config file: {loaded.path or '(none: defaults)'}")
    click.echo(render(loaded))


@config.command()
@click.argument("file", type=click.Path(path_type=Path))
def check(file: Path) -> None:
    """Validate FILE (exit 1 with the field's name if it is invalid)."""
    validate_file(file)
    click.echo(f"{file}: ok")


@config.command()
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.argument("file", type=click.Path(path_type=Path), required=False)
@pass_app
def init(app: AppContext, force: bool, file: Path | None) -> None:
    """Write a commented default config file (to FILE or the user config dir)."""
    target = file or app.config_path or default_config_path()
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; use --force to overwrite it")
    make_private_dir(target.parent)
    atomic_write(target, render(None, commented=True))
    click.echo(f"wrote {target}")
