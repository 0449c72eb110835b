"""Soak: a real `pocketd run` for an hour, the fake charger plugged and unplugged every few minutes.

    python bench/soak.py [--minutes 60] [--flip-minutes 3] [--stop-within 30] [--keep] [--smoke]

A private daemon in a temporary home (fake power probe, the shipped sample notes ingested
with `pocketd demo`, an inbox folder) trains the real trainer on a tiny random model
(trainer.tiny). The script starts with the charger plugged and flips it every
--flip-minutes; at each flip it drops a few new notes into the inbox, so every plugged
period has new examples to train on. Every 10 s it samples the daemon's RSS (the daemon
process only, not the trainer) with psutil.

At the end it prints: duration, flips, sessions started / ended (from the socket's
`history`), sessions that started while plugged, sessions stopped within --stop-within
seconds of an unplug, plugged periods that got a session, the daemon's RSS at the start
(median of the first minute after a warm-up of one flip period), at the end (median of the
last minute) and its maximum, and the ERROR / Traceback lines of the daemon's log (printed).
Exit status 1 if the RSS grew by more than --max-growth percent (default 10), if the log
holds errors, or if a session started unplugged, outlived an unplug, or a plugged period got
no session.

--smoke: 22 s, one flip after 11 s (time for the stop to be recorded), RSS sampled every second,
the policy checked every second.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

import benchlib
from benchlib import MIB, set_power
from pocketd.daemon.client import ClientError, request

SAMPLE_S = 10.0
ERROR_LINE = re.compile(r"\bERROR\b|Traceback|CRITICAL")
NOTE_TOPICS = [
    "Watered the tomatoes before work; the south bed dries out first.",
    "Rode to the lake and back, 32 km, headwind on the way home.",
    "Baked rye bread with caraway; the dough needed an extra hour to rise.",
    "Read two chapters about lighthouses and their keepers in winter.",
    "The coop meeting moved to Thursday; bring the budget sheet.",
    "Lentil soup again: more cumin, less salt, a squeeze of lemon at the end.",
]


def now() -> datetime:
    return datetime.now(timezone.utc)


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass
class Timeline:
    """When the charger was plugged (True) or unplugged (False), in wall-clock UTC."""

    changes: list[tuple[datetime, bool]] = field(default_factory=list)

    def set(self, at: datetime, plugged: bool) -> None:
        self.changes.append((at, plugged))

    def at(self, when: datetime) -> bool | None:
        state = None
        for t, plugged in self.changes:
            if t <= when:
                state = plugged
        return state

    def unplugs(self) -> list[datetime]:
        return [t for t, plugged in self.changes if not plugged]

    def plugged_periods(self, end: datetime) -> list[tuple[datetime, datetime]]:
        out = []
        for i, (t, plugged) in enumerate(self.changes):
            if plugged:
                stop = self.changes[i + 1][0] if i + 1 < len(self.changes) else end
                out.append((t, stop))
        return out


def drop_notes(inbox: Path, n: int, counter: int) -> None:
    for i in range(n):
        topic = NOTE_TOPICS[(counter + i) % len(NOTE_TOPICS)]
        text = (f"# Note {counter}-{i}\n\n{topic}\n\nWritten at {now().isoformat(timespec='seconds')}; "
                f"entry {counter * 10 + i} of the soak diary. " + "More details about the day. " * (i + 1))
        tmp = inbox / f".note-{counter}-{i}.md.part"  # hidden while written, then renamed into place
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, inbox / f"note-{counter:03d}-{i}.md")


def daemon_env(tmp: Path, home: Path, power: Path, inbox: Path, model_dir: Path, check_s: int = 15,
               inbox_poll_s: int = 10) -> dict[str, str]:
    # Batches big enough that a tiny-model step takes ~0.1 s, not ~5 ms: the checkpoint chain (and
    # so the replay at each session start) then grows at a pace closer to a real model's.
    settings = benchlib.training_daemon_settings(
        model_dir, POCKETD_DAEMON__INBOX=str(inbox), POCKETD_DAEMON__INBOX_POLL_S=str(inbox_poll_s),
        POCKETD_DAEMON__STOP_GRACE_S="30", POCKETD_POLICY__CHECK_INTERVAL_S=str(check_s),
        POCKETD_TRAINER__BATCH_SIZE="16", POCKETD_TRAINER__SEQ_LEN="256", POCKETD_TRAINER__EVAL_EXAMPLES="8")
    del settings["POCKETD_TRAINER__MICRO_BATCH_SIZE"]
    return benchlib.private_env(home, tmp / "run", **settings, **benchlib.fake_power_settings(power, True))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--flip-minutes", type=float, default=3.0)
    parser.add_argument("--notes-per-flip", type=int, default=3)
    parser.add_argument("--stop-within", type=float, default=30.0, help="seconds from unplug to stopped")
    parser.add_argument("--max-growth", type=float, default=10.0, help="allowed daemon RSS growth, percent")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (log, database)")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    global SAMPLE_S
    check_s, poll_s = 15, 10
    if args.smoke:
        args.minutes, args.flip_minutes, args.notes_per_flip = 22 / 60, 11 / 60, 1
        SAMPLE_S, check_s, poll_s = 1.0, 1, 1

    tmp = Path(tempfile.mkdtemp(prefix="pocketd-soak-"))
    home, inbox, power = benchlib.make_home(tmp), tmp / "inbox", tmp / "power.json"
    inbox.mkdir()
    log_path = tmp / "daemon.log"
    model_dir = benchlib.tiny_model(tmp / "tiny-model", in_process=False)
    env = daemon_env(tmp, home, power, inbox, model_dir, check_s, poll_s)
    benchlib.run_cli(env, "demo")
    timeline = Timeline()
    pocketd_run = benchlib.Daemon(env, log_path).start()
    proc, sock = pocketd_run.proc, pocketd_run.sock
    assert proc is not None
    timeline.set(now(), True)
    daemon = psutil.Process(proc.pid)
    print(f"soak: {args.minutes:g} min, flip every {args.flip_minutes:g} min; daemon pid {proc.pid}; "
          f"home {tmp}", flush=True)

    t0 = time.monotonic()
    end_at = t0 + args.minutes * 60
    warmup_s = args.flip_minutes * 60
    next_flip = t0 + args.flip_minutes * 60
    next_sample = t0
    samples: list[tuple[float, float]] = []  # (seconds since start, daemon RSS MiB)
    plugged, flips, notes = True, 0, 0
    stopped_early = None
    try:
        while True:
            t = time.monotonic()
            if proc.poll() is not None:
                stopped_early = f"the daemon exited with status {proc.returncode}"
                break
            if t >= end_at:
                break
            if t >= next_sample:
                try:
                    samples.append((t - t0, daemon.memory_info().rss / MIB))
                except psutil.Error:
                    pass
                next_sample += SAMPLE_S
            if t >= next_flip:
                plugged = not plugged
                set_power(power, plugged)
                timeline.set(now(), plugged)
                flips += 1
                drop_notes(inbox, args.notes_per_flip, notes)
                notes += 1
                next_flip += args.flip_minutes * 60
                try:
                    st = request(sock, "status")
                    state = st["state"] + (f" (session {st['training']['session_id']}, step "
                                           f"{st['training']['step']})" if st.get("training") else "")
                except ClientError as e:
                    state = f"no status: {e}"
                rss = samples[-1][1] if samples else float("nan")
                print(f"[{(t - t0) / 60:5.1f} min] flip {flips}: {'plugged' if plugged else 'unplugged'}; "
                      f"daemon RSS {rss:.1f} MiB; was {state}", flush=True)
            time.sleep(max(0.0, min(next_sample, next_flip, end_at) - time.monotonic()))
    except KeyboardInterrupt:
        stopped_early = "interrupted"
    finally:
        end_wall = now()
        try:
            hist = request(sock, "history", sessions=1000, events=0) if proc.poll() is None else None
        except ClientError:
            hist = None
        pocketd_run.stop(120)
    duration_s = time.monotonic() - t0

    # -- the figures ------------------------------------------------------------------------
    sessions = sorted((hist or {}).get("sessions", []), key=lambda s: s["id"])
    ended = [s for s in sessions if s["ended_at"]]
    started_plugged = [s for s in sessions if timeline.at(parse_ts(s["started_at"])) is True]
    started_unplugged = [s for s in sessions if timeline.at(parse_ts(s["started_at"])) is False]
    unplug_stops: list[float] = []  # seconds from the unplug to the session's end
    outlived: list[str] = []
    for s in sessions:
        start = parse_ts(s["started_at"])
        stop = parse_ts(s["ended_at"]) if s["ended_at"] else end_wall
        for u in timeline.unplugs():
            if start < u <= stop:  # running at an unplug
                delay = (stop - u).total_seconds()
                unplug_stops.append(delay)
                if delay > args.stop_within or "unplugged" not in (s["end_reason"] or ""):
                    outlived.append(f"session {s['id']}: ended {delay:.1f} s after the unplug: {s['end_reason']}")
                break
    periods = timeline.plugged_periods(end_wall)
    served = [p for p in periods
              if any(p[0] <= parse_ts(s["started_at"]) < p[1] for s in sessions)]
    # A plugged period shorter than a policy check plus a trainer start may see no session.
    long_periods = [p for p in periods if (p[1] - p[0]).total_seconds() >= 45]
    unserved = [p for p in long_periods if p not in served]
    reasons = Counter(re.sub(r"\d+(?:\.\d+)?", "N", s["end_reason"] or "running") for s in sessions)

    after = [(t, r) for t, r in samples if t >= warmup_s]
    first = [r for t, r in after if t < warmup_s + 60] or [r for _, r in after[:6]]
    last_t = after[-1][0] if after else 0.0
    last = [r for t, r in after if t > last_t - 60]
    rss_start, rss_end = median(first), median(last)
    rss_max = max((r for _, r in after), default=float("nan"))
    growth = (rss_end - rss_start) / rss_start * 100 if after else float("nan")

    log_lines = log_path.read_text(errors="replace").splitlines()
    errors = [line for line in log_lines if ERROR_LINE.search(line)]
    steps = sum(s["steps"] or 0 for s in sessions)
    replays = [int(m.group(1)) for m in re.finditer(r"replayed (\d+) steps", "\n".join(log_lines))]

    print()
    print(f"duration            {duration_s / 60:.1f} min" + (f" (stopped early: {stopped_early})"
                                                                if stopped_early else ""))
    print(f"flips               {flips} (every {args.flip_minutes:g} min; {notes * args.notes_per_flip} notes "
          f"dropped into the inbox)")
    print(f"sessions            {len(sessions)} started, {len(ended)} ended, {steps} steps in all"
          + (f" (longest replay at a session start: {max(replays)} steps)" if replays else ""))
    print(f"started plugged     {len(started_plugged)} / {len(sessions)}"
          + (f"  (started unplugged: {[s['id'] for s in started_unplugged]})" if started_unplugged else ""))
    print(f"stopped on unplug   {sum(d <= args.stop_within for d in unplug_stops)} / {len(unplug_stops)} within "
          f"{args.stop_within:g} s (max {max(unplug_stops, default=float('nan')):.1f} s, "
          f"median {median(unplug_stops):.1f} s)")
    print(f"plugged periods     {len(served)} / {len(periods)} got a session")
    print("end reasons         " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))
    print(f"daemon RSS          start {rss_start:.1f} MiB (after {warmup_s / 60:g} min warm-up), end "
          f"{rss_end:.1f} MiB, max {rss_max:.1f} MiB, growth {growth:+.1f} % ({len(samples)} samples)")
    print(f"log errors          {len(errors)} ERROR/Traceback lines in {len(log_lines)} lines ({log_path})")
    for line in errors[:50]:
        print(f"    {line}")

    problems = []
    if stopped_early:
        problems.append(stopped_early)
    if not sessions:
        problems.append("no session at all")
    if not (growth <= args.max_growth):
        problems.append(f"daemon RSS grew {growth:+.1f} % (> {args.max_growth:g} %)")
    if errors:
        problems.append(f"{len(errors)} error lines in the log")
    if started_unplugged:
        problems.append(f"{len(started_unplugged)} session(s) started while unplugged")
    problems += outlived
    if unserved:
        problems.append(f"{len(unserved)} plugged period(s) without a session")
    if proc.returncode not in (0, None):
        problems.append(f"the daemon exited with status {proc.returncode} on SIGTERM")
    print("result              " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
    if args.keep or problems:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
