"""Human-readable `status` and `history` from the daemon's JSON replies (pure functions).

Human output fits WIDTH (60) columns, so it does not wrap on a phone in portrait: figures are laid
out on short lines, and free text (reasons, end reasons, event messages) is wrapped by `fit`. A
single word longer than the width (a long path) is the one exception: it is never cut.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from datetime import datetime
from typing import Any

WIDTH = 60


def fit(lines: Iterable[str], width: int = WIDTH) -> list[str]:
    """Each line as it is if it fits `width`, else wrapped at spaces, its continuation lines indented
    two columns more than it; a word longer than the width stays whole on a line of its own."""
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip(" "))
        out.extend(textwrap.wrap(line.strip(), width=width, initial_indent=" " * indent,
                                 subsequent_indent=" " * (indent + 2), break_long_words=False,
                                 break_on_hyphens=False) or [line])
    return out


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


def when(iso: str | None) -> str:
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


def _session_lines(s: dict[str, Any], indent: str) -> list[str]:
    """A finished (or running) session's end reason and figures, one short line each."""
    end = s.get("end_reason") or ("running" if not s.get("ended_at") else "?")
    figures = []
    if s.get("loss_first") is not None and s.get("loss_last") is not None:
        figures.append(f"loss {s['loss_first']:.2f} -> {s['loss_last']:.2f}")
    promoted = {True: "promoted", False: "not promoted"}.get(s.get("promoted"))
    if promoted:
        figures.append(promoted)
    if s.get("peak_rss_mb") is not None:
        figures.append(f"peak {s['peak_rss_mb']:.0f} MiB")
    return [indent + end] + ([indent + ", ".join(figures)] if figures else [])


def format_status(reply: dict[str, Any]) -> str:
    head = headline(reply)
    if len(head) > WIDTH and reply.get("state") == "waiting" and reply.get("reasons"):
        lines = ["waiting:"] + [f"  {r}" for r in reply["reasons"]]
    else:
        lines = [head]
    t = reply.get("training")
    if t:
        lines.append(f"  session {t['session_id']} ({t['trigger']}), pid {t['pid']}, "
                     f"running {duration(t.get('elapsed_s'))}")
        lines.append(f"  checkpoint {t.get('checkpoint_id') or '-'}")
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
        lines.append(f"last session: #{last['id']} {when(last.get('started_at'))}, "
                     f"{last.get('steps') or 0} steps")
        lines.extend(_session_lines({k: v for k, v in last.items() if k != "peak_rss_mb"}, "  "))
    readings = reply.get("readings")
    if readings:
        lines.append(f"device: {_power(readings)}")
        lines.append(f"  load {_num(readings.get('load1'))}, "
                     f"{_num(readings.get('available_mb'), '{:.0f}')} MiB available"
                     + (f", read {when(readings.get('now'))}" if readings.get("now") else ""))
    away = reply.get("away") or {}
    if away.get("active") is not None:
        lines.append("user: " + ("away" if away["active"] else "active")
                     + (f" until {when(away.get('expires_at'))}" if away.get("expires_at") else ""))
    d = reply.get("daemon") or {}
    if d:
        lines.append(f"daemon: pid {d.get('pid')}, up {duration(d.get('uptime_s'))}, "
                     f"RSS {_num(d.get('rss_mb'), '{:.0f}')} MiB, version {d.get('version')}")
    return "\n".join(fit(lines))


def format_history(reply: dict[str, Any]) -> str:
    lines = ["sessions:"]
    sessions = reply.get("sessions") or []
    if not sessions:
        lines.append("  (none)")
    for s in sessions:
        lines.append(f"  #{s['id']} {when(s.get('started_at'))} [{s.get('trigger')}], {s.get('steps') or 0} steps")
        lines.extend(_session_lines({**s, "end_reason": s.get("end_reason") or "running", "ended_at": None}, "    "))
    lines.append("events:")
    events = reply.get("events") or []
    if not events:
        lines.append("  (none)")
    for e in events:
        lines.append(f"  {when(e.get('at'))} {e.get('kind')}: {e.get('message')}")
    return "\n".join(fit(lines))
