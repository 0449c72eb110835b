"""Round-trip latency of the control socket's `status` command, and the idle daemon's RSS.

    python bench/status_latency.py [-n 1000] [--socket PATH]

Without --socket it starts a private daemon (`python -m pocketd.daemon run`) in a temporary
home (fake charger unplugged, empty store, so it sits idle), measures, and stops it
with SIGTERM. Two series: a new connection per request (what `pocketd status` does)
and one persistent connection. Prints p50/p90/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pocketd.daemon.client import Client, DaemonNotRunning, request  # noqa: E402


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in samples_s)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]

    return {"n": len(ms), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ms[-1],
            "mean": statistics.fmean(ms)}


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


def start_private_daemon(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETD_") and k != "NOTIFY_SOCKET"}
    home = tmp / "home"
    home.mkdir()
    power = tmp / "power.json"
    power.write_text(json.dumps({"on_power": False, "percent": 80}))
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".local/state"),
        "XDG_RUNTIME_DIR": str(tmp / "run"),
        "POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(power),
    })
    (tmp / "run").mkdir(mode=0o700)
    sock = tmp / "run" / "pocketd" / "pocketd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "run"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if request(sock, "status")["state"] != "idle":
                return proc, sock
        except DaemonNotRunning:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the daemon did not start within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="requests per series")
    parser.add_argument("--socket", type=Path, help="an already running daemon's socket")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pocketd-bench-") as tmp:
        proc = None
        path = args.socket
        if path is None:
            proc, path = start_private_daemon(Path(tmp))
        try:
            time.sleep(1.0)  # let the first policy check settle
            status = request(path, "status")
            results = measure(path, args.n)
            after = request(path, "status")
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(30)
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
