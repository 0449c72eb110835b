"""Latency of the control socket's `watch` stream: a change (pause / resume) to the status line received.

    python bench/socket_watch.py [-n 50] [--socket PATH] [--json] [--smoke]

Without --socket it starts a private daemon (`python -m pocketd.daemon run`) in a temporary home
(fake charger unplugged, empty store: idle), opens one `watch` stream, and then n times alternately
pauses and resumes the daemon over a second connection, timing each change from just before the
request is sent to the arrival of the watcher's status line showing it. Prints n, p50/p90/p99/max in
milliseconds. With --socket it uses that daemon and leaves its pause state as it found it.
--smoke: 10 changes.

Training progress is not measured here: it reaches the daemon when its supervise job reads the
trainer's status file (every 2 s), which bounds how late a new step shows on a watch.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import percentiles
from pocketd.daemon.client import Client, ClientError


class Watcher:
    """A `watch` stream read in a thread: (arrival time, line) pairs on a queue."""

    def __init__(self, path: Path) -> None:
        self.lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.heartbeats = 0
        self.total = 0
        self._client = Client(path, timeout_s=30)
        self._stream = self._client.watch(heartbeat_s=60)
        self.first = next(self._stream)
        threading.Thread(target=self._read, name="watcher", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self._stream:
                now = time.perf_counter()
                self.total += 1
                if line.get("event") == "heartbeat":
                    self.heartbeats += 1
                self.lines.put((now, line))
        except (ClientError, OSError):
            pass  # closed at the end

    def wait_for(self, paused: bool, timeout_s: float = 10.0) -> float:
        """When the first status line with `paused` arrived (RuntimeError after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no status line with paused={paused} within {timeout_s:g} s") from None
            if line.get("event") == "status" and line.get("paused") is paused:
                return at

    def close(self) -> None:
        self._client.close()


def measure(path: Path, n: int) -> dict[str, Any]:
    watcher = Watcher(path)
    was_paused = bool(watcher.first.get("paused"))
    samples: list[float] = []
    with Client(path, timeout_s=30) as control:
        try:
            target = not was_paused
            for _ in range(n):
                t0 = time.perf_counter()
                control.request("pause" if target else "resume")
                samples.append(watcher.wait_for(target) - t0)
                target = not target
        finally:
            control.request("pause" if was_paused else "resume")
            watcher.close()
    return {"latency_ms": percentiles(samples), "lines": watcher.total, "heartbeats": watcher.heartbeats}


def start_private_daemon(tmp: Path) -> benchlib.Daemon:
    """An idle daemon: fake charger unplugged, empty store; returned once its policy has decided."""
    home = benchlib.make_home(tmp)
    env = benchlib.private_env(home, tmp / "run", **benchlib.fake_power_settings(tmp / "power.json", False, 80))
    daemon = benchlib.Daemon(env, tmp / "daemon.log").start()
    daemon.wait_or_exit(lambda: (daemon.status() or {}).get("state", "idle") != "idle", 60, "the daemon to start")
    return daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=50, help="changes to time")
    parser.add_argument("--socket", type=Path, help="an already running daemon's socket")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.n = 10
    with tempfile.TemporaryDirectory(prefix="pocketd-bench-") as tmp:
        daemon = None
        path = args.socket
        if path is None:
            daemon = start_private_daemon(Path(tmp))
            path = daemon.sock
        try:
            result = measure(path, args.n)
        finally:
            if daemon is not None:
                code = daemon.stop(30)
                if code != 0:
                    print(f"warning: the daemon exited with {code}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    r = result["latency_ms"]
    print(f"watch latency, pause/resume -> status line (n={r['n']}): p50 {r['p50']:.2f} ms, "
          f"p90 {r['p90']:.2f} ms, p99 {r['p99']:.2f} ms, max {r['max']:.2f} ms")
    print(f"watch stream: {result['lines']} lines after the first, {result['heartbeats']} heartbeats")
    print("training progress on a watch: within the supervise interval (2 s) of the trainer's status write")


if __name__ == "__main__":
    main()
