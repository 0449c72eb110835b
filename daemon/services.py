"""Render and install the service files: a systemd user unit, or termux-services (runit) + Termux:Boot.

The templates are the repository's `systemd_termux/` folder, installed as the package data
of `pocketd.systemd_termux` (one copy, one place). `@NAME@` placeholders are filled from
the environment and the config:

    @POCKETD@         the pocketd command (the console script next to this Python, else on PATH,
                      else `python -m pocketd.daemon`)
    @SH@              $PREFIX/bin/sh on Termux, /bin/sh elsewhere
    @PREFIX@ @HOME@   from the environment
    @MEMORY_MAX@      [policy] memory_budget_mb + 256 MiB (the daemon itself), as "1792M"
    @TIMEOUT_STOP_S@  [daemon] stop_grace_s + 30
    @WRITABLE_PATHS@  the unit's ReadWritePaths: [paths] data_dir, cache_dir, state_dir, runtime_dir
    @RUNTIME_DIRECTORY@  RuntimeDirectory=pocketd when runtime_dir is $XDG_RUNTIME_DIR/pocketd (systemd
                      creates it at each start; ProtectSystem=strict would not let pocketd), else a comment

    detect_service_kind(env) -> ServiceKind
    render_service(kind, ...) -> list[ServiceFile]                      pure apart from reading templates
    install_service(kind, dry_run=False, force=False, ...) -> list[ServiceFile]

Installing never overwrites a file whose content differs unless `force`; it checks
every file before writing any. Service scripts get mode 0755, the unit and `down` 0644, the
Termux:Tasker scripts (`~/.termux/tasker/`) 0700. Installing the systemd unit also creates
pocketd's writable folders (0700): the unit's ReadWritePaths only apply to folders that exist.
The termux `down` file (installed-but-not-enabled) is only written with a new service
directory, so reinstalling does not disable a service the user enabled with `sv-enable`.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from pocketd.store import atomic_write, make_private_dir

from .probes_power import TERMUX_COMMAND
from .settings import PathsConfig

log = logging.getLogger(__name__)

__all__ = [
    "ServiceKind", "FileStatus", "ServiceFile", "ServiceInstallError",
    "detect_service_kind", "default_pocketd_command", "render_service", "install_service", "next_steps",
    "DAEMON_HEADROOM_MB",
]

TASKER_SCRIPTS = ("pocketd-away", "pocketd-back", "pocketd-ingest-shared", "pocketd-forget-source",
                  "pocketd-pause", "pocketd-resume")
DAEMON_HEADROOM_MB = 256  # MemoryMax = trainer budget + this (the idle daemon is < 80 MB)
STOP_TIMEOUT_MARGIN_S = 30
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


class ServiceKind(str, Enum):
    SYSTEMD = "systemd"
    TERMUX = "termux"


class FileStatus(str, Enum):
    PLANNED = "planned"  # rendered, not installed (dry run)
    CREATED = "created"
    UPDATED = "updated"  # differed; overwritten with force
    UNCHANGED = "unchanged"  # same content already there (mode fixed if needed)
    SKIPPED = "skipped"  # the termux `down` file on an existing (possibly enabled) service
    CONFLICT = "conflict"  # differs from what is there; only reported by a dry run (install raises)


class ServiceFile(NamedTuple):
    path: Path
    content: str
    mode: int
    status: FileStatus = FileStatus.PLANNED
    note: str = ""


class ServiceInstallError(Exception):
    """A service file cannot be rendered or installed (missing PREFIX, differing file without force, ...)."""


# (template path inside service_templates, install path relative to its root key, mode)
_SYSTEMD = [("pocketd.service", ("systemd_user", "pocketd.service"), 0o644)]
_TERMUX = [
    ("sv/pocketd/run", ("service_dir", "run"), 0o755),
    ("sv/pocketd/log/run", ("service_dir", "log/run"), 0o755),
    ("sv/pocketd/finish", ("service_dir", "finish"), 0o755),
    ("sv/pocketd/down", ("service_dir", "down"), 0o644),
    ("boot/start-pocketd", ("termux_boot", "start-pocketd"), 0o755),
    *((f"tasker/{name}", ("termux_tasker", name), 0o700) for name in TASKER_SCRIPTS),
]


def _is_termux(env: Mapping[str, str]) -> bool:
    return ("com.termux" in env.get("PREFIX", "") or bool(env.get("TERMUX_VERSION"))
            or shutil.which(TERMUX_COMMAND, path=env.get("PATH")) is not None)


def detect_service_kind(env: Mapping[str, str] | None = None) -> ServiceKind:
    """TERMUX inside Termux (PREFIX or termux-battery-status on PATH), else SYSTEMD."""
    return ServiceKind.TERMUX if _is_termux(os.environ if env is None else env) else ServiceKind.SYSTEMD


def default_pocketd_command(env: Mapping[str, str] | None = None) -> list[str]:
    """The `pocketd` console script of this installation, as an absolute path if it can be found."""
    env = os.environ if env is None else env
    beside = Path(sys.executable).parent / "pocketd"  # the venv's / $PREFIX's bin; not resolved on purpose
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    found = shutil.which("pocketd", path=env.get("PATH"))
    if found:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "pocketd.daemon"]


def _templates_root(templates_dir: Path | None) -> Path:
    if templates_dir is not None:
        return templates_dir
    return Path(str(resources.files("pocketd.systemd_termux")))


def _sh_words(words: Sequence[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _systemd_words(words: Sequence[str]) -> str:
    out = []
    for w in words:
        w = w.replace("%", "%%")
        if re.search(r'[\s"\'\\;$]', w):
            w = '"' + w.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(w)
    return " ".join(out)


def _require(env: Mapping[str, str], name: str, why: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ServiceInstallError(f"${name} is not set ({why})")
    return value


def _roots(kind: ServiceKind, env: Mapping[str, str]) -> dict[str, Path]:
    home = Path(_require(env, "HOME", "needed for the install paths"))
    if kind is ServiceKind.SYSTEMD:
        config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
        return {"systemd_user": config_home / "systemd" / "user"}
    prefix = Path(_require(env, "PREFIX", "run this inside Termux, or use --systemd"))
    return {"service_dir": prefix / "var" / "service" / "pocketd", "termux_boot": home / ".termux" / "boot",
            "termux_tasker": home / ".termux" / "tasker"}


def render_service(
    kind: ServiceKind | str,
    *,
    env: Mapping[str, str] | None = None,
    pocketd_command: Sequence[str] | None = None,
    memory_budget_mb: int = 1536,
    stop_grace_s: float = 60.0,
    templates_dir: Path | None = None,
    sh: str | None = None,
    paths: PathsConfig | None = None,
) -> list[ServiceFile]:
    """The files for `kind` with their install paths, content and modes (status PLANNED).

    `paths`: pocketd's folders (default: the defaults), the unit's only writable places.

    Raises ServiceInstallError when a needed variable (HOME, PREFIX for termux) is missing
    or a template cannot be read or leaves a placeholder unfilled.
    """
    kind = ServiceKind(kind)
    env = os.environ if env is None else env
    roots = _roots(kind, env)
    command = list(pocketd_command) if pocketd_command else default_pocketd_command(env)
    prefix = env.get("PREFIX", "")
    if sh is None:
        sh = f"{prefix}/bin/sh" if kind is ServiceKind.TERMUX and prefix else "/bin/sh"
    values = {
        "@SH@": sh,
        "@PREFIX@": prefix,
        "@HOME@": env.get("HOME", ""),
        "@MEMORY_MAX@": f"{int(memory_budget_mb) + DAEMON_HEADROOM_MB}M",
        "@TIMEOUT_STOP_S@": str(int(stop_grace_s) + STOP_TIMEOUT_MARGIN_S),
        **_sandbox_values(paths or PathsConfig(), env),
    }
    root = _templates_root(templates_dir)
    files: list[ServiceFile] = []
    for template, (root_key, rel), mode in (_SYSTEMD if kind is ServiceKind.SYSTEMD else _TERMUX):
        try:
            text = (root / template).read_text(encoding="utf-8")
        except OSError as e:
            raise ServiceInstallError(f"cannot read service template {template}: {e.strerror or e}") from e
        is_unit = template.endswith(".service")
        filled = dict(values, **{"@POCKETD@": _systemd_words(command) if is_unit else _sh_words(command)})
        for key, value in filled.items():
            text = text.replace(key, value)
        left = _PLACEHOLDER.findall(text)
        if left:
            raise ServiceInstallError(f"template {template}: unfilled placeholders {sorted(set(left))}")
        files.append(ServiceFile(roots[root_key] / rel, text, mode))
    return files


def writable_dirs(paths: PathsConfig) -> list[Path]:
    """The folders pocketd writes (data, cache, state, the socket's), without duplicates, in that order."""
    out: list[Path] = []
    for p in (paths.data_dir, paths.cache_dir, paths.state_dir, paths.runtime_dir):
        p = Path(os.path.abspath(p))
        if p not in out:
            out.append(p)
    return out


def _sandbox_dirs(paths: PathsConfig, env: Mapping[str, str]) -> tuple[list[Path], bool]:
    """The unit's ReadWritePaths, and whether the socket's folder is systemd's RuntimeDirectory instead."""
    runtime = Path(os.path.abspath(paths.runtime_dir))
    xdg = env.get("XDG_RUNTIME_DIR", "")
    managed = bool(xdg) and runtime == Path(os.path.abspath(xdg)) / "pocketd"
    return [d for d in writable_dirs(paths) if not (managed and d == runtime)], managed


def _sandbox_values(paths: PathsConfig, env: Mapping[str, str]) -> dict[str, str]:
    dirs, managed = _sandbox_dirs(paths, env)
    runtime = Path(os.path.abspath(paths.runtime_dir))
    # "-": a missing folder is skipped rather than failing the start (install_service creates them).
    return {
        "@WRITABLE_PATHS@": _systemd_words([f"-{d}" for d in dirs]),
        "@RUNTIME_DIRECTORY@": ("RuntimeDirectory=pocketd\nRuntimeDirectoryMode=0700" if managed else
                                f"# The control socket's folder ({runtime}) is in ReadWritePaths above."),
    }


def next_steps(kind: ServiceKind) -> list[str]:
    """The commands to run after installing."""
    if kind is ServiceKind.SYSTEMD:
        return ["systemctl --user daemon-reload", "systemctl --user enable --now pocketd"]
    return ["sv-enable pocketd"]


def install_service(
    kind: ServiceKind | str,
    dry_run: bool = False,
    force: bool = False,
    **render_kwargs: object,
) -> list[ServiceFile]:
    """Render and (unless `dry_run`) install the files for `kind`; returns them with their status
    (for a dry run: what would happen, CONFLICT for a differing file).

    `render_kwargs` go to `render_service` (env, pocketd_command, memory_budget_mb, stop_grace_s, ...).
    Raises ServiceInstallError, before writing anything, if a file exists with different
    content (or is not a regular file) and `force` is False.
    """
    kind = ServiceKind(kind)
    files = render_service(kind, **render_kwargs)  # type: ignore[arg-type]
    planned: list[ServiceFile] = []
    conflicts: list[str] = []
    down = [f.path for f in files if kind is ServiceKind.TERMUX and f.path.name == "down"]
    service_dir_exists = bool(down) and down[0].parent.exists()
    for f in files:
        if down and f.path == down[0] and service_dir_exists:
            planned.append(f._replace(status=FileStatus.SKIPPED,
                                      note="service already installed; enable/disable with sv-enable/sv-disable"))
            continue
        existing = _read_existing(f.path)
        if existing is None:
            planned.append(f._replace(status=FileStatus.CREATED))
        elif existing == f.content:
            planned.append(f._replace(status=FileStatus.UNCHANGED))
        elif force:
            planned.append(f._replace(status=FileStatus.UPDATED))
        else:
            conflicts.append(str(f.path))
            planned.append(f._replace(status=FileStatus.CONFLICT, note="differs from the installed file"))
    if dry_run:
        return planned
    if conflicts:
        raise ServiceInstallError(
            "refusing to overwrite files that differ (use --force): " + ", ".join(conflicts))
    if kind is ServiceKind.SYSTEMD:  # ReadWritePaths only apply to folders that exist
        paths, env = render_kwargs.get("paths"), render_kwargs.get("env")
        dirs, _ = _sandbox_dirs(paths if isinstance(paths, PathsConfig) else PathsConfig(),
                                env if isinstance(env, Mapping) else os.environ)
        for d in dirs:
            try:
                make_private_dir(d)
            except OSError as e:
                raise ServiceInstallError(f"cannot create {d}: {e.strerror or e}") from e
    for f in planned:
        if f.status in (FileStatus.CREATED, FileStatus.UPDATED):
            _write(f.path, f.content, f.mode)
            log.info("%s %s", f.status.value, f.path)
        elif f.status is FileStatus.UNCHANGED and (f.path.stat().st_mode & 0o777) != f.mode:
            f.path.chmod(f.mode)
    return planned


def _read_existing(path: Path) -> str | None:
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        # termux-services ships log/run as a symlink to svlogger; anything not a plain file is a conflict
        return f"<not a regular file: {path}>"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServiceInstallError(f"cannot read existing {path}: {e}") from e


def _write(path: Path, content: str, mode: int) -> None:
    """Atomic write (temp file + rename) with the final mode set before the rename; missing folders 0700."""
    try:
        make_private_dir(path.parent)
        if path.is_symlink():
            path.unlink()  # only reached with force; replace the link, not its target
        atomic_write(path, content, mode=mode)
    except OSError as e:
        raise ServiceInstallError(f"cannot write {path}: {e.strerror or e}") from e
