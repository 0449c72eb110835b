"""Loading the configuration: defaults < TOML file < POCKETD_* environment < command line.

Every value remembers where it came from, for `pocketd config show`. Unknown keys
and invalid values raise ConfigError naming the dotted field and the reason.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pocketd.store.errors import UnsafeLocation
from pocketd.store.private import Kind, check_owned

from .locations import ENV_CONFIG, ENV_PREFIX, default_config_path  # one definition, shared with the client
from .settings import SECTIONS, PathsConfig, PocketdConfig, short_repr

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(Exception):
    """The configuration file, environment or an override is invalid."""


@dataclass
class LoadedConfig:
    """A validated config plus where each set value came from ("file", "env NAME", "cli")."""

    config: PocketdConfig
    path: Path | None
    origins: dict[str, str] = field(default_factory=dict)

    def origin(self, dotted: str) -> str:
        return self.origins.get(dotted, "default")


def check_config_file(path: Path) -> None:
    """Refuse a config file that another user could have written (ConfigError naming it and the fix).

    As ssh does for its files: the file must be a regular file owned by the user (or root) and not
    writable by group or others, and its folder must not let others replace it (owned by the user or
    root; writable by others only if sticky, like /tmp). A missing file is left to the reader.
    """
    try:
        check_owned(path, "config file", Kind.FILE, root_ok=True)
    except FileNotFoundError:
        return
    except UnsafeLocation as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
    folder = Path(os.path.realpath(path)).parent
    st = folder.stat()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{path}: the config file's folder {folder} belongs to another user (uid {st.st_uid}), "
                          "who could replace the file; keep it in a folder of your own")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise ConfigError(f"{path}: the config file's folder {folder} is writable by others (mode {mode:04o}), "
                          f"who could replace the file; fix: chmod go-w {folder}")


def check_locations(paths: PathsConfig) -> None:
    """Refuse existing data/state/cache folders that are not the user's own or that others may write to.

    ConfigError naming the setting, the folder and the fix. Missing folders are fine: pocketd
    creates them 0700. (The runtime folder is checked where the socket is made, daemon.server.)
    """
    for name in ("data_dir", "state_dir", "cache_dir"):
        folder: Path = getattr(paths, name)
        if not folder.exists() and not folder.is_symlink():
            continue
        try:
            check_owned(folder, "folder", Kind.DIRECTORY)
        except UnsafeLocation as e:
            raise ConfigError(f"paths.{name}: {e}") from None
        except OSError as e:
            raise ConfigError(f"paths.{name}: {folder}: {e.strerror or e}") from e


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; ConfigError naming the file on any problem (an unsafe file included)."""
    check_config_file(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: config file is not valid UTF-8 (byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """POCKETD_<SECTION>__<FIELD>=value pairs as a nested dict, with their origins."""
    out: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" not in rest:
            raise ConfigError(f"{name}: expected POCKETD_<SECTION>__<FIELD>, e.g. POCKETD_POLICY__MAX_LOAD")
        section, key = (p.lower() for p in rest.split("__", 1))
        out.setdefault(section, {})[key] = _parse_env_value(value)
        origins[f"{section}.{key}"] = f"env {name}"
    return out, origins


def _parse_env_value(value: str) -> Any:
    text = value.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    if text.lower() in {"none", "null"}:
        return None
    return value


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """Command-line `section.field=value` overrides as a nested dict."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        dotted, sep, value = pair.partition("=")
        if not sep or "." not in dotted:
            raise ConfigError(f"--set {pair!r}: expected SECTION.FIELD=VALUE, e.g. policy.max_load=2")
        section, key = dotted.strip().split(".", 1)
        out.setdefault(section, {})[key] = _parse_env_value(value)
    return out


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    require_file: bool = False,
) -> LoadedConfig:
    """Load and validate the effective configuration.

    `path` None means $POCKETD_CONFIG or the platformdirs default; a missing default
    file is fine (all defaults), a missing explicit file is an error.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or ENV_CONFIG in environ
    if path is None:
        path = Path(environ[ENV_CONFIG]) if ENV_CONFIG in environ else default_config_path()
    layers: list[tuple[dict[str, Any], dict[str, str]]] = []
    if path.exists() or explicit or require_file:
        data = read_toml(path)
        layers.append((data, {f"{s}.{k}": "file" for s, sec in data.items() if isinstance(sec, dict) for k in sec}))
    else:
        path = None
    env, env_origins = env_overrides(environ)
    layers.append((env, env_origins))
    if overrides:
        layers.append((overrides, {f"{s}.{k}": "cli" for s, sec in overrides.items() for k in sec}))

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for data, layer_origins in layers:
        for section, values in data.items():
            if not isinstance(values, dict):
                where = _where(section, layer_origins, path)
                raise ConfigError(f"{section}{where}: expected a [{section}] table, got {type(values).__name__}")
            merged.setdefault(section, {}).update(values)
        origins.update(layer_origins)
    try:
        config = PocketdConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origins, path)) from None
    return LoadedConfig(config, path, origins)


def validate_file(path: Path) -> PocketdConfig:
    """Validate one file on its own (no environment): `pocketd config check`."""
    return load_config(path, environ={}, require_file=True).config


def _where(dotted: str, origins: Mapping[str, str], path: Path | None) -> str:
    origin = origins.get(dotted)
    if origin == "file" and path is not None:
        return f" (in {path})"
    if origin:
        return f" (from {origin})"
    return ""


def _format_errors(e: ValidationError, origins: Mapping[str, str], path: Path | None) -> str:
    lines = []
    for err in e.errors():
        dotted = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            reason = "unknown setting" if len(err["loc"]) > 1 else "unknown section"
            if len(err["loc"]) == 1:
                reason += f" (sections: {', '.join(SECTIONS)})"
        else:
            reason = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict):
                reason += f" (got {short_repr(err['input'])})"
        lines.append(f"{dotted}{_where(dotted, origins, path)}: {reason}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


# -- rendering ------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {v!r} as TOML")


def render(loaded: LoadedConfig | None = None, *, commented: bool = False) -> str:
    """The config as TOML. `commented`: every line a comment with its description (for `config init`);
    otherwise the effective values, each annotated with where it came from."""
    config = loaded.config if loaded else PocketdConfig()
    out = []
    if commented:
        out.append("# pocketd configuration. Uncomment a line to change it; every value shown is the default.")
        out.append("# Environment variables POCKETD_<SECTION>__<FIELD> override this file.\n")
    for section, model in SECTIONS.items():
        out.append(f"[{section}]")
        values: BaseModel = getattr(config, section)
        for name, info in model.model_fields.items():
            value = getattr(values, name)
            dotted = f"{section}.{name}"
            if commented:
                out.append(f"# {info.description}")
                out.append(f"# {name} = {_toml_value(value)}" if value is not None else f"# {name} =")
            elif value is None:
                out.append(f"# {name} is unset  ({loaded.origin(dotted) if loaded else 'default'})")
            else:
                origin = loaded.origin(dotted) if loaded else "default"
                out.append(f"{name} = {_toml_value(value)}  # {origin}")
        out.append("")
    return "\n".join(out)
