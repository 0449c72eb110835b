"""`pocketd train | eval | checkpoint ...`: the trainer from the command line (torch imported lazily)."""

from __future__ import annotations

import json
import sys
import signal
import threading
from pathlib import Path
from typing import Any

import click

from .cli_context import AppContext, pass_app


def _job(app: AppContext, minutes: float | None, steps: int | None, evaluate: bool) -> Any:
    from pocketd.trainer.job import TrainingJob

    cfg = app.loaded.config
    return TrainingJob(
        database=cfg.paths.database, cache_dir=cfg.paths.cache_dir, trainer=cfg.trainer,
        memory_budget_mb=cfg.policy.memory_budget_mb, max_minutes=minutes, max_steps=steps, evaluate=evaluate,
    )


def _fmt_status(s: Any) -> str:
    parts = [f"step {s.step}", f"loss {s.loss:.4f}" if s.loss is not None else "loss -"]
    if s.s_per_step:
        parts.append(f"{s.s_per_step:.2f} s/step")
    if s.rss_mb:
        parts.append(f"RSS {s.rss_mb:.0f} MiB")
    if s.eta_s is not None:
        parts.append(f"ETA {s.eta_s / 60:.1f} min")
    return ", ".join(parts)


@click.command()
@click.option("--minutes", type=float, default=None, help="Time budget (default: policy.max_session_minutes).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation gate (the candidate stays a candidate).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the session's outcome (steps, end reason, losses, checkpoint, promoted) as JSON.")
@pass_app
def train(app: AppContext, minutes: float | None, steps: int | None, no_eval: bool, as_json: bool) -> None:
    """Run one training session in the foreground (Ctrl-C finishes the step and stops).

    Refuses at once (before loading anything) if a daemon or another `pocketd train` uses the database.
    """
    from pocketd.store import DataLock

    from .config import check_locations

    if minutes is None and steps is None:
        minutes = app.loaded.config.policy.max_session_minutes
    job = _job(app, minutes, steps, not no_eval)
    check_locations(app.loaded.config.paths)
    with DataLock.acquire(job.database, "pocketd train"):  # creates the data folder 0700 if missing
        _train_locked(job, as_json)


def _outcome_dict(out: Any) -> dict[str, Any]:
    """`pocketd train --json`: the session's outcome, the facts the human lines show."""
    return {"end_reason": out.end_reason.value, "steps": out.steps, "skipped_nonfinite": out.skipped_nonfinite,
            "loss_first": out.loss_first, "loss_last": out.loss_last, "checkpoint_id": out.checkpoint_id,
            "evaluated": out.promoted is not None, "promoted": out.promoted, "val_loss": out.val_loss,
            "parent_val_loss": out.parent_val_loss, "exit_code": int(out.exit_code)}


def _train_locked(job: Any, as_json: bool = False) -> None:
    """`pocketd train`'s session, run while holding the database's trainer lock."""
    from pocketd.trainer.session import run_session

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    last_phase = [""]

    def on_status(s: Any) -> None:
        if s.phase != last_phase[0]:
            last_phase[0] = s.phase
            click.echo(f"[{s.phase.value}]" + (f" checkpoint {s.checkpoint_id}" if s.checkpoint_id else ""), err=True)
        if s.phase == "training" and s.step:
            click.echo(_fmt_status(s), err=True)

    from pocketd.trainer.errors import Stopped

    try:
        out = run_session(job, stop, on_status)
    except Stopped as e:  # Ctrl-C while loading, converting, tokenizing, replaying or evaluating
        if as_json:
            click.echo(json.dumps({"end_reason": "stopped", "message": str(e), "steps": 0, "checkpoint_id": None,
                                   "evaluated": False, "promoted": None, "exit_code": 0}))
        else:
            click.echo(f"session: {e}")
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if as_json:
        click.echo(json.dumps(_outcome_dict(out)))
        if out.exit_code != 0:
            raise SystemExit(int(out.exit_code))
        return
    click.echo(f"session: {out.end_reason.value}; {out.steps} steps"
               + (f", {out.skipped_nonfinite} skipped (non-finite)" if out.skipped_nonfinite else ""))
    if out.loss_first is not None:
        click.echo(f"train loss: {out.loss_first:.4f} -> {out.loss_last:.4f}")
    if out.promoted is not None:
        verdict = "promoted to current" if out.promoted else "rejected (validation loss did not improve)"
        vl = f"{out.val_loss:.4f}" if out.val_loss is not None else "-"
        pl = f"{out.parent_val_loss:.4f}" if out.parent_val_loss is not None else "-"
        click.echo(f"checkpoint {out.checkpoint_id}: {verdict}; validation loss {pl} -> {vl}")
    elif out.checkpoint_id is not None:
        click.echo(f"checkpoint {out.checkpoint_id}: candidate, not evaluated (the next session resumes it)")
    if out.exit_code != 0:
        raise SystemExit(int(out.exit_code))


@click.command(name="eval")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def eval_cmd(app: AppContext, as_json: bool) -> None:
    """Validation loss and perplexity of the base model and of the current checkpoint."""
    from pocketd.trainer.data import items_for, pad_id_of
    from pocketd.trainer.errors import NoTrainingData
    from pocketd.trainer.evaluate import eval_items, evaluate
    from pocketd.trainer.model import load_base
    from pocketd.trainer.checkpoints import apply_checkpoint

    cfg = app.loaded.config
    tc = cfg.trainer
    with app.open_store() as store:
        base = load_base(tc.model, cfg.paths.cache_dir, tc.dtype)
        items = eval_items(items_for(store, base.tokenizer, "validation", tc.seq_len), tc.eval_examples)
        if not items:
            raise NoTrainingData("no validation examples in the store: ingest more text first")
        kw = dict(pad_id=pad_id_of(base.tokenizer), batch_size=tc.batch_size,
                  micro_batch=tc.micro_batch_size, chunk_tokens=tc.loss_chunk_tokens)
        rows = {"base": evaluate(base.model, items, **kw)}
        ck = store.log.current()
        if ck is not None:
            apply_checkpoint(store, base.model, ck, base.fingerprint)
            rows[f"checkpoint {ck.id}"] = evaluate(base.model, items, **kw)
    if as_json:
        click.echo(json.dumps({k: {"loss": v.loss, "perplexity": v.perplexity, "tokens": v.tokens}
                               for k, v in rows.items()}))
        return
    click.echo(f"validation: {items.__len__()} windows, {next(iter(rows.values())).tokens} tokens")
    for name, r in rows.items():
        click.echo(f"{name:>16}: loss {r.loss:.4f}  perplexity {r.perplexity:.2f}")
    if ck is None:
        click.echo("(no current checkpoint yet)")


@click.group()
def checkpoint() -> None:
    """List, inspect, verify, export and import seed-replay checkpoints."""


@checkpoint.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoints as a JSON list.")
@pass_app
def ck_list(app: AppContext, as_json: bool) -> None:
    """All checkpoints, newest last."""
    from .statusfmt import WIDTH, fit, when

    with app.open_store() as store:
        cks = store.log.list()
    if as_json:
        click.echo(json.dumps([{k: (v.value if hasattr(v, "value") else v) for k, v in c.__dict__.items()}
                               for c in cks], indent=2, ensure_ascii=False))
        return
    if not cks:
        click.echo("no checkpoints yet")
        return
    click.echo(f"{'id':>4}  {'status':<10}{'parent':>6}  {'steps':>7}  {'val loss':>8}  created")
    for c in cks:
        vl = f"{c.val_loss:.4f}" if c.val_loss is not None else "-"
        click.echo(f"{c.id:>4}  {c.status.value:<10}{str(c.parent_id or '-'):>6}  {c.n_steps:>7}  {vl:>8}  "
                   f"{when(c.created_at)}")
        for line in fit([f"      {c.note}"] if c.note else [], WIDTH):
            click.echo(line)


@checkpoint.command(name="show")
@click.argument("checkpoint_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Accepted for symmetry: the metadata is always JSON.")
@pass_app
def ck_show(app: AppContext, checkpoint_id: int, as_json: bool) -> None:
    """One checkpoint's metadata."""
    with app.open_store() as store:
        c = store.log.get(checkpoint_id)
        chain = store.log.chain(checkpoint_id)
        hashes = store.log.hashes(checkpoint_id)
        snaps = store.snapshots.sizes()
        snap = store.snapshots.get(checkpoint_id) if checkpoint_id in snaps else None
    d = {k: (v.value if hasattr(v, "value") else v) for k, v in c.__dict__.items()}
    d["chain"] = [x.id for x in chain]
    d["chain_steps"] = sum(x.n_steps for x in chain)
    d["hashes_at"] = sorted(hashes)
    d["snapshot"] = {"n_steps": snap.n_steps, "bytes": len(snap.data)} if snap is not None else None
    d["snapshot_bytes_on_chain"] = sum(snaps.get(x.id, 0) for x in chain)
    click.echo(json.dumps(d, indent=2))


@checkpoint.command(name="verify")
@click.argument("checkpoint_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print {checkpoint_id, ok, result, steps, detail} as JSON.")
@pass_app
def ck_verify(app: AppContext, checkpoint_id: int, as_json: bool) -> None:
    """Replay a checkpoint's chain (or load its stored tensors) and compare every stored hash."""
    from pocketd.trainer.checkpoints import load_checkpoint
    from pocketd.trainer.registry import method_of

    from pocketd.trainer.forget import unhashed

    cfg = app.loaded.config
    with app.open_store() as store:
        total = sum(c.n_steps for c in store.log.chain(checkpoint_id))
        pending = unhashed(store, checkpoint_id)
        final_hashed = store.log.get(checkpoint_id).n_steps in store.log.hashes(checkpoint_id)
        with click.progressbar(length=max(total, 1), label="replaying", file=sys.stderr) as bar:
            _, _, ck = load_checkpoint(store, cfg.trainer, cfg.paths.cache_dir, checkpoint_id, verify=True,
                                       progress=lambda done, _t: bar.update(1), snapshots=False)
    if as_json:
        result = "not verified" if pending else "unverified (no hashes)" if not final_hashed else "ok"
        detail = (method_of(ck).verified(ck, total) if ck is not None else f"{total} steps") if result == "ok" else (
            "a chain rebuilt by forget: the next training session records its hash" if pending
            else "nothing records the weights the steps should give")
        click.echo(json.dumps({"checkpoint_id": checkpoint_id, "ok": result == "ok", "result": result,
                               "steps": total, "detail": detail}))
        if result != "ok":
            sys.exit(1)
        return
    if pending:  # rebuilt by forget through the socket: nothing to compare the replay with yet
        click.echo(f"checkpoint {checkpoint_id}: NOT verified: unverified (no hashes): {total} steps replay without "
                   "error, but nothing records the weights they should give (a chain rebuilt by forget: the next "
                   "training session records its hash; or a file imported without hashes)")
        sys.exit(1)
    if not final_hashed:  # e.g. imported from a file without hashes: the replay has nothing to match
        click.echo(f"checkpoint {checkpoint_id}: unverified (no hashes): {total} steps replay without error, "
                   "but nothing records the weights they should give")
        sys.exit(1)
    what = method_of(ck).verified(ck, total) if ck is not None else f"{total} steps"
    click.echo(f"checkpoint {checkpoint_id}: ok ({what})")


@checkpoint.command(name="export")
@click.argument("checkpoint_id", type=int)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print {checkpoint_id, file, bytes} as JSON.")
@pass_app
def ck_export(app: AppContext, checkpoint_id: int, file: Path, force: bool, as_json: bool) -> None:
    """Write a checkpoint's whole chain as a compact standalone file."""
    from pocketd.trainer.transfer import write_checkpoint

    if file.exists() and not force:
        raise click.ClickException(f"{file} exists; use --force to overwrite it")
    with app.open_store() as store:
        n = write_checkpoint(store, checkpoint_id, file, force=True)
    if as_json:
        click.echo(json.dumps({"checkpoint_id": checkpoint_id, "file": str(file), "bytes": n}, ensure_ascii=False))
    else:
        click.echo(f"wrote {file}: {n} bytes")


@checkpoint.command(name="import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print {file, checkpoint_id, steps, method, verification, promoted, reason} as JSON.")
@pass_app
def ck_import(app: AppContext, file: Path, as_json: bool) -> None:
    """Import a checkpoint file: check it, rebuild it (replay, or the side tensors) and compare the hashes it
    carries, then gate it like a session: it becomes current only if validation loss improves (else it is
    kept as rejected). A file that does not verify is refused and nothing is stored."""
    from pocketd.trainer.transfer import import_checkpoint, read_checkpoint_file

    data = read_checkpoint_file(file)
    cfg = app.loaded.config
    with app.open_store() as store:
        report = import_checkpoint(store, data, cfg.trainer, cfg.paths.cache_dir, name=str(file),
                                   note=f"imported from {file.name}")
    if as_json:
        click.echo(json.dumps({"file": str(file), "checkpoint_id": report.checkpoint_id, "steps": report.n_steps,
                               "method": report.method.value, "verification": report.verification.value,
                               "verified": report.verification.name == "VERIFIED", "promoted": report.promoted,
                               "status": "current" if report.promoted else "rejected", "reason": report.reason},
                              ensure_ascii=False))
        return
    verdict = "now current" if report.promoted else "kept as rejected, the current checkpoint is unchanged"
    click.echo(f"imported {file} as checkpoint {report.checkpoint_id} ({report.n_steps} steps, "
               f"{report.verification.value}; {report.reason}): {verdict}")


COMMANDS = [train, eval_cmd, checkpoint]
