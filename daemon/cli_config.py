"""`pocketd config show | check | init`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pocketd.store import atomic_write, make_private_dir

from .cli_context import AppContext, pass_app
from .config import LoadedConfig, default_config_path, render, validate_file
from .settings import SECTIONS


@click.group()
def config() -> None:
    """Show, check or create the configuration file."""


@config.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print {file, settings: {section: {field: {value, origin}}}} as JSON.")
@pass_app
def show(app: AppContext, as_json: bool) -> None:
    """Print the effective configuration and where each value came from."""
    loaded = app.loaded
    if as_json:
        click.echo(json.dumps(config_as_dict(loaded), indent=2, ensure_ascii=False))
        return
    click.echo(f"# config file: {loaded.path or '(none: defaults)'}")
    click.echo(render(loaded))


def config_as_dict(loaded: LoadedConfig) -> dict[str, Any]:
    """The effective configuration as JSON values, each with where it came from (default, file, env NAME, cli)."""
    settings: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = getattr(loaded.config, section).model_dump(mode="json")
        settings[section] = {name: {"value": value, "origin": loaded.origin(f"{section}.{name}")}
                             for name, value in values.items()}
    return {"file": str(loaded.path) if loaded.path else None, "settings": settings}


@config.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help='Print {"file", "ok": true} as JSON (an invalid file is still an error on stderr).')
def check(file: Path, as_json: bool) -> None:
    """Validate FILE (exit 1 with the field's name if it is invalid)."""
    validate_file(file)
    if as_json:
        click.echo(json.dumps({"file": str(file), "ok": True}, ensure_ascii=False))
    else:
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


COMMANDS = [config]
