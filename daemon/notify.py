"""sd_notify in a few lines of stdlib: READY=1 / STOPPING=1 / STATUS=... to $NOTIFY_SOCKET.

Abstract socket addresses ("@name") are supported. Without NOTIFY_SOCKET every
call is a no-op; a failure to notify is logged, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `KEY=value` lines to the service manager; True if a message was sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or not assignments:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.warning("ignoring NOTIFY_SOCKET=%r: not a path or abstract address", address)
        return False
    message = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", env.get("NOTIFY_SOCKET"), e)
        return False
    return True


def _status(text: str | None) -> list[str]:
    return [f"STATUS={' '.join(text.split())}"] if text else []


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *_status(status))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *_status(status))


def status(text: str) -> bool:
    return notify(*_status(text))
