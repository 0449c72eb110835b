"""`pocketd ingest | stats | forget | demo`: the user's text in the store."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from pocketd.ingest import pipeline as ingest_pipeline
from pocketd.ingest.forget import forget as forget_documents
from pocketd.ingest.forget import resolve as resolve_documents
from pocketd.ingest.pipeline import ingest_paths
from pocketd.ingest.report import IngestReport, plural
from pocketd.store import Stats, Store

from .cli_context import AppContext, pass_app


def _forget_checkpoints(app: AppContext, store: Store, document_ids: Sequence[int]) -> int | None:
    """Drop every logged step whose batch held a forgotten document; rebuild the current checkpoint without them.

    Only the log is rewritten here (no model needed); returns the rebuilt current
    checkpoint's id, whose hashes `_record_rebuilt_hashes` records once the
    documents are gone (None: nothing to record).
    """
    from pocketd.trainer.forget import plan_forget, rebuild_without

    plan = plan_forget(store, list(document_ids))
    if not plan.affected:
        return None
    result = rebuild_without(store, plan)
    by_step = set(plan.affected) - plan.tainted
    if by_step:
        click.echo(f"dropped {plural(sum(len(plan.affected[c]) for c in by_step), 'training step')} that used "
                   f"these documents from {plural(len(by_step), 'checkpoint')}")
    if plan.tainted:
        click.echo(f"dropped {plural(len(plan.tainted), 'side checkpoint')} trained on these documents "
                   "(side tensors cannot drop single steps)")
    if result.fell_back:
        click.echo(("the current checkpoint is now "
                    + (f"checkpoint {result.current_id}" if result.current_id else "the base model"))
                   + "; the next training session retrains the side part without these documents")
    return result.current_id if result.rebuilt else None


def _record_rebuilt_hashes(app: AppContext, store: Store, checkpoint_id: int) -> None:
    """Replay the rebuilt chain once and store its hashes, so `checkpoint verify` covers it."""
    from pocketd.trainer.forget import record_hashes

    cfg = app.loaded.config
    record_hashes(store, cfg.trainer, cfg.paths.cache_dir, checkpoint_id)
    click.echo(f"rebuilt the current checkpoint without them: checkpoint {checkpoint_id}")


def _clear_activation_cache(app: AppContext) -> None:
    """Cached activations are derived from the text: forgetting documents drops the whole cache."""
    from pocketd.trainer.config import activation_cache_dir

    path = activation_cache_dir(app.loaded.config.paths.cache_dir)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        click.echo(f"cleared the activation cache ({path})")


def sample_dir() -> Path:
    """The sample notes shipped inside the `ingest` package (package data, a plain folder)."""
    return Path(ingest_pipeline.__file__).resolve().parent / "sample"


def _echo_report(report: IngestReport, list_all: bool) -> None:
    if list_all:
        for a in report.added:
            click.echo(f"added      {a.input}: document {a.document_id}, {plural(a.n_examples, 'example')}")
        for d in report.duplicates:
            click.echo(f"duplicate  {d.input}: already stored as document {d.document_id}")
    for s in report.skipped:
        click.echo(f"skipped    {s.input}: {s.reason}")
    for r in report.rejected:
        click.echo(f"rejected   {r.input}: {r.reason}")
    line = report.summary()
    if not report.added and report.duplicates:
        line += " (already stored: nothing new)"
    click.echo(line)


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH... | -")
@click.option("--source", default=None, metavar="NAME",
              help="Source name for everything ingested (default: the folder or file path, "
                   '"stdin", or a JSON record\'s own "source").')
@click.option("--stdin-format", type=click.Choice(["text", "jsonl"]), default="text", show_default=True,
              help="How to read `-`: one plain-text document, or JSONL records.")
@click.option("-l", "--list", "list_all", is_flag=True, help="Also list every added and duplicate document.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def ingest(app: AppContext, paths: tuple[str, ...], source: str | None, stdin_format: str, list_all: bool,
           as_json: bool) -> None:
    """Store text from files, folders (.txt .md .jsonl .json) or stdin (-).

    Exits with status 1 if any input was rejected; the others are stored all the same.
    """
    if source is not None and not source.strip():
        raise click.BadParameter("must not be empty", param_hint="--source")
    config = app.loaded.config.ingest
    with app.open_store() as store:
        report = ingest_paths(
            store, list(paths), config, source=source.strip() if source else None,
            stdin=getattr(sys.stdin, "buffer", None), stdin_format=stdin_format,
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        _echo_report(report, list_all)
    if not report.ok:
        sys.exit(1)


def _stats_dict(stats: Stats, app: AppContext) -> dict[str, Any]:
    out = asdict(stats)
    out["database"] = str(app.loaded.config.paths.database)
    return out


def _echo_stats(stats: Stats, app: AppContext) -> None:
    click.echo(f"database    {app.loaded.config.paths.database}")
    click.echo(f"documents   {stats.documents:,}")
    click.echo(f"examples    {stats.examples:,}  (train {stats.train_examples:,}, "
               f"validation {stats.validation_examples:,}, untrained {stats.untrained_examples:,})")
    click.echo(f"characters  {stats.chars:,}")
    sources = [s for s in stats.sources if s.documents]
    if not sources:
        return
    click.echo("sources:")
    width = max(len(s.name) for s in sources)
    click.echo(f"  {'name':<{width}}  {'kind':<6}  {'documents':>9}  {'examples':>8}  {'characters':>10}")
    for s in sources:
        click.echo(f"  {s.name:<{width}}  {s.kind:<6}  {s.documents:>9,}  {s.examples:>8,}  {s.chars:>10,}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_app
def stats(app: AppContext, as_json: bool) -> None:
    """Show what is stored: documents, examples, characters, splits, sources."""
    with app.open_store() as store:
        figures = store.docs.stats()
    if as_json:
        click.echo(json.dumps(_stats_dict(figures, app), indent=2, ensure_ascii=False))
    else:
        _echo_stats(figures, app)


@click.command()
@click.option("--document", "documents", multiple=True, metavar="ID",
              help="A document id or a content-hash prefix (6+ hex digits); repeatable.")
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Every document of this source (as `pocketd stats` names it); repeatable.")
@pass_app
def forget(app: AppContext, documents: tuple[str, ...], sources: tuple[str, ...]) -> None:
    """Delete documents and their training examples, without asking."""
    if not documents and not sources:
        raise click.UsageError("give --document ID or --source NAME")
    with app.open_store() as store:
        targets = resolve_documents(store, documents, sources)
        rebuilt = _forget_checkpoints(app, store, [d.id for d in targets])
        result = forget_documents(store, documents=[str(d.id) for d in targets])
        if rebuilt is not None:
            _record_rebuilt_hashes(app, store, rebuilt)
    _clear_activation_cache(app)
    for d in result.documents:
        click.echo(f"deleted document {d.id} ({d.content_hash[:12]}, {plural(d.n_examples, 'example')}, "
                   f"source {d.source}, from {d.origin})")
    click.echo(f"deleted {plural(len(result.documents), 'document')}")


@click.command()
@pass_app
def demo(app: AppContext) -> None:
    """Ingest the sample notes shipped with pocketd into the store, then show `pocketd stats`."""
    config = app.loaded.config.ingest
    sample = sample_dir()
    click.echo(f"ingesting the sample notes from {sample}")
    with app.open_store() as store:
        report = ingest_paths(store, [sample], config)
        figures = store.docs.stats()
    _echo_report(report, list_all=False)
    click.echo("")
    _echo_stats(figures, app)
    if not report.ok:
        sys.exit(1)


COMMANDS = [ingest, stats, forget, demo]
