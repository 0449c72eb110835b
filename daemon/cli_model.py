"""`pocketd generate | export`: use the trained model (torch imported inside the commands only)."""

from __future__ import annotations

import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import click

from .cli_context import AppContext, pass_app

log = logging.getLogger(__name__)


def _load(app: AppContext, checkpoint_id: int | None, base_only: bool) -> tuple[Any, Any]:
    """(base, checkpoint or None) with the checkpoint's weights applied to base.model."""
    cfg = app.loaded.config
    if cfg.trainer.threads:
        import torch

        torch.set_num_threads(cfg.trainer.threads)
    if base_only:
        from pocketd.trainer.model import load_base

        return load_base(cfg.trainer.model, cfg.paths.cache_dir, cfg.trainer.dtype), None
    from pocketd.trainer.checkpoints import load_checkpoint

    with app.open_store() as store:
        base, _params, ck = load_checkpoint(store, cfg.trainer, cfg.paths.cache_dir, checkpoint_id)
    return base, ck


def _describe(ck: Any) -> str:
    return "base model (no checkpoint)" if ck is None else f"checkpoint {ck.id} ({ck.status.value}, {ck.n_steps} steps)"


@click.command()
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Most new tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Nucleus sampling: smallest set of tokens with this much probability.")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random); same seed, same text.")
@click.option("--base", "base_only", is_flag=True, help="Use the base model without any checkpoint.")
@click.option("--checkpoint", "checkpoint_id", type=int, default=None,
              help="Use this checkpoint instead of the current one.")
@click.option("--no-chat", is_flag=True, help="Do not wrap the prompt in the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True,
              help="Print {prompt, completion, tokens, checkpoint, seed, ...} as JSON at the end (no streaming).")
@pass_app
def generate(app: AppContext, prompt: str, max_tokens: int, temperature: float, top_p: float,
             seed: int | None, base_only: bool, checkpoint_id: int | None, no_chat: bool, as_json: bool) -> None:
    """Generate a reply to PROMPT ("-" reads it from stdin), streamed to stdout."""
    from pocketd.trainer.generate import generate as run

    if base_only and checkpoint_id is not None:
        raise click.UsageError("--base and --checkpoint exclude each other")
    if prompt == "-":
        prompt = sys.stdin.read()
    if seed is None:
        seed = secrets.randbits(63)
    base, ck = _load(app, checkpoint_id, base_only)
    click.echo(f"[{_describe(ck)}, seed {seed}]", err=True)

    def on_token(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    info: dict[str, Any] = {}
    text = run(base.model, base.tokenizer, prompt, max_tokens, temperature, seed, None if as_json else on_token,
               chat=not no_chat, top_p=top_p, info=info)
    if not as_json:
        click.echo()
        return
    click.echo(json.dumps({
        "prompt": prompt, "completion": text,
        "tokens": {"prompt": info.get("prompt_tokens"), "completion": info.get("completion_tokens")},
        "stop": info.get("stop"),
        "checkpoint": _checkpoint_dict(ck),
        "seed": seed, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "chat": not no_chat,
    }, ensure_ascii=False))


def _checkpoint_dict(ck: Any) -> dict[str, Any] | None:
    """The checkpoint used, for --json (None: the base model)."""
    if ck is None:
        return None
    return {"id": ck.id, "status": ck.status.value, "steps": ck.n_steps,
            "method": getattr(ck.method, "value", ck.method)}


def _size(path: Path) -> int:
    """Bytes under `path` (a file or a directory)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@click.command(name="export")
@click.option("--merged", "merged_dir", type=click.Path(path_type=Path), default=None,
              help="Write a Hugging Face model directory with the adapters merged into the weights.")
@click.option("--adapter", "adapter_dir", type=click.Path(path_type=Path), default=None,
              help="Write a PEFT LoRA adapter directory (lora checkpoints only).")
@click.option("--gguf", "gguf_file", type=click.Path(path_type=Path), default=None,
              help="Write one GGUF file (llama.cpp, ollama) with the adapters merged into the weights.")
@click.option("--type", "gguf_type", type=click.Choice(["f16", "q8_0"]), default=None,
              help="Tensor type of the --gguf weights (default f16; q8_0 is about half the size).")
@click.option("--checkpoint", "checkpoint_id", type=int, default=None,
              help="Export this checkpoint instead of the current one.")
@click.option("--force", is_flag=True, help="Replace a previous pocketd export (directory or GGUF file).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written, where and its size as JSON.")
@pass_app
def export(app: AppContext, merged_dir: Path | None, adapter_dir: Path | None, gguf_file: Path | None,
           gguf_type: str | None, checkpoint_id: int | None, force: bool, as_json: bool) -> None:
    """Export the current (or a given) checkpoint: --merged DIR, --adapter DIR or --gguf FILE."""
    from pocketd.trainer.errors import ExportError
    from pocketd.trainer.export import export_adapter, export_merged
    from pocketd.trainer.lora import lora_modules
    from pocketd.trainer.registry import method_of

    if sum(x is not None for x in (merged_dir, adapter_dir, gguf_file)) != 1:
        raise click.UsageError("give exactly one of --merged DIR, --adapter DIR and --gguf FILE")
    if gguf_type is not None and gguf_file is None:
        raise click.UsageError("--type goes with --gguf FILE")
    refusal = _export_refusal(app, checkpoint_id)
    if refusal is not None:
        raise ExportError(refusal)
    if gguf_file is not None:
        _export_gguf(app, gguf_file, gguf_type or "f16", checkpoint_id, force, as_json)
        return
    base, ck = _load(app, checkpoint_id, base_only=False)
    info = {"checkpoint": ck.id if ck else None, "steps": ck.n_steps if ck else 0,
            "base_fingerprint": base.fingerprint, "base": base.source}
    if adapter_dir is not None:
        method = method_of(ck) if ck is not None else None
        spec = method.spec_from_dict(ck.spec) if method is not None else None
        lora = method.lora_spec(spec) if method is not None else None
        if lora is None or not lora_modules(base.model):
            raise ExportError("--adapter needs a lora checkpoint" + (" (there is none yet)" if ck is None else
                              f"; checkpoint {ck.id} trains {method.describe(spec)}: use --merged"))
        out = export_adapter(base.model, lora, str(base.model_dir), adapter_dir, force=force, info=info)
        kind, text = "adapter", f"{_describe(ck)}: LoRA adapter written to {out} (base: {base.model_dir})"
    else:
        assert merged_dir is not None
        out = export_merged(base.model, base.tokenizer, merged_dir, force=force, info=info)
        kind, text = "merged", f"{_describe(ck)}: merged model written to {out}"
    if as_json:
        click.echo(json.dumps({"kind": kind, "path": str(out), "bytes": _size(Path(out)),
                               "files": sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else [],
                               "checkpoint": _checkpoint_dict(ck), "base": str(base.model_dir),
                               "base_fingerprint": base.fingerprint}, ensure_ascii=False))
    else:
        click.echo(text)


def _export_gguf(app: AppContext, out_file: Path, type_name: str, checkpoint_id: int | None, force: bool,
                 as_json: bool) -> None:
    """`export --gguf FILE`: the target checked before the model loads, progress on stderr."""
    from pocketd.trainer.gguf_export import GgufType, check_target, export_gguf

    out_file = out_file.expanduser()
    check_target(out_file, force)
    base, ck = _load(app, checkpoint_id, base_only=False)
    qtype = GgufType(type_name)
    click.echo(f"[{_describe(ck)}: writing {qtype.value} GGUF to {out_file}]", err=True)
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="tensors", file=sys.stderr)
        bar.update(1)

    try:
        report = export_gguf(base.model, base.tokenizer, base.path, out_file, qtype, force=force, progress=progress)
    finally:
        if bar is not None:
            bar.render_finish()
    if as_json:
        click.echo(json.dumps({"kind": "gguf", "path": str(report.path), "bytes": report.bytes,
                               "type": report.qtype.value, "tensors": report.tensors,
                               "block_count": report.block_count, "f16_fallbacks": list(report.f16_fallbacks),
                               "checkpoint": _checkpoint_dict(ck), "base": str(base.path),
                               "base_fingerprint": base.fingerprint}, ensure_ascii=False))
    else:
        click.echo(f"{_describe(ck)}: {report.qtype.value} GGUF ({report.tensors} tensors, {report.block_count} "
                   f"blocks, {report.bytes / 2**20:.1f} MiB) written to {report.path}")


def _export_refusal(app: AppContext, checkpoint_id: int | None) -> str | None:
    """Why the checkpoint's trained part cannot become a transformers model or PEFT adapter (None: it can),
    asked before loading anything."""
    from pocketd.trainer.registry import method_of

    with app.open_store() as store:
        ck = store.log.get(checkpoint_id) if checkpoint_id is not None else store.log.current()
    if ck is None:
        return None
    method = method_of(ck)
    return method.export_refusal(method.spec_from_dict(ck.spec), ck.id)


COMMANDS = [generate, export]
