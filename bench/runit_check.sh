#!/usr/bin/env bash
# Run pocketd's termux-services (runit) service under real runit (Debian: apt-get install runit).
#
#   bench/runit_check.sh             # the real `pocketd run` from the repo venv
#   bench/runit_check.sh --standin   # a tiny Python stand-in that exits 0 on SIGTERM
#   POCKETD_RUN_CMD=/path/to/pocketd bench/runit_check.sh   # the service runs "$POCKETD_RUN_CMD run"
#   KEEP=1 bench/runit_check.sh      # keep the temporary folder for a look
#   bench/runit_check.sh --smoke     # the same checks, a shorter steady wait; without runit installed
#                                    # it prints "SKIP runit is not available here" and exits 0
#
# It renders the real templates in systemd_termux/sv/pocketd (via daemon.services, with
# /bin/sh instead of Termux's sh) into a temporary service dir, with a temporary HOME,
# PREFIX and XDG dirs and a fake power file (unplugged, so the daemon only waits), and
# adds a `finish` script (harness only, not part of the service) that records the exit
# status runsv saw. Then: runsv on it; the `down` file keeps it down; `sv up` -> `sv status`
# shows run (and, for the real daemon, `pocketd status` answers); `sv down` -> the process
# exits 0 on SIGTERM within a few seconds, `sv status` shows down, the svlogd log shows a
# clean exit. Prints PASS/FAIL lines with timings; exit status 0 only if all passed.
set -u

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
STOP_LIMIT_S="${STOP_LIMIT_S:-10}"
START_LIMIT_S="${START_LIMIT_S:-30}"
STANDIN=0
SMOKE=0
STEADY_S=2
for arg in "$@"; do
    case "$arg" in
        --standin) STANDIN=1 ;;
        --smoke) SMOKE=1; STEADY_S=1 ;;
        *) echo "usage: $0 [--standin] [--smoke]"; exit 2 ;;
    esac
done

for tool in runsv sv svlogd; do
    if ! command -v "$tool" >/dev/null; then
        if [ "$SMOKE" = 1 ]; then echo "SKIP  runit is not available here: $tool not found (apt-get install runit)"; exit 0; fi
        echo "FAIL  $tool not found (apt-get install runit)"; exit 2
    fi
done

WORK="$(mktemp -d /tmp/pocketd-runit.XXXXXX)"
SVC="$WORK/service/pocketd"
RUNSV_PID=""
FAILS=0
T_START=$EPOCHREALTIME

cleanup() {
    if [ -n "$RUNSV_PID" ] && kill -0 "$RUNSV_PID" 2>/dev/null; then
        sv -w 15 down "$SVC" >/dev/null 2>&1
        sv exit "$SVC" >/dev/null 2>&1
        sv exit "$SVC/log" >/dev/null 2>&1
        for _ in $(seq 50); do kill -0 "$RUNSV_PID" 2>/dev/null || break; sleep 0.1; done
        kill "$RUNSV_PID" 2>/dev/null
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

ms_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }
pass() { echo "PASS  $1"; }
fail() { echo "FAIL  $1"; FAILS=$((FAILS + 1)); }
status() { sv status "$SVC" 2>&1; }
# wait_for SECONDS COMMAND...: poll every 0.05 s until COMMAND succeeds
wait_for() {
    local limit=$1; shift
    local t0=$EPOCHREALTIME
    while :; do
        "$@" && return 0
        [ "$(ms_since "$t0")" -ge $((limit * 1000)) ] && return 1
        sleep 0.05
    done
}

# -- the environment runsv (and so the service) gets ----------------------------------------
export HOME="$WORK/home" PREFIX="$WORK/prefix"
export XDG_CONFIG_HOME="$HOME/.config" XDG_DATA_HOME="$HOME/.local/share" XDG_CACHE_HOME="$HOME/.cache"
export XDG_STATE_HOME="$HOME/.local/state" XDG_RUNTIME_DIR="$WORK/run"
export POCKETD_DAEMON__POWER_PROBE=fake POCKETD_DAEMON__FAKE_POWER_FILE="$WORK/power.json"
export POCKETD_DAEMON__LOG_LEVEL=INFO
unset NOTIFY_SOCKET POCKETD_CONFIG
mkdir -p "$HOME" "$PREFIX" && mkdir -m 700 "$XDG_RUNTIME_DIR"
echo '{"on_power": false, "percent": 80}' > "$WORK/power.json"

if [ "$STANDIN" = 1 ]; then
    cat > "$WORK/standin.py" <<'EOF'
"""Stand-in for `pocketd run`: stays in the foreground, exits 0 on SIGTERM."""
import signal, sys, time
def stop(signum, frame):
    print("standin: SIGTERM received, exiting 0", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("standin: running", sys.argv[1:], flush=True)
while True:
    time.sleep(1)
EOF
    RUN_CMD="$PY $WORK/standin.py"
else
    RUN_CMD="${POCKETD_RUN_CMD:-$REPO/.venv/bin/pocketd}"
fi
REAL_POCKETD=0
[ "$STANDIN" = 0 ] && [ -z "${POCKETD_RUN_CMD:-}" ] && REAL_POCKETD=1
echo "runit check: service runs '$RUN_CMD run' in $WORK"

# -- render the real templates ---------------------------------------------------------------
if ! "$PY" - "$REPO" "$SVC" "$RUN_CMD" <<'EOF'
import os, shlex, sys
from pathlib import Path
repo, svc, cmd = Path(sys.argv[1]), Path(sys.argv[2]), shlex.split(sys.argv[3])
from pocketd.daemon.services import ServiceKind, render_service
for f in render_service(ServiceKind.TERMUX, pocketd_command=cmd, templates_dir=repo / "systemd_termux", sh="/bin/sh"):
    if f.path.parent.name in ("boot", "tasker"):  # Termux:Boot and Termux:Tasker scripts: not runit's
        continue
    rel = f.path.relative_to(Path(os.environ["PREFIX"]) / "var" / "service" / "pocketd")
    out = svc / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f.content)
    out.chmod(f.mode)
EOF
then
    fail "rendering the templates"; exit 1
fi
# harness only: runsv runs ./finish with the exit code (-1 if killed by a signal) and the signal;
# it records them, then runs the service's own finish (the growing delay after crashes).
mv "$SVC/finish" "$SVC/finish.service"
cat > "$SVC/finish" <<EOF
#!/bin/sh
echo "\$1 \$2" >> "$WORK/exits"
exec ./finish.service "\$@"
EOF
chmod 755 "$SVC/finish"
[ -e "$SVC/down" ] && pass "rendered run, log/run, down from systemd_termux/sv/pocketd" || fail "no down file"

# -- runsv -----------------------------------------------------------------------------------
runsv "$SVC" </dev/null >/dev/null 2>&1 &
RUNSV_PID=$!
t0=$EPOCHREALTIME
if wait_for 5 test -p "$SVC/supervise/control"; then
    pass "runsv up (pid $RUNSV_PID) in $(ms_since "$t0") ms"
else
    fail "runsv did not create supervise/control"; exit 1
fi
sleep 0.3
if status | grep -q '^down: '; then
    pass "down file honoured: $(status | head -1)"
else
    fail "expected down before sv up: $(status)"
fi

# -- sv up -----------------------------------------------------------------------------------
t0=$EPOCHREALTIME
sv up "$SVC" >/dev/null
if wait_for "$START_LIMIT_S" sh -c "sv status '$SVC' | grep -q '^run: '"; then
    pass "sv up -> run in $(ms_since "$t0") ms: $(status | head -1)"
else
    fail "sv up: not running after ${START_LIMIT_S}s: $(status)"
fi
PID1="$(sed -n 's/^run: [^(]*(pid \([0-9]*\)).*/\1/p' <<<"$(status)")"
if [ "$REAL_POCKETD" = 1 ]; then
    if wait_for "$START_LIMIT_S" sh -c "'$RUN_CMD' status >/dev/null 2>&1"; then
        pass "pocketd status answers over the socket $(ms_since "$t0") ms after sv up"
        "$RUN_CMD" status 2>&1 | head -5 | sed 's/^/      | /'
    else
        fail "pocketd status did not answer within ${START_LIMIT_S}s"
        "$RUN_CMD" status 2>&1 | head -5 | sed 's/^/      | /'
    fi
fi
sleep "$STEADY_S"
PID2="$(sed -n 's/^run: [^(]*(pid \([0-9]*\)).*/\1/p' <<<"$(status)")"
if [ -n "$PID1" ] && [ "$PID1" = "$PID2" ] && [ ! -s "$WORK/exits" ]; then
    pass "still running $STEADY_S s later, same pid $PID1 (no restart loop)"
else
    fail "service restarted or died (pid '$PID1' -> '$PID2', exits: $(cat "$WORK/exits" 2>/dev/null))"
fi
if status | grep -q '; run: log: '; then pass "log service running: $(status | sed 's/.*; //')"; else fail "log service: $(status)"; fi

# -- sv down ---------------------------------------------------------------------------------
t0=$EPOCHREALTIME
sv down "$SVC" >/dev/null
if wait_for "$STOP_LIMIT_S" test -s "$WORK/exits"; then
    STOP_MS=$(ms_since "$t0")
    read -r CODE SIG < "$WORK/exits"
    if [ "$CODE" = 0 ]; then
        pass "sv down -> exited 0 on SIGTERM in $STOP_MS ms"
    else
        fail "sv down -> exit code $CODE signal $SIG after $STOP_MS ms (want 0)"
    fi
else
    fail "sv down: still running after ${STOP_LIMIT_S}s: $(status)"
fi
if wait_for 3 sh -c "sv status '$SVC' | grep -q '^down: '"; then
    pass "sv status: $(status | head -1)"
else
    fail "sv status after down: $(status)"
fi

# -- the log ---------------------------------------------------------------------------------
LOG="$PREFIX/var/log/sv/pocketd/current"
sleep 0.5  # let svlogd flush
if [ -s "$LOG" ]; then
    pass "svlogd log at \$PREFIX/var/log/sv/pocketd/current ($(wc -l < "$LOG") lines, timestamped)"
    tail -n 8 "$LOG" | sed 's/^/      | /'
    if grep -Eq '^[0-9]{4}-[0-9]{2}-[0-9]{2}_[0-9:.]+ ' "$LOG"; then pass "log lines carry svlogd -tt timestamps"; else fail "no -tt timestamps in the log"; fi
    if grep -Eqi 'Traceback|CRITICAL' "$LOG"; then fail "traceback/critical in the log"; else pass "no traceback in the log"; fi
    if [ "$REAL_POCKETD" = 1 ] || [ "$STANDIN" = 1 ]; then
        if tail -n 5 "$LOG" | grep -Eqi 'exit|stop|shut|SIGTERM'; then pass "log shows a clean shutdown"; else fail "log does not show the shutdown"; fi
    fi
else
    fail "no log at $LOG"
fi

echo "runit check: $([ $FAILS = 0 ] && echo ALL PASSED || echo "$FAILS FAILED") in $(ms_since "$T_START") ms"
[ $FAILS = 0 ]
