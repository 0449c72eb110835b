"""`pocketd ingest | stats | forget | demo`: the user's text in the store."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from pocketd.ingest import pipeline as ingest_pipeline
from pocketd.ingest.pipeline import ingest_paths
from pocketd.ingest.report import IngestReport, plural
from pocketd.store import Stats, Store

from .cli_context import AppContext, pass_app
from .forgetting import forget as forget_documents


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
    """The figures in at most 60 columns (statusfmt.WIDTH; a path longer than that is never cut)."""
    from .statusfmt import WIDTH, fit

    lines = [f"database    {app.loaded.config.paths.database}", f"documents   {stats.documents:,}",
             f"examples    {stats.examples:,}  (train {stats.train_examples:,}, "
             f"validation {stats.validation_examples:,}, untrained {stats.untrained_examples:,})",
             f"characters  {stats.chars:,}"]
    sources = [s for s in stats.sources if s.documents]
    if sources:
        lines.append("sources:")
        width = max(4, *(len(s.name) for s in sources))
        if 2 + width + 36 <= WIDTH:  # a table: name, kind, documents, examples, characters
            lines.append(f"  {'name':<{width}}  {'kind':<6}  {'docs':>6}  {'examples':>8}  {'chars':>8}")
            lines += [f"  {s.name:<{width}}  {s.kind:<6}  {s.documents:>6,}  {s.examples:>8,}  {s.chars:>8,}"
                      for s in sources]
        else:  # long names: the name on a line of its own, its figures below
            for s in sources:
                lines += [f"  {s.name}", f"      {s.kind}: {s.documents:,} documents, {s.examples:,} examples, "
                                         f"{s.chars:,} characters"]
    for line in fit(lines, WIDTH):
        click.echo(line)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_app
def stats(app: AppContext, as_json: bool) -> None:
    """Show what is stored: documents, examples, characters, splits, sources."""
    with app.open_store() as store:
        figures = store.docs.stats()
        snapshots = store.snapshots.sizes()
    snapshot_bytes = sum(snapshots.values())
    if as_json:
        out = _stats_dict(figures, app)
        out["snapshots"], out["snapshot_bytes"] = len(snapshots), snapshot_bytes
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _echo_stats(figures, app)
        from .statusfmt import fit  # 60 columns (issue 15)

        for line in fit([f"snapshots   {len(snapshots)} ({snapshot_bytes:,} bytes of verified tensors beside the "
                         "seed log)"]):
            click.echo(line)


@click.command()
@click.option("--document", "documents", multiple=True, metavar="ID",
              help="A document id or a content-hash prefix (6+ hex digits); repeatable.")
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Every document of this source (as `pocketd stats` names it); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the socket's `forget` reply).")
@pass_app
def forget(app: AppContext, documents: tuple[str, ...], sources: tuple[str, ...], as_json: bool) -> None:
    """Delete documents, their examples and every training step that saw them, without asking.

    A chain rebuilt without them is replayed here once to record its hashes (this loads the model).
    """
    if not documents and not sources:
        raise click.UsageError("give --document ID or --source NAME")
    config = app.loaded.config

    def record_hashes(store: Store, checkpoint_id: int) -> None:
        from pocketd.trainer.rehash import record_rebuilt_hashes

        record_rebuilt_hashes(store, config.trainer, config.paths.cache_dir, checkpoint_id)

    with app.open_store() as store:
        report = forget_documents(store, config, documents=documents, sources=sources, record_hashes=record_hashes)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        for line in report.lines():
            click.echo(line)


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print {sample, ingest, stats} as JSON (as `ingest --json` and `stats --json` do).")
@pass_app
def demo(app: AppContext, as_json: bool) -> None:
    """Ingest the sample notes shipped with pocketd into the store, then show `pocketd stats`."""
    config = app.loaded.config.ingest
    sample = sample_dir()
    if not as_json:
        click.echo(f"ingesting the sample notes from {sample}")
    with app.open_store() as store:
        report = ingest_paths(store, [sample], config)
        figures = store.docs.stats()
    if as_json:
        click.echo(json.dumps({"sample": str(sample), "ingest": report.to_dict(), "stats": _stats_dict(figures, app)},
                              indent=2, ensure_ascii=False))
        if not report.ok:
            sys.exit(1)
        return
    _echo_report(report, list_all=False)
    click.echo("")
    _echo_stats(figures, app)
    if not report.ok:
        sys.exit(1)


COMMANDS = [ingest, stats, forget, demo]
