"""`pocketd install-service [--termux | --systemd] [--dry-run] [--force]`."""

from __future__ import annotations

import json
import sys

import click

from .cli_context import AppContext, pass_app
from . import services
from .services import FileStatus, ServiceInstallError, ServiceKind, detect_service_kind, next_steps

_VERBS = {
    FileStatus.CREATED: ("wrote", "would write"),
    FileStatus.UPDATED: ("overwrote", "would overwrite"),
    FileStatus.UNCHANGED: ("unchanged", "unchanged"),
    FileStatus.SKIPPED: ("kept", "would keep"),
    FileStatus.CONFLICT: ("conflict", "would refuse (differs; use --force)"),
    FileStatus.PLANNED: ("planned", "planned"),
}


@click.command("install-service")
@click.option("--termux", "kind", flag_value=ServiceKind.TERMUX.value,
              help="termux-services (runit) service + Termux:Boot script.")
@click.option("--systemd", "kind", flag_value=ServiceKind.SYSTEMD.value, help="A systemd user unit.")
@click.option("--dry-run", is_flag=True, help="Print the files and where they would go; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite installed files that differ.")
@click.option("--json", "as_json", is_flag=True,
              help="Print {kind, dry_run, files: [{path, status, action, mode, note}], next_steps, note} as JSON.")
@pass_app
def install_service(app: AppContext, kind: str | None, dry_run: bool, force: bool, as_json: bool) -> None:
    """Install pocketd as a service (default: Termux if detected, else systemd)."""
    chosen = ServiceKind(kind) if kind else detect_service_kind()
    config = app.loaded.config
    try:
        files = services.install_service(chosen, dry_run=dry_run, force=force,
                                         memory_budget_mb=config.policy.memory_budget_mb,
                                         stop_grace_s=config.daemon.stop_grace_s, paths=config.paths)
    except ServiceInstallError as e:
        click.echo(f"pocketd: error: {e}", err=True)
        sys.exit(1)
    steps = next_steps(chosen)
    if chosen is ServiceKind.TERMUX:
        hint = ("needs `pkg install termux-services termux-api`; restart Termux once after installing "
                "termux-services. For start at boot, install the Termux:Boot app and open it once. "
                "The ~/.termux/tasker/pocketd-* scripts are for the Termux:Tasker plugin; see the README.")
    else:
        hint = 'to keep it running while logged out: loginctl enable-linger "$USER"'
    if as_json:
        click.echo(json.dumps({
            "kind": chosen.value, "dry_run": dry_run,
            "files": [{"path": str(f.path), "status": f.status.value, "action": _VERBS[f.status][1 if dry_run else 0],
                       "mode": f"{f.mode:04o}", "note": f.note or None,
                       **({"content": f.content} if dry_run and f.status is not FileStatus.SKIPPED else {})}
                      for f in files],
            "next_steps": steps, "note": hint}, indent=2, ensure_ascii=False))
        return
    click.echo(f"# {chosen.value} service{' (dry run: nothing written)' if dry_run else ''}")
    for f in files:
        verb = _VERBS[f.status][1 if dry_run else 0]
        note = f"  ({f.note})" if f.note else ""
        click.echo(f"{verb}: {f.path}  [mode {f.mode:04o}]{note}")
        if dry_run and f.status is not FileStatus.SKIPPED:
            click.echo("    " + f.content.rstrip("\n").replace("\n", "\n    ") if f.content else "    (empty)")
    click.echo(("Then run: " if dry_run else "Next: ") + " && ".join(steps))
    click.echo(f"({hint})")


COMMANDS = [install_service]
