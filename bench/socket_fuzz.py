"""Socket fuzzing and load against a real `pocketd run` that is training (issue 5, "Proof under faults").

    python bench/socket_fuzz.py [--requests 10000] [--clients 100] [--per-client 20] [--slow 5] [--seed 0]
                                [--smoke]

Starts a private daemon (`python -m pocketd.daemon run`) in a temporary home: the fake charger
plugged, the sample notes ingested, the real trainer on a tiny random model
(trainer.tiny, one torch thread), so a session trains the whole time. Then, on the
daemon's real limits (1 MiB requests, 10 s request timeout, 32 connections):

1. a few slow clients in the background that send one byte per second;
2. the structured part with hypothesis: random JSON objects (random keys, values, types
   and command names), wrong argument types for every real command, unicode in commands
   and arguments (ingested for real when valid);
3. the rest from a seeded RNG over 8 client threads: random bytes, JSON-ish noise,
   truncated JSON, huge JSON past the size limit, deep nesting, unknown commands, requests
   without a trailing newline, pipelined requests, clients that disconnect mid-request and
   mid-reply, and valid status/history requests;
4. 100 concurrent clients asking `status` (a new connection per request, as `pocketd
   status` does) while the session trains: p50/p99 latency.

A reply is well-formed when every non-blank request line got exactly one reply (fewer only
when the last is `too_large`, after which the daemon closes), each a JSON object on one
line with `ok`, and failures carry an `error` whose code is a known ErrorCode. `internal`
(a handler bug) is counted separately. Prints the figures; exit status 1 if any check fails.

--smoke: 300 requests, 10 load clients x 3, one slow client, a 2 s request timeout.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import string
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import benchlib
from benchlib import connect, exchange, percentiles
from pocketd.daemon.client import Client, ClientError, request
from pocketd.daemon.protocol import ARGS, Command, ErrorCode

MAX_REQUEST = 1 << 20  # the daemon's default request_max_bytes, which this bench keeps
CODES = {c.value for c in ErrorCode}
REAL = [c.value for c in Command]
# valid requests the fuzzer may send: nothing that would stop the session or the daemon
HARMLESS = ["status", "history", "train-now", "resume", "ingest"]


# -- bookkeeping ------------------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0  # requests sent: one connection each, whatever it carries
        self.lines = 0  # the non-blank request lines they carried (a pipeline or random bytes carry several)
        self.by_kind: Counter[str] = Counter()
        self.replies = 0
        self.well_formed = 0
        self.unread = 0  # requests whose reply was deliberately not read (disconnects)
        self.codes: Counter[str] = Counter()
        self.problems: list[str] = []

    def sent(self, kind: str, lines: int = 1) -> None:
        with self.lock:
            self.requests += 1
            self.lines += lines
            self.by_kind[kind] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


TALLY = Tally()


def non_blank_lines(data: bytes) -> int:
    return sum(1 for piece in data.split(b"\n") if piece.strip())


def judge(kind: str, data: bytes, raw: bytes) -> list[dict[str, Any]]:
    """Check the replies to `data` (sent whole, then EOF); record them; return them."""
    expected = non_blank_lines(data)
    replies: list[dict[str, Any]] = []
    lines = raw.split(b"\n")
    tail = lines.pop()
    bad = 0
    for line in lines:
        try:
            reply = json.loads(line.decode("utf-8"))
            ok = isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
            if ok and not reply["ok"]:
                err = reply.get("error")
                ok = (set(reply) - {"id"} == {"ok", "error"} and isinstance(err, dict) and err.get("code") in CODES
                      and isinstance(err.get("message"), str) and bool(err["message"]))
        except (UnicodeDecodeError, ValueError):
            ok, reply = False, None
        if ok:
            replies.append(reply)
        else:
            bad += 1
            TALLY.problem(f"{kind}: malformed reply {line[:200]!r}")
    if tail:
        bad += 1
        TALLY.problem(f"{kind}: reply without its newline {tail[:200]!r}")
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    n = len(replies) + bad
    if codes and codes[-1] in ("too_large", "timeout"):
        if n > expected:
            TALLY.problem(f"{kind}: {n} replies to {expected} request lines")
    elif n != expected:
        TALLY.problem(f"{kind}: {n} replies to {expected} request lines: {data[:120]!r} -> {raw[:300]!r}")
        bad += abs(expected - n) if n < expected else 0
    with TALLY.lock:
        TALLY.replies += len(replies) + bad
        TALLY.well_formed += len(replies)
        TALLY.codes.update(codes)
    if ErrorCode.INTERNAL.value in codes:
        TALLY.problem(f"{kind}: internal error for {data[:200]!r}: {replies[codes.index('internal')]}")
    return replies


def send(kind: str, path: Path, data: bytes) -> list[dict[str, Any]]:
    TALLY.sent(kind, non_blank_lines(data))
    return judge(kind, data, exchange(path, data))


# -- the unstructured part: a seeded RNG ------------------------------------------------------------------------


def valid_line(r: random.Random) -> bytes:
    return r.choice([b'{"cmd":"status"}', b'{"cmd":"history"}', b'{"cmd": "history", "sessions": 3, "events": 5}'])


def mk_random_bytes(r: random.Random) -> bytes:
    return r.randbytes(r.randrange(1, 4096))


def mk_json_noise(r: random.Random) -> bytes:
    alphabet = '{}[]":,0123456789.eE+-truefalsnul \\\t\r\ncmdstau'
    return "".join(r.choice(alphabet) for _ in range(r.randrange(1, 400))).encode() + b"\n"


def mk_truncated(r: random.Random) -> bytes:
    full = json.dumps(r.choice([{"cmd": "status"}, {"cmd": "history", "sessions": 2},
                                {"cmd": "ingest", "text": "half a note", "source": "fuzz"},
                                {"cmd": "signal", "away": True, "expires_in_s": 60}])).encode()
    return full[: r.randrange(1, len(full))] + r.choice([b"", b"\n"])


def mk_huge(r: random.Random) -> bytes:
    body = b'{"cmd":"ingest","text":"' + b"a" * (MAX_REQUEST + r.randrange(1, 200_000))
    return body + r.choice([b'"}\n', b'"}', b""])


def mk_deep(r: random.Random) -> bytes:
    depth = r.choice([r.randrange(1, 1000), r.randrange(1000, 60_000)])
    opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
    nested = opener * depth + b"1" + closer * depth
    return r.choice([nested, b'{"cmd":"status","x":' + nested + b"}", b'{"cmd":' + nested + b"}",
                     b'{"cmd":"history","sessions":' + nested + b"}"]) + b"\n"


def mk_unknown(r: random.Random) -> bytes:
    name = r.choice([
        r.choice(REAL).upper(), r.choice(REAL) + "_", " " + r.choice(REAL), r.choice(REAL).replace("-", "_") + "x",
        "".join(r.choice(string.printable) for _ in range(r.randrange(0, 40))),
        "".join(chr(r.randrange(0x20, 0x2FFFF)) for _ in range(r.randrange(1, 20))),
    ])
    if name in REAL:
        name += "?"
    return json.dumps({"cmd": name}, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass") + b"\n"


def mk_no_newline(r: random.Random) -> bytes:
    return r.choice([valid_line(r), b'{"cmd":"nope"}', b"not json", b'{"cmd":"history","sessions":"3"}'])


def mk_pipelined(r: random.Random) -> bytes:
    lines = [r.choice([valid_line(r), b"junk", b'{"cmd":"x"}', b"", b"[]", b'{"cmd":"status","a":1}'])
             for _ in range(r.randrange(2, 12))]
    return b"\n".join(lines) + r.choice([b"", b"\n"])


def mk_valid(r: random.Random) -> bytes:
    return valid_line(r) + b"\n"


GENERATORS: dict[str, tuple[Callable[[random.Random], bytes], float]] = {
    "random bytes": (mk_random_bytes, 20),
    "json noise": (mk_json_noise, 10),
    "truncated json": (mk_truncated, 15),
    "huge json (> 1 MiB)": (mk_huge, 1),
    "deep nesting": (mk_deep, 8),
    "unknown command": (mk_unknown, 12),
    "no trailing newline": (mk_no_newline, 10),
    "pipelined": (mk_pipelined, 6),
    "valid status/history": (mk_valid, 8),
    "disconnect mid-request": (None, 4),  # type: ignore[dict-item]
    "disconnect mid-reply": (None, 4),  # type: ignore[dict-item]
}


def disconnect_mid_request(path: Path, r: random.Random) -> None:
    line = json.dumps({"cmd": "ingest", "text": "never finished " * 20}).encode()
    with connect(path, 10) as s:
        s.sendall(line[: r.randrange(1, len(line))])
    TALLY.sent("disconnect mid-request")
    with TALLY.lock:
        TALLY.unread += 1


def disconnect_mid_reply(path: Path, r: random.Random) -> None:
    n = r.randrange(1, 20)
    with connect(path, 10) as s:
        s.sendall(b'{"cmd":"history","sessions":1000,"events":1000}\n' * n)
        s.shutdown(socket.SHUT_WR)  # no more requests: the daemon closes once it has answered (or failed to)
        want = r.choice([0, 1, 50, 2000])
        got = 0
        while got < want:
            chunk = s.recv(want - got)
            if not chunk:
                break
            got += len(chunk)
    TALLY.sent("disconnect mid-reply", n)
    with TALLY.lock:
        TALLY.unread += n


def unstructured(path: Path, n: int, seed: int, workers: int = 8) -> None:
    names = list(GENERATORS)
    weights = [GENERATORS[k][1] for k in names]
    plan = random.Random(seed).choices(names, weights, k=n)

    def one(i: int) -> None:
        r = random.Random(seed * 1_000_003 + i)
        kind = plan[i]
        try:
            if kind == "disconnect mid-request":
                disconnect_mid_request(path, r)
            elif kind == "disconnect mid-reply":
                disconnect_mid_reply(path, r)
            else:
                send(kind, path, GENERATORS[kind][0](r))
        except OSError as e:
            TALLY.problem(f"{kind}: {type(e).__name__}: {e}")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))


# -- the structured part: hypothesis ------------------------------------------------------------------------------


def structured(path: Path, n: int, seed: int) -> None:
    from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
    not_str = scalars.filter(lambda v: not isinstance(v, str)) | st.lists(scalars, max_size=3)
    not_bool = scalars.filter(lambda v: not isinstance(v, bool)) | st.lists(scalars, max_size=3)
    not_int = st.text(max_size=10) | st.none() | st.booleans() | st.lists(scalars, max_size=3) \
        | st.floats(allow_nan=False).filter(lambda x: abs(x) == float("inf") or x != int(x))
    not_num = st.text(max_size=10) | st.booleans() | st.lists(scalars, max_size=3)
    not_list = scalars
    wrong = {
        "ingest": {"text": not_str, "source": not_str, "origin": not_str.filter(lambda v: v is not None)},
        "signal": {"away": not_bool, "expires_in_s": not_num},
        "history": {"sessions": not_int, "events": not_int},
        "forget": {"documents": not_list, "sources": not_list},
        "watch": {"heartbeat_s": not_num | st.none()},
    }
    assert set(wrong) == {c.value for c in ARGS}
    valid = {"ingest": {"text": "a note"}, "signal": {"away": False}, "history": {},
             "forget": {"sources": ["no such source"]}, "watch": {}}

    @st.composite
    def random_object(draw: st.DrawFn) -> tuple[str, Any]:
        obj = draw(st.dictionaries(st.text(max_size=12), values, max_size=5))
        if draw(st.booleans()):
            obj["cmd"] = draw(st.sampled_from(HARMLESS) | st.text(max_size=20) | values)
        if obj.get("cmd") in REAL and obj["cmd"] not in HARMLESS and set(obj) <= {"cmd", "id"}:
            obj["extra"] = 1  # never a valid pause/stop-training/signal/shutdown/watch (`id` is no argument)
        return "random json object", obj

    @st.composite
    def wrong_types(draw: st.DrawFn) -> tuple[str, Any]:
        cmd = draw(st.sampled_from(REAL))
        if cmd not in wrong:
            args = draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in {"cmd", "id"}), values,
                                        min_size=1, max_size=3))
        else:
            names = draw(st.sets(st.sampled_from(sorted(wrong[cmd])), min_size=1))
            args = {**valid[cmd], **{k: draw(wrong[cmd][k]) for k in names}}
        return "wrong argument types", {"cmd": cmd, **args}

    @st.composite
    def unicode(draw: st.DrawFn) -> tuple[str, Any]:
        text = draw(st.text(min_size=1, max_size=300))
        return "unicode", draw(st.sampled_from([
            {"cmd": "ingest", "text": text, "source": draw(st.text(min_size=1, max_size=30))},
            {"cmd": text}, {"cmd": "status", text: text},
        ]))

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hyp_seed(seed)
    @given(item=random_object() | wrong_types() | unicode(), ascii_only=st.booleans(), newline=st.booleans())
    def run(item: tuple[str, Any], ascii_only: bool, newline: bool) -> None:
        kind, obj = item
        data = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        if newline:
            data += b"\n"
        try:
            replies = send(kind, path, data)
        except OSError as e:
            TALLY.problem(f"{kind}: {type(e).__name__}: {e}")
            return
        if kind == "wrong argument types" and replies and replies[0].get("error", {}).get("code") != "bad_args":
            TALLY.problem(f"wrong types not refused as bad_args: {obj!r} -> {replies[0]}")

    run()


# -- slow clients ---------------------------------------------------------------------------------------------------


def slow_client(path: Path, payloads: list[bytes], results: list[str]) -> None:
    """Send each payload one byte per second on its own connection; note what came back."""
    for data in payloads:
        with connect(path, 60) as s:
            raw = b""
            start = time.monotonic()
            for i in range(len(data)):
                try:
                    s.sendall(data[i:i + 1])
                except OSError:
                    break
                if i == len(data) - 1:
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                ready, _, _ = select.select([s], [], [], 1.0)
                if ready:
                    break  # the daemon answered (a timeout, or the reply to the whole request)
            while True:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                raw += chunk
            TALLY.sent("slow client (1 byte/s)")
            replies = judge("slow client (1 byte/s)", data, raw)
            code = replies[0]["error"]["code"] if replies and not replies[0]["ok"] else "ok" if replies else "none"
            results.append(f"{len(data)} bytes in {time.monotonic() - start:.0f} s -> {code}")


# -- load --------------------------------------------------------------------------------------------------------------


def load(path: Path, clients: int, per_client: int) -> tuple[list[float], Counter[str], list[int]]:
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    steps: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client() -> None:
        barrier.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:  # exactly what `pocketd status` does: a new connection, one request
                with Client(path, timeout_s=60) as c:
                    reply = c.raw({"cmd": "status"})
            except ClientError as e:
                TALLY.problem(f"load: {type(e).__name__}: {e}")
                with lock:
                    outcomes[f"client error: {e}"[:80]] += 1
                continue
            dt = time.perf_counter() - t0
            TALLY.sent("status under 100-client load")
            raw = json.dumps(reply).encode() + b"\n"  # decoded by the client already; judge its shape
            judge("status under 100-client load", b'{"cmd":"status"}\n', raw)
            with lock:
                if reply["ok"]:
                    latencies.append(dt)
                    outcomes["ok"] += 1
                    if reply["state"] == "training":
                        steps.append(reply["training"]["step"])
                    else:
                        outcomes["not training: " + reply["state"]] += 1
                else:
                    outcomes[reply["error"]["code"]] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, outcomes, steps


# -- the daemon ------------------------------------------------------------------------------------------------------


def start_daemon(tmp: Path, request_timeout_s: float | None = None) -> benchlib.Daemon:
    """A private `pocketd run` on the tiny model, plugged, the sample notes ingested; returned once it trains."""
    home = benchlib.make_home(tmp)
    model = benchlib.tiny_model(tmp / "tiny-model", in_process=False)
    settings = benchlib.training_daemon_settings(model, POCKETD_POLICY__MAX_SESSION_MINUTES="60")
    if request_timeout_s is not None:
        settings["POCKETD_DAEMON__REQUEST_TIMEOUT_S"] = str(request_timeout_s)
    env = benchlib.private_env(home, tmp / "run", **settings,
                               **benchlib.fake_power_settings(tmp / "power.json", True))
    benchlib.run_cli(env, "demo")
    daemon = benchlib.Daemon(env, tmp / "daemon.log").start()

    def trained() -> dict[str, Any] | None:
        st = daemon.status()
        if st and st.get("last_session"):
            raise SystemExit(f"the session ended early: {st['last_session']}")
        return benchlib.training_past(st, 0, 1)

    daemon.wait_or_exit(trained, 300, "a training step", interval=0.2)
    return daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000, help="fuzz requests (structured + unstructured)")
    parser.add_argument("--structured", type=float, default=0.4, help="share of them generated by hypothesis")
    parser.add_argument("--clients", type=int, default=100, help="concurrent status clients for the load part")
    parser.add_argument("--per-client", type=int, default=20, help="status requests per load client")
    parser.add_argument("--slow", type=int, default=5, help="slow clients (one byte per second)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-log", type=Path, default=None, help="copy the daemon's log here")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    timeout_s = None
    if args.smoke:
        args.requests, args.clients, args.per_client, args.slow, timeout_s = 300, 10, 3, 1, 2.0

    with tempfile.TemporaryDirectory(prefix="pocketd-fuzz-") as t:
        tmp = Path(t)
        t0 = time.monotonic()
        daemon = start_daemon(tmp, timeout_s)
        proc, sock, log_path = daemon.proc, daemon.sock, daemon.log_path
        assert proc is not None
        first = request(sock, "status")
        print(f"daemon pid {first['daemon']['pid']} training session {first['training']['session_id']} "
              f"(step {first['training']['step']}), ready after {time.monotonic() - t0:.0f} s", flush=True)
        rss_before = first["daemon"]["rss_mb"]
        try:
            slow_results: list[str] = []
            slow_payloads = [b'{"cmd":"status"}\n', b"[]\n"]  # 17 s (past the 10 s timeout), 3 s
            slow = [threading.Thread(target=slow_client, args=(sock, slow_payloads, slow_results))
                    for _ in range(args.slow)]
            for th in slow:
                th.start()
            n_struct = int(args.requests * args.structured)
            t1 = time.monotonic()
            structured(sock, n_struct, args.seed)
            print(f"structured (hypothesis): {TALLY.requests} requests in {time.monotonic() - t1:.0f} s", flush=True)
            t2 = time.monotonic()
            before = TALLY.requests
            unstructured(sock, max(0, args.requests - TALLY.requests), args.seed)
            print(f"unstructured: {TALLY.requests - before} requests in {time.monotonic() - t2:.0f} s", flush=True)
            for th in slow:
                th.join()
            mid = request(sock, "status")
            t3 = time.monotonic()
            latencies, outcomes, steps = load(sock, args.clients, args.per_client)
            load_s = time.monotonic() - t3
            time.sleep(1.0)
            last = request(sock, "status")
            alive = proc.poll() is None
        finally:
            code = daemon.stop(120)
        log_text = log_path.read_text(errors="replace")
        if args.keep_log:
            args.keep_log.write_text(log_text)

    errors = benchlib.error_lines(log_text)
    lat = percentiles(latencies) if latencies else None
    training = last["state"] == "training"
    share = 100.0 * TALLY.well_formed / TALLY.replies if TALLY.replies else 0.0
    print()
    print(f"requests sent: {TALLY.requests} (one connection each), carrying {TALLY.lines} non-blank request lines")
    for kind, n in sorted(TALLY.by_kind.items(), key=lambda x: -x[1]):
        print(f"  {kind}: {n}")
    print(f"replies read: {TALLY.replies}; well-formed: {TALLY.well_formed} ({share:.2f}%); "
          f"replies deliberately left unread (disconnects): {TALLY.unread}")
    print("reply codes: " + ", ".join(f"{k} {v}" for k, v in TALLY.codes.most_common()))
    print(f"internal errors: {TALLY.codes.get('internal', 0)}")
    print("slow clients: " + "; ".join(sorted(Counter(slow_results).keys())) + f" ({len(slow_results)} connections)")
    print(f"daemon alive: {'yes' if alive else 'no'}; still training: {'yes' if training else 'no'} "
          f"(session {mid['training']['session_id'] if mid.get('training') else '-'} -> "
          f"{last['training']['session_id'] if last.get('training') else '-'}, "
          f"step {first['training']['step']} -> {last['training']['step'] if last.get('training') else '-'})")
    print(f"daemon RSS: {rss_before:.1f} MiB before, {last['daemon']['rss_mb']:.1f} MiB after; "
          f"threads after: {last['debug']['threads']}")
    print(f"status under load ({args.clients} concurrent clients x {args.per_client}, new connection per request, "
          f"{load_s:.1f} s): " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    if lat:
        print(f"status latency under load: p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, "
              f"max {lat['max']:.1f} ms (n={lat['n']})")
    print(f"training steps seen during the load: {min(steps) if steps else '-'} -> {max(steps) if steps else '-'}")
    print(f"daemon exit status after SIGTERM: {code}; ERROR/Traceback lines in its log: {len(errors)}")
    for ln in errors[:10]:
        print("  " + ln[:300])
    if TALLY.problems:
        print(f"problems ({len(TALLY.problems)}):")
        for p in TALLY.problems[:20]:
            print("  " + p[:400])
    failed = (not alive or not training or share < 100.0 or TALLY.codes.get("internal", 0) or errors or code != 0
              or TALLY.problems or TALLY.requests < 10_000 and args.requests >= 10_000)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
