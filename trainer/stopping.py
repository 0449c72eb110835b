"""Honouring stop requests between units of work in every phase of a session (and of the CLI commands).

Long phases (hashing, converting, loading, tokenizing, replaying, evaluating) call
`check_stop(stop, phase)` between their units of work (file chunks, examples, steps,
batches); it raises `Stopped(phase)` once `stop` is set, so a SIGTERM ends a session
within one unit of work. The trainer's entry point turns Stopped into a clean exit 0.

For tests only: `POCKETD_TEST_PHASE_DELAY="tokenizing=0.2,replaying=0.1"` sleeps that many
seconds at each check of those phases (making a phase slow on the tiny model, so a stop
can be sent while it runs). Unset in production: the check is one dict lookup.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from enum import Enum

from .errors import Stopped

log = logging.getLogger(__name__)

TEST_DELAY_ENV = "POCKETD_TEST_PHASE_DELAY"


class PrepPhase(str, Enum):
    """What a session (or command) is doing when a stop request can end it."""

    HASHING = "hashing the model"
    CONVERTING = "converting the model"
    LOADING = "loading the model"
    TOKENIZING = "tokenizing"
    REPLAYING = "replaying"
    EVALUATING = "evaluating"


@functools.lru_cache(maxsize=1)
def _test_delays(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            continue
        if math.isfinite(seconds) and 0 < seconds <= 10:
            out[name.strip()] = seconds
    return out


def test_delay(name: str) -> None:
    """Sleep the test-only delay configured for `name` in POCKETD_TEST_PHASE_DELAY (none in production)."""
    spec = os.environ.get(TEST_DELAY_ENV)
    delay = _test_delays(spec).get(name) if spec else None
    if delay:
        time.sleep(delay)


def check_stop(stop: threading.Event | None, phase: PrepPhase) -> None:
    """Raise Stopped(phase) if a stop was requested (after the test-only delay of that phase, if any)."""
    test_delay(phase.name.lower())
    if stop is not None and stop.is_set():
        log.info("stop requested while %s", phase.value)
        raise Stopped(phase.value)
