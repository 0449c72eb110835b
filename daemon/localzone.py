"""Which IANA time zone quiet hours use: `policy.timezone`, else `$TZ`, else the system's zone.

A zone, not an offset: `datetime.now().astimezone().tzinfo` is a fixed UTC offset taken once,
so after a daylight-saving change quiet hours would be an hour off until a restart. A
`ZoneInfo` applies each instant's own offset.

    valid_zone_name(name) -> bool          a name ZoneInfo knows (checked by `config check`)
    local_zone(configured, env) -> ZoneChoice   the zone to use, and where it came from

The system's zone is read from `/etc/localtime` (a symlink into a zoneinfo folder, or a TZif
file), or on Android from the `persist.sys.timezone` property (the Termux run script exports
it as `TZ`). When nothing names a zone the result is UTC, said so in `source`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

log = logging.getLogger(__name__)

__all__ = ["ZoneChoice", "valid_zone_name", "local_zone", "LOCALTIME"]

LOCALTIME = Path("/etc/localtime")
_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*", re.ASCII)
_MAX_NAME = 64
_GETPROP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ZoneChoice:
    zone: ZoneInfo
    source: str  # "policy.timezone", "TZ", "/etc/localtime", "Android (persist.sys.timezone)", "UTC (no zone set)"

    @property
    def name(self) -> str:
        return self.zone.key or "?"


def _zone(name: str) -> ZoneInfo | None:
    """ZoneInfo(name) for a plausible IANA name (no paths, no POSIX rule strings), else None."""
    if not name or len(name) > _MAX_NAME or not _NAME.fullmatch(name) or ".." in name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def valid_zone_name(name: str) -> bool:
    """Whether `name` is an IANA zone this system (or the tzdata package) knows."""
    return _zone(name) is not None


def _zone_from_localtime(path: Path) -> ZoneInfo | None:
    """The zone `/etc/localtime` links to (".../zoneinfo/Europe/Berlin"), else None."""
    try:
        target = os.path.realpath(path) if path.is_symlink() else None
    except OSError:
        return None
    if target and "/zoneinfo/" in target:
        return _zone(target.split("/zoneinfo/", 1)[1])
    return None


def _zone_from_getprop(env: Mapping[str, str]) -> ZoneInfo | None:
    """Android's `persist.sys.timezone` (Termux has `getprop`); None elsewhere or on any failure."""
    exe = shutil.which("getprop", path=env.get("PATH"))
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "persist.sys.timezone"], capture_output=True, timeout=_GETPROP_TIMEOUT_S,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return _zone(out.stdout[:_MAX_NAME + 1].decode("ascii", "replace").strip())


def local_zone(configured: str | None = None, env: Mapping[str, str] | None = None,
               localtime: Path = LOCALTIME) -> ZoneChoice:
    """The zone for quiet hours: `configured` (ValueError if unknown), else `$TZ` (an IANA name, with or
    without the leading ":"; anything else is logged and skipped), else the system's zone, else UTC."""
    env = os.environ if env is None else env
    if configured is not None:
        zone = _zone(configured)
        if zone is None:
            raise ValueError(f"unknown timezone {configured!r} (expected an IANA name such as \"Europe/Berlin\")")
        return ZoneChoice(zone, "policy.timezone")
    tz = env.get("TZ", "").strip()
    if tz:
        zone = _zone(tz.removeprefix(":"))
        if zone is not None:
            return ZoneChoice(zone, "TZ")
        log.warning("TZ=%r is not an IANA zone name; using the system's zone for quiet hours", tz[:80])
    zone = _zone_from_localtime(localtime)
    if zone is not None:
        return ZoneChoice(zone, str(localtime))
    if localtime.is_file():
        try:
            with open(localtime, "rb") as f:
                return ZoneChoice(ZoneInfo.from_file(f, key="localtime"), str(localtime))
        except (OSError, ValueError) as e:
            log.warning("cannot read %s: %s", localtime, e)
    zone = _zone_from_getprop(env)
    if zone is not None:
        return ZoneChoice(zone, "Android (persist.sys.timezone)")
    return ZoneChoice(ZoneInfo("UTC"), "UTC (no zone set)")
