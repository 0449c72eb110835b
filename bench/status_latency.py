"""Round-trip latency of the control socket's `status` command, and the idle daemon's RSS.

    python bench/status_latency.py [-n 1000] [--socket PATH] [--smoke]

Without --socket it starts a private daemon (`python -m pocketd.daemon run`) in a temporary
home (fake charger unplugged, empty store, so it sits idle), measures, and stops it
with SIGTERM. Two series: a new connection per request (what `pocketd status` does)
and one persistent connection. Prints p50/p90/p99/max in milliseconds.
--smoke: 50 requests per series.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import percentiles
from pocketd.daemon.client import Client, request


def measure(path: Path, n: int) -> dict[str, dict[str, float]]:
    for _ in range(20):  # warm-up
        request(path, "status")
    fresh = []
    for _ in range(n):
        t0 = time.perf_counter()
        reply = request(path, "status")
        fresh.append(time.perf_counter() - t0)
        if not reply["ok"]:
            raise SystemExit(f"status failed: {reply}")
    persistent = []
    with Client(path) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.request("status")
            persistent.append(time.perf_counter() - t0)
    return {"new connection per request": percentiles(fresh), "one persistent connection": percentiles(persistent)}


def start_private_daemon(tmp: Path) -> benchlib.Daemon:
    """An idle daemon: fake charger unplugged, empty store; returned once its policy has decided."""
    home = benchlib.make_home(tmp)
    env = benchlib.private_env(home, tmp / "run", **benchlib.fake_power_settings(tmp / "power.json", False, 80))
    daemon = benchlib.Daemon(env, tmp / "daemon.log").start()
    daemon.wait_or_exit(lambda: (daemon.status() or {}).get("state", "idle") != "idle", 30, "the daemon to start")
    return daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="requests per series")
    parser.add_argument("--socket", type=Path, help="an already running daemon's socket")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.n = 50
    with tempfile.TemporaryDirectory(prefix="pocketd-bench-") as tmp:
        daemon = None
        path = args.socket
        if path is None:
            daemon = start_private_daemon(Path(tmp))
            path = daemon.sock
        try:
            time.sleep(1.0)  # let the first policy check settle
            status = request(path, "status")
            results = measure(path, args.n)
            after = request(path, "status")
        finally:
            if daemon is not None:
                code = daemon.stop(30)
                if code != 0:
                    print(f"warning: the daemon exited with {code}", file=sys.stderr)
    out = {
        "idle_rss_mb_before": status["daemon"]["rss_mb"],
        "rss_mb_after": after["daemon"]["rss_mb"],
        "torch_loaded": after["debug"]["torch_loaded"],
        "latency_ms": results,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"idle daemon RSS: {out['idle_rss_mb_before']:.1f} MiB (after {2 * args.n} requests: "
          f"{out['rss_mb_after']:.1f} MiB), torch loaded: {out['torch_loaded']}")
    for name, r in results.items():
        print(f"status round trip, {name} (n={r['n']}): p50 {r['p50']:.2f} ms, p90 {r['p90']:.2f} ms, "
              f"p99 {r['p99']:.2f} ms, max {r['max']:.2f} ms")


if __name__ == "__main__":
    main()
