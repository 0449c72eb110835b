"""The database schema, as an ordered list of sqlite-utils migrations.

Never edit an applied migration: add a new one at the end. Each migration runs in
one transaction together with the record that it ran, so an interrupted upgrade
leaves the previous schema intact.
"""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("pocketd")


@migrations()
def m001_documents(db: Database) -> None:
    """Sources, documents (keyed by content hash) and training examples."""
    db["sources"].create(
        {"id": int, "name": str, "kind": str, "created_at": str},
        pk="id",
        not_null={"name", "kind", "created_at"},
    )
    db["sources"].create_index(["name"], unique=True)
    db["documents"].create(
        {
            "id": int,
            "content_hash": str,  # sha256 of the normalized text: the dedup key
            "source_id": int,
            "origin": str,  # where it came from: a path, "path:line", "<stdin>", ...
            "created_at": str,  # the text's own time if known (record time, file mtime)
            "ingested_at": str,
            "n_bytes": int,
            "n_chars": int,
            "split": str,  # "train" | "validation", by hash: whole documents are held out
            "meta": str,  # JSON object
        },
        pk="id",
        foreign_keys=[("source_id", "sources", "id")],
        not_null={"content_hash", "source_id", "ingested_at", "n_bytes", "n_chars", "split"},
    )
    db["documents"].create_index(["content_hash"], unique=True)
    db["documents"].create_index(["source_id"])
    db["examples"].create(
        {
            "id": int,
            "document_id": int,
            "ordinal": int,
            "text": str,
            "n_chars": int,
            "split": str,
            "trained_count": int,
        },
        pk="id",
        foreign_keys=[("document_id", "documents", "id")],
        not_null={"document_id", "ordinal", "text", "n_chars", "split", "trained_count"},
        defaults={"trained_count": 0},
    )
    db["examples"].create_index(["document_id", "ordinal"], unique=True)
    db["examples"].create_index(["split", "trained_count"])


@migrations()
def m002_checkpoint_log(db: Database) -> None:
    """The seed-replay checkpoint log: checkpoints, their steps, replay hashes, token cache."""
    db["checkpoints"].create(
        {
            "id": int,
            "parent_id": int,  # the checkpoint this one continues (its steps replay first)
            "created_at": str,
            "updated_at": str,
            "status": str,  # candidate | current | rejected | superseded
            "method": str,  # "mezo"
            "base_fingerprint": str,
            "spec": str,  # JSON: the trainable-parameter spec
            "estimator": str,  # JSON: eps, lr schedule, n, dtype, ...
            "torch_version": str,
            "n_steps": int,
            "val_loss": float,
            "parent_val_loss": float,
            "note": str,
        },
        pk="id",
        foreign_keys=[("parent_id", "checkpoints", "id")],
        not_null={"created_at", "status", "method", "base_fingerprint", "spec", "estimator"},
        defaults={"n_steps": 0},
    )
    db["checkpoints"].create_index(["status"])
    db["steps"].create(
        {
            "checkpoint_id": int,
            "step": int,  # 0-based, dense within a checkpoint
            "seeds": bytes,  # int64 little-endian, one per perturbation
            "grads": bytes,  # float32 little-endian, the projected gradient per perturbation
            "lr": float,
            "loss": float,
            "created_at": str,
        },
        pk=("checkpoint_id", "step"),
        foreign_keys=[("checkpoint_id", "checkpoints", "id")],
        not_null={"seeds", "grads", "lr"},
    )
    # Which documents fed each step, so that forgetting a document can drop its steps.
    db["step_documents"].create(
        {"checkpoint_id": int, "step": int, "document_id": int},
        pk=("checkpoint_id", "step", "document_id"),
    )
    db["step_documents"].create_index(["document_id"])
    db["checkpoint_hashes"].create(
        {"checkpoint_id": int, "step": int, "sha256": str},
        pk=("checkpoint_id", "step"),
        foreign_keys=[("checkpoint_id", "checkpoints", "id")],
    )
    db["token_cache"].create(
        {"example_id": int, "tokenizer": str, "ids": bytes},
        pk=("example_id", "tokenizer"),
    )


@migrations()
def m003_history(db: Database) -> None:
    """What the daemon decided and did: training sessions and policy decisions."""
    db["sessions"].create(
        {
            "id": int,
            "started_at": str,
            "ended_at": str,
            "trigger": str,  # policy | train-now | cli
            "end_reason": str,
            "exit_status": int,
            "checkpoint_id": int,
            "steps": int,
            "loss_first": float,
            "loss_last": float,
            "promoted": int,
            "peak_rss_mb": float,
            "detail": str,  # JSON
        },
        pk="id",
    )
    db["events"].create(
        {"id": int, "at": str, "kind": str, "message": str, "detail": str},
        pk="id",
        not_null={"at", "kind", "message"},
    )
    db["events"].create_index(["at"])


@migrations()
def m004_checkpoint_states(db: Database) -> None:
    """Tensor checkpoints (method side): the trained tensors as safetensors bytes, beside the seed logs."""
    db["checkpoint_states"].create(
        {
            "checkpoint_id": int,
            "n_steps": int,  # steps of this checkpoint the tensors include
            "format": str,  # "safetensors"
            "data": bytes,
            "sha256": str,  # TrainableSet.sha256 of the tensors (also in checkpoint_hashes at n_steps)
            "saved_at": str,
        },
        pk="checkpoint_id",
        foreign_keys=[("checkpoint_id", "checkpoints", "id")],
        not_null={"n_steps", "format", "data", "sha256", "saved_at"},
    )
