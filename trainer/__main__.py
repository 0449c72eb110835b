"""`python -m pocketd.trainer --job JOB.json`: one training session in its own process (see trainer/job.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# transformers 5 would otherwise reach for hub kernels (the `kernels` package, which downloads).
os.environ.setdefault("USE_HUB_KERNELS", "NO")

from pydantic import ValidationError  # noqa: E402

from .errors import ModelNotFound, OverBudget, ReplayMismatch, Stopped, TrainerError  # noqa: E402
from .job import ExitCode, Phase, SessionStatus, TrainingJob, write_private_json  # noqa: E402
from .parentwatch import watch_parent  # noqa: E402

log = logging.getLogger("pocketd.trainer")


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set `stop`: the session finishes its step, commits and returns."""

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the current step", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketd.trainer", description=__doc__)
    parser.add_argument("--job", type=Path, required=True, help="TrainingJob JSON written by the daemon")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        job = TrainingJob.read(args.job)
    except (OSError, ValidationError, ValueError) as e:
        log.error("%s: invalid job file: %s", args.job, e)
        return ExitCode.BAD_JOB
    stop = threading.Event()
    install_stop_handlers(stop)
    parent_died: list[str] = []

    def on_parent_death(reason: str) -> None:  # stop as on SIGTERM: finish the step, commit, exit 0
        parent_died.append(reason)
        stop.set()
        log.warning("%s: finishing the current step and stopping", reason)

    watch_parent(on_parent_death)

    def on_status(status: SessionStatus) -> None:
        if parent_died and status.phase is Phase.DONE:  # for the next daemon's session record
            status = status.model_copy(update={"end_reason": f"stopped: {parent_died[0]}"})
        if job.status_file is not None:
            write_private_json(job.status_file, status.model_dump(mode="json"))

    from .session import run_session

    try:
        outcome = run_session(job, stop, on_status)
    except OverBudget as e:
        log.error("%s", e)
        on_status(SessionStatus(phase=Phase.DONE, end_reason=str(e)))
        return ExitCode.REFUSED_BUDGET
    except ModelNotFound as e:
        log.error("%s", e)
        on_status(SessionStatus(phase=Phase.DONE, end_reason=str(e)))
        return ExitCode.BAD_JOB
    except ReplayMismatch as e:  # the log does not verify: refuse to train on it (the daemon reports why)
        log.error("refusing to train: %s", e)
        on_status(SessionStatus(phase=Phase.DONE, end_reason=f"refused: {e}"))
        return ExitCode.BAD_LOG
    except Stopped as e:  # a stop during loading, converting, tokenizing, replaying or evaluating: a clean end
        log.info("session ended: %s", e)
        on_status(SessionStatus(phase=Phase.DONE, end_reason=str(e)))
        return ExitCode.OK
    except TrainerError as e:
        log.error("%s", e)
        on_status(SessionStatus(phase=Phase.DONE, end_reason=str(e)))
        return ExitCode.CRASH
    except sqlite3.DatabaseError as e:  # a damaged database: name it, no traceback
        log.error("%s: %s", job.database, e)
        on_status(SessionStatus(phase=Phase.DONE, end_reason=f"{job.database}: {e}"))
        return ExitCode.CRASH
    log.info("session ended: %s after %d steps", outcome.end_reason.value, outcome.steps)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
