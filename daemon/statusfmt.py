"""Human-readable `status` and `history` from the daemon's JSON replies (pure functions)."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "?" if x is None else fmt.format(x)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    h, rem = divmod(s, 3600)
    return f"{h} h {rem // 60} min"


def _when(iso: str | None) -> str:
    if not iso:
        return "?"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def headline(reply: dict[str, Any]) -> str:
    """One line: "waiting: not charging; load 2.10 > 1.50" or "training: step 12, loss 3.21, ..."."""
    state = reply.get("state")
    if state == "training":
        t = reply.get("training") or {}
        if t.get("stopping"):
            return f"training: stopping ({t['stopping']}), step {t.get('step', 0)}"
        if t.get("phase") not in (None, "training"):
            return f"training: {t.get('phase')} (session {t.get('session_id')})"
        parts = [f"step {t.get('step', 0)}", f"loss {_num(t.get('loss'))}",
                 f"{_num(t.get('s_per_step'), '{:.1f}')} s/step",
                 f"RSS {_num(t.get('rss_mb'), '{:.0f}')} MiB", f"ETA {duration(t.get('eta_s'))}"]
        return "training: " + ", ".join(parts)
    if state == "waiting":
        return "waiting: " + ("; ".join(reply.get("reasons") or []) or "?")
    return "idle"


def _power(readings: dict[str, Any]) -> str:
    p = readings.get("power") or {}
    if p.get("on_power") is None:
        text = "power unknown" + (f" ({p['error']})" if p.get("error") else "")
    elif p.get("has_battery") is False:
        text = "on mains (no battery)"
    else:
        text = "on power" if p["on_power"] else "on battery"
    extra = [x for x in (p.get("status"), p.get("percent") is not None and f"{p['percent']:.0f}%",
                         p.get("temperature_c") is not None and f"{p['temperature_c']:.1f} °C") if x]
    return text + (f" ({', '.join(extra)})" if extra else "")


def format_status(reply: dict[str, Any]) -> str:
    lines = [headline(reply)]
    t = reply.get("training")
    if t:
        lines.append(f"  session {t['session_id']} ({t['trigger']}), pid {t['pid']}, "
                     f"running {duration(t.get('elapsed_s'))}, checkpoint {t.get('checkpoint_id') or '-'}")
    if reply.get("paused"):
        lines.append("  paused (pocketd resume to continue)")
    backoff = reply.get("backoff") or {}
    if backoff.get("remaining_s"):
        lines.append(f"  backing off after {backoff['failures']} failed session(s): {duration(backoff['remaining_s'])}")
    data = reply.get("data") or {}
    lines.append(f"data: {data.get('documents', 0)} documents, {data.get('examples', 0)} examples, "
                 f"{data.get('untrained_examples', 0)} untrained")
    ck = reply.get("checkpoint")
    lines.append("checkpoint: none yet" if not ck else
                 f"checkpoint: #{ck['id']} ({ck.get('method', 'mezo')}), {ck['steps']} steps, "
                 f"val loss {_num(ck.get('val_loss'))}")
    last = reply.get("last_session")
    if last:
        end = last.get("end_reason") or ("running" if not last.get("ended_at") else "?")
        losses = ""
        if last.get("loss_first") is not None and last.get("loss_last") is not None:
            losses = f", loss {last['loss_first']:.2f} -> {last['loss_last']:.2f}"
        promoted = {True: ", promoted", False: ", not promoted"}.get(last.get("promoted"), "")
        lines.append(f"last session: #{last['id']} {_when(last.get('started_at'))}: {end} "
                     f"({last.get('steps') or 0} steps{losses}{promoted})")
    readings = reply.get("readings")
    if readings:
        lines.append(f"device: {_power(readings)}, load {_num(readings.get('load1'))}, "
                     f"{_num(readings.get('available_mb'), '{:.0f}')} MiB available"
                     + (f" (read {_when(readings.get('now'))})" if readings.get("now") else ""))
    away = reply.get("away") or {}
    if away.get("active") is not None:
        lines.append("user: " + ("away" if away["active"] else "active")
                     + (f" until {_when(away.get('expires_at'))}" if away.get("expires_at") else ""))
    d = reply.get("daemon") or {}
    if d:
        lines.append(f"daemon: pid {d.get('pid')}, up {duration(d.get('uptime_s'))}, "
                     f"RSS {_num(d.get('rss_mb'), '{:.0f}')} MiB, version {d.get('version')}")
    return "\n".join(lines)


def format_history(reply: dict[str, Any]) -> str:
    lines = ["sessions:"]
    sessions = reply.get("sessions") or []
    if not sessions:
        lines.append("  (none)")
    for s in sessions:
        losses = ""
        if s.get("loss_first") is not None and s.get("loss_last") is not None:
            losses = f", loss {s['loss_first']:.2f} -> {s['loss_last']:.2f}"
        promoted = {True: ", promoted", False: ", not promoted"}.get(s.get("promoted"), "")
        rss = f", peak {s['peak_rss_mb']:.0f} MiB" if s.get("peak_rss_mb") is not None else ""
        lines.append(f"  #{s['id']} {_when(s.get('started_at'))} [{s.get('trigger')}] "
                     f"{s.get('end_reason') or 'running'} ({s.get('steps') or 0} steps{losses}{promoted}{rss})")
    lines.append("events:")
    events = reply.get("events") or []
    if not events:
        lines.append("  (none)")
    for e in events:
        lines.append(f"  {_when(e.get('at'))} {e.get('kind')}: {e.get('message')}")
    return "\n".join(lines)
