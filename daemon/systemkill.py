"""Trainers killed by the system: naming the likely cause, and adapting after repeated kills.

A trainer that dies by a signal pocketd did not send (the supervisor knows which it sent)
was killed by something else. On Android 12 and later that is almost always the "phantom
process killer", which SIGKILLs child processes of apps that use a lot of CPU in the
background (termux/termux-app issue 2366); on Linux mostly the kernel's OOM killer.

    on_android(env) -> bool
    system_kill_reason(sig, android=...) -> str     the sentence history and status show
    KillAdaptation                                  fewer torch threads after repeated kills (Android)

Why fewer threads: the phantom process killer targets a child for its CPU use, and the
trainer's CPU use is proportional to its torch threads. Halving them halves the CPU rate
(each step takes longer; every finished step is still committed), where shorter sessions
would only add model loads and a longer wait alone would retry the same way. Elsewhere a
repeated kill is not a CPU question (OOM, a user's `kill`), so only the growing backoff applies.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["README_SECTION", "on_android", "signal_name", "system_kill_reason", "KillAdaptation"]

README_SECTION = "Android: when the system kills the trainer"
_BUILD_PROP = Path("/system/build.prop")


def on_android(env: Mapping[str, str] | None = None, build_prop: Path = _BUILD_PROP) -> bool:
    """Whether this process runs on Android (Termux): ANDROID_ROOT/ANDROID_DATA set, Termux's PREFIX,
    or an Android system partition."""
    env = os.environ if env is None else env
    if env.get("ANDROID_ROOT") or env.get("ANDROID_DATA") or "com.termux" in env.get("PREFIX", ""):
        return True
    try:
        return build_prop.is_file()
    except OSError:
        return False


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def system_kill_reason(sig: int, *, android: bool) -> str:
    """"killed by the system (SIGKILL, not sent by pocketd): <likely cause>" for history and status."""
    text = f"killed by the system ({signal_name(sig)}, not sent by pocketd)"
    if android:
        return (f"{text}: most likely Android's phantom process killer; see the README section "
                f"\"{README_SECTION}\" for the settings that stop it")
    if sig == signal.SIGKILL:
        return f"{text}: most likely the kernel's out-of-memory killer (see `journalctl -k` or dmesg) or another process"
    return f"{text}: another process signalled it"


class KillAdaptation:
    """Counts system kills in a row; on Android, every `after` of them halves the trainer's torch threads.

    `threads` is the override for the next sessions (None: the configured `trainer.threads`).
    The count restarts after a session that was not killed by the system; the lower thread count
    stays for the daemon's life (raising it again would invite the next kill). `after` 0: never adapt.
    Not thread-safe: the daemon calls it with its lock held.
    """

    def __init__(self, *, after: int, android: bool, configured_threads: int | None,
                 cpu_count: int | None = None) -> None:
        self.after = after
        self.android = android
        self.configured_threads = configured_threads
        self.cpu_count = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        self.in_a_row = 0
        self.threads: int | None = None

    def survived(self) -> None:
        """A session ended without a system kill."""
        self.in_a_row = 0

    def killed(self) -> str | None:
        """A session was killed by the system: the adaptation made now as a sentence, or None."""
        self.in_a_row += 1
        if not self.android or self.after <= 0 or self.in_a_row < self.after:
            return None
        self.in_a_row = 0
        current = self.threads or self.configured_threads or self.cpu_count
        if current <= 1:
            return (f"{self.after} system kills in a row with 1 torch thread already: pocketd cannot lower its CPU "
                    f"use further and keeps backing off; see the README section \"{README_SECTION}\"")
        self.threads = max(1, current // 2)
        log.warning("trainer killed by the system %d times in a row: next sessions use %d torch threads instead of %d",
                    self.after, self.threads, current)
        return (f"{self.after} system kills in a row: next sessions use {self.threads} torch thread"
                f"{'' if self.threads == 1 else 's'} instead of {current}, to use less CPU (Android's phantom "
                f"process killer targets CPU-heavy child processes)")
