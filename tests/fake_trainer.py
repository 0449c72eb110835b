"""A stand-in for `python -m pocketd.trainer --job JOB.json` that honours trainer/job.py's contract, without torch.

    fake_trainer.py [--mode normal|ignore-term|crash|exit-code] [--step-s S] [--steps N] [--code C] --job FILE

normal: one "step" every S seconds, SessionStatus written atomically after each; stops after
N steps (exit 0) or, on SIGTERM/SIGINT, after finishing the current step (exit 0).
ignore-term: ignores SIGTERM (the supervisor must SIGKILL it). crash: exits 1 after one step.
exit-code: exits with C at once. Beside the status file it writes `<job>.fake.json` with its
pid, process group, session id and niceness, for the tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketd.trainer.job import ExitCode, SessionStatus, TrainingJob, write_private_json  # noqa: E402
from pocketd.trainer.parentwatch import watch_parent  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="normal", choices=["normal", "ignore-term", "crash", "exit-code"])
    parser.add_argument("--step-s", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--code", type=int, default=1)
    parser.add_argument("--job", type=Path, required=True)
    args = parser.parse_args()
    job = TrainingJob.read(args.job)
    if args.mode == "exit-code":
        return args.code
    stop = threading.Event()
    if args.mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent_died: list[str] = []
    watch_parent(lambda reason: (parent_died.append(reason), stop.set()))  # as the real trainer does
    # Written once the signal handlers are in place: a test that saw this file may signal at once.
    write_private_json(args.job.with_name(args.job.name + ".fake.json"), {
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "argv": sys.argv, "memory_budget_mb": job.memory_budget_mb, "max_minutes": job.max_minutes,
        "threads": job.trainer.threads,
    })
    status = SessionStatus(phase="training", checkpoint_id=7)
    loss = 4.0
    for step in range(1, args.steps + 1):
        time.sleep(args.step_s)  # the "step": always finished, even after a stop signal
        loss *= 0.99
        status = status.model_copy(update={
            "step": step, "total_steps": step, "loss": loss, "loss_first": status.loss_first or loss,
            "s_per_step": args.step_s, "rss_mb": 50.0, "peak_rss_mb": 55.0, "eta_s": 60.0,
        })
        if job.status_file:
            write_private_json(job.status_file, status.model_dump(mode="json"))
        if args.mode == "crash":
            print("fake trainer: simulated crash", file=sys.stderr)
            return ExitCode.CRASH
        if stop.is_set():
            break
    reason = f"stopped: {parent_died[0]}" if parent_died else "stop signal" if stop.is_set() else "budget"
    final = status.model_copy(update={"phase": "done", "end_reason": reason,
                                      "promoted": None if stop.is_set() else True, "val_loss": 3.5})
    if job.status_file:
        write_private_json(job.status_file, final.model_dump(mode="json"))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
