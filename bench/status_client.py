"""Wall time of the `pocketd status` client against a running daemon, beside the bare interpreter's
`python -c pass`; and the daemon's own time from start to "socket ready".

    python bench/status_client.py [-n 20] [--starts 5] [--configured N] [--json] [--smoke]

It starts a private daemon (`python -m pocketd.daemon run`, temporary home, fake charger unplugged,
empty store) and runs `pocketd status` (the console script beside this interpreter, else
`python -m pocketd.daemon status`) N times interleaved with `python -c pass` N times, each a fresh
process with the same environment; it prints p50/p90 of each (ms) and the ratio of the p50s (the
goal: at most 3). The client's environment is the daemon's private home without the daemon's
POCKETD_* settings: nothing configured, as a user's shell usually is. `--configured N` adds N runs
with those settings in the environment (the client then loads and validates the whole config).
Where the environment sets PYTHONDONTWRITEBYTECODE (sandboxes do), both commands get a private
PYTHONPYCACHEPREFIX instead, so pocketd's modules load from bytecode as an installed pocketd's do
(`--as-is` keeps the environment: then they are compiled on every run).
Then it starts the daemon `--starts` times more and reports the time from the process start to
the first `status` reply (p50, and the first, cold start's, separately).
--smoke: 5 runs, 2 starts, 2 configured runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import percentiles
from pocketd.daemon.client import ClientError, request

GOAL_RATIO = 3.0


def status_command() -> list[str]:
    """`pocketd status` as a user runs it: the console script if it sits beside this interpreter."""
    script = Path(sys.executable).with_name("pocketd")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "status"]
    return [sys.executable, "-m", "pocketd.daemon", "status"]


def run_once(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one run (start to exit); RuntimeError with its output if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=benchlib.ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]!r}")
    return elapsed


def interleaved(a: list[str], b: list[str], env: dict[str, str], n: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    """`a` and `b` run in turn (a b a b ...), so drift in the machine's speed hits both alike."""
    for _ in range(warmup):
        run_once(a, env)
        run_once(b, env)
    ta, tb = [], []
    for _ in range(n):
        ta.append(run_once(a, env))
        tb.append(run_once(b, env))
    return ta, tb


def client_env(daemon_env: dict[str, str]) -> dict[str, str]:
    """The daemon's private home and XDG dirs, without its POCKETD_* settings."""
    return {k: v for k, v in daemon_env.items() if not k.startswith("POCKETD_")}


def with_bytecode(env: dict[str, str], pycache: Path) -> dict[str, str]:
    """`env` with bytecode written and read under `pycache` (for every module, both commands alike)."""
    out = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out["PYTHONPYCACHEPREFIX"] = str(pycache)
    return out


def bytecode_disabled() -> bool:
    return bool(os.environ.get("PYTHONDONTWRITEBYTECODE")) or sys.flags.dont_write_bytecode


def time_to_ready(env: dict[str, str], log: Path, timeout_s: float = 60.0) -> float:
    """Start a daemon, seconds until it answers `status` on its socket; then stop it (SIGTERM)."""
    daemon = benchlib.Daemon(env, log)
    t0 = time.perf_counter()
    daemon.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                request(daemon.sock, "status", timeout_s=5.0)
                break
            except ClientError:
                pass
            if (dead := daemon.dead()) is not None:
                raise RuntimeError(dead)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no status reply within {timeout_s:.0f} s:\n{daemon.log_tail()}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
    except BaseException:
        daemon.stop(30)
        raise
    code = daemon.stop(30)
    if code != 0:
        raise RuntimeError(f"the daemon exited {code} on SIGTERM:\n{daemon.log_tail()}")
    return elapsed


def measure(tmp: Path, n: int, starts: int, configured: int, cache_bytecode: bool) -> dict[str, Any]:
    home = benchlib.make_home(tmp)
    env = benchlib.private_env(home, tmp / "run", **benchlib.fake_power_settings(tmp / "power.json", False, 80))
    log = tmp / "daemon.log"
    # start to ready: the first start creates the database and folders (cold), the others reuse them
    ready = [time_to_ready(env, log) for _ in range(max(1, starts))]
    daemon = benchlib.Daemon(env, log).start()
    try:
        daemon.ready(60)
        status, bare = status_command(), [sys.executable, "-c", "pass"]
        quiet, loud = client_env(env), env
        if cache_bytecode:
            quiet, loud = with_bytecode(quiet, tmp / "pycache"), with_bytecode(loud, tmp / "pycache")
        t_status, t_bare = interleaved(status, bare, quiet, n)
        t_configured = [run_once(status, loud) for _ in range(configured)]
    finally:
        code = daemon.stop(30)
        if code != 0:
            print(f"warning: the daemon exited with {code}", file=sys.stderr)
    s, b = percentiles(t_status), percentiles(t_bare)
    out: dict[str, Any] = {
        "command": " ".join(status), "runs": n, "bytecode_cached": cache_bytecode,
        "status_ms": {"p50": s["p50"], "p90": s["p90"]}, "python_pass_ms": {"p50": b["p50"], "p90": b["p90"]},
        "ratio_p50": s["p50"] / b["p50"], "goal_ratio": GOAL_RATIO,
        "ready_ms": {"starts": len(ready), "p50": percentiles(ready)["p50"], "cold": ready[0] * 1000},
    }
    if t_configured:
        c = percentiles(t_configured)
        out["configured_status_ms"] = {"runs": len(t_configured), "p50": c["p50"], "p90": c["p90"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20, help="runs of each command (default 20)")
    parser.add_argument("--starts", type=int, default=5, help="daemon starts timed to socket-ready (default 5)")
    parser.add_argument("--configured", type=int, default=0, metavar="N",
                        help="N more status runs with the daemon's POCKETD_* settings in the environment")
    parser.add_argument("--as-is", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE if set (pocketd's modules compiled on every run)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.n, args.starts, args.configured = 5, 2, 2
    benchlib.offline_defaults()
    with tempfile.TemporaryDirectory(prefix="pocketd-bench-") as tmp:
        out = measure(Path(tmp), args.n, args.starts, args.configured, bytecode_disabled() and not args.as_is)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    s, b, r = out["status_ms"], out["python_pass_ms"], out["ready_ms"]
    print(f"{out['command']} vs python -c pass, {out['runs']} runs each, interleaved:")
    print(benchlib.table(["command", "p50 ms", "p90 ms"],
                         [["pocketd status", f"{s['p50']:.1f}", f"{s['p90']:.1f}"],
                          ["python -c pass", f"{b['p50']:.1f}", f"{b['p90']:.1f}"]]))
    verdict = "within" if out["ratio_p50"] <= GOAL_RATIO else "over"
    print(f"ratio of p50s: {out['ratio_p50']:.2f} ({verdict} the goal of {GOAL_RATIO:g})")
    if out["bytecode_cached"]:
        print("bytecode: cached in a private PYTHONPYCACHEPREFIX (this environment sets PYTHONDONTWRITEBYTECODE; "
              "--as-is to keep it)")
    if "configured_status_ms" in out:
        c = out["configured_status_ms"]
        print(f"pocketd status with POCKETD_* settings (full config load), {c['runs']} runs: "
              f"p50 {c['p50']:.1f} ms, p90 {c['p90']:.1f} ms")
    print(f"daemon start to socket ready ({r['starts']} starts): p50 {r['p50']:.0f} ms, "
          f"first (cold) start {r['cold']:.0f} ms")


if __name__ == "__main__":
    main()
