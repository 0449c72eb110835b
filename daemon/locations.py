"""Where pocketd looks by default (config file, control socket), computed without pydantic.

The client commands (`pocketd status`, `pause`, `resume`, `signal`, `history`, ...) need only the
socket's path and a request timeout. When nothing is configured - no config file, no POCKETD_*
variable, no `--set` - those are the defaults, found here without loading the configuration
(pydantic and the models of every section cost most of a quick command's time). When anything is
configured, `default_endpoint` returns None and the caller loads and validates the whole
configuration as every other command does, so an invalid value is refused with the field's name.

`config` and `settings` take their defaults from here: one definition of each.
"""

from __future__ import annotations

import os
import posixpath
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from .wire import SOCKET_NAME

APP = "pocketd"
ENV_PREFIX = "POCKETD_"
ENV_CONFIG = "POCKETD_CONFIG"  # path of the config file (not a setting)
CONFIG_NAME = "config.toml"
DEFAULT_REQUEST_TIMEOUT_S = 10.0  # `[daemon] request_timeout_s`'s default (settings.DaemonConfig)


def default_config_path() -> Path:
    """The config file's default place: the platformdirs user config dir (~/.config/pocketd/config.toml).

    On Linux and Termux with an absolute $XDG_CONFIG_HOME, or none and an absolute $HOME, that is
    computed here as platformdirs does it (tests/test_cli_lazy.py compares the two); anywhere else
    platformdirs is asked. Importing platformdirs loads tempfile, shutil, bz2, lzma and random: a
    good part of a quick command's budget.
    """
    base = _plain_config_home()
    if base is not None:
        return Path(base) / APP / CONFIG_NAME
    import platformdirs

    return Path(platformdirs.user_config_dir(APP)) / CONFIG_NAME


def _plain_config_home() -> str | None:
    """The base of the user config dir where platformdirs' answer is certain (platformdirs' Unix rules:
    $XDG_CONFIG_HOME if absolute, else ~/.config), else None: another platform, an Android app
    (platformdirs' test: Android without $SHELL and $PREFIX, which Termux sets), a relative or blank
    $XDG_CONFIG_HOME or $HOME (versions of platformdirs differ there)."""
    env = os.environ
    if sys.platform not in ("linux", "android"):
        return None
    android = hasattr(sys, "getandroidapilevel") or (
        env.get("ANDROID_DATA") == "/data" and env.get("ANDROID_ROOT") == "/system")
    if android and not (env.get("SHELL") or env.get("PREFIX")):
        return None
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg:
        return xdg if posixpath.isabs(xdg) else None
    home = env.get("HOME", "")
    return os.path.expanduser("~/.config") if posixpath.isabs(home) else None


def default_runtime_dir() -> Path:
    """The control socket's default folder: $XDG_RUNTIME_DIR/pocketd, Termux's $PREFIX/var/run/pocketd,
    else the user state dir's `run`."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / APP
    if os.environ.get("PREFIX") and "com.termux" in os.environ["PREFIX"]:
        return Path(os.environ["PREFIX"]) / "var" / "run" / APP
    import platformdirs

    return Path(platformdirs.user_state_dir(APP)) / "run"


def socket_path(configured: Path | None, runtime_dir: Path) -> Path:
    """The control socket: `[daemon] socket_path` when set, else pocketd.sock in `[paths] runtime_dir`."""
    return configured or runtime_dir / SOCKET_NAME


class Endpoint(NamedTuple):
    """What a client needs to reach the daemon."""

    socket_path: Path
    request_timeout_s: float  # the daemon's per-connection read timeout (`[daemon] request_timeout_s`)


def default_endpoint(config_path: Path | None, overrides: Sequence[str]) -> Endpoint | None:
    """The endpoint when nothing is configured, else None (load the configuration instead).

    Nothing is configured when there is no `--config` and no $POCKETD_CONFIG (an explicit file must
    be read, and refused if missing), no `--set`, no other POCKETD_* variable (each is a setting, or
    an error to report), and nothing at the default config path (the loader would read whatever is
    there, and refuse it if it is not a valid config file).
    """
    if config_path is not None or overrides or any(name.startswith(ENV_PREFIX) for name in os.environ):
        return None
    if default_config_path().exists():
        return None
    return Endpoint(socket_path(None, default_runtime_dir()), DEFAULT_REQUEST_TIMEOUT_S)
