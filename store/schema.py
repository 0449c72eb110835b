"""The database schema, as an ordered list of sqlite-utils migrations.

Never edit an applied migration: add a new one at the end. Each migration runs in
one transaction together with the record that it ran, so an interrupted upgrade
leaves the previous schema intact.
"""

from __future__ import annotations

from sqlite_utils import Database, Migrations

from .errors import NewerSchema

migrations = Migrations("pocketd")


def known_migrations() -> list[str]:
    """Names of the migrations this build knows, oldest first."""
    return [m.name for m in migrations.pending(Database(memory=True))]  # all of them, on an empty database


def refuse_newer_schema(db: Database, name: str) -> None:
    """NewerSchema if `db` has migrations applied that this build does not know (read-only check).

    A newer pocketd's database may mean things this one would get wrong (and writing to it could
    damage it for the newer one), so it is refused before anything is written. `name` names the
    database in the message.
    """
    known = set(known_migrations())
    unknown = [m.name for m in migrations.applied(db) if m.name not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise NewerSchema(f"{name}: this database was made by a newer pocketd (schema {shown}); "
                          "upgrade pocketd to use it")


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


# What `m005_forget_guards` refuses, each a RAISE(ABORT) with this text: the database itself keeps a
# forgotten document out of the training log, whatever process writes (the store's own checks raise
# named errors first, in the same transaction; these triggers are the backstop).
FORGET_GUARD_MESSAGE = "pocketd forget guard"

_FORGOTTEN = "(SELECT status FROM checkpoints WHERE id = NEW.checkpoint_id) = 'forgotten'"
_FORGET_GUARDS = {
    # A step may only name documents that are stored.
    "forget_guard_step_documents": ("BEFORE INSERT ON step_documents",
                                    "NOT EXISTS (SELECT 1 FROM documents WHERE id = NEW.document_id)"),
    # A document cannot be deleted while a step names it: forget drops those steps in the same transaction.
    "forget_guard_documents": ("BEFORE DELETE ON documents",
                               "EXISTS (SELECT 1 FROM step_documents WHERE document_id = OLD.id)"),
    # A checkpoint forget dropped takes no more steps, hashes or tensors, no children, and stays dropped.
    "forget_guard_steps": ("BEFORE INSERT ON steps", _FORGOTTEN),
    "forget_guard_hashes": ("BEFORE INSERT ON checkpoint_hashes", _FORGOTTEN),
    "forget_guard_states_insert": ("BEFORE INSERT ON checkpoint_states", _FORGOTTEN),
    "forget_guard_states_update": ("BEFORE UPDATE ON checkpoint_states", _FORGOTTEN),
    "forget_guard_parent": ("BEFORE INSERT ON checkpoints",
                            "(SELECT status FROM checkpoints WHERE id = NEW.parent_id) = 'forgotten'"),
    "forget_guard_revive": ("BEFORE UPDATE OF status ON checkpoints",
                            "OLD.status = 'forgotten' AND NEW.status != 'forgotten'"),
}


@migrations()
def m005_forget_guards(db: Database) -> None:
    """Triggers that keep forgotten documents out of the training log (see _FORGET_GUARDS)."""
    for name, (event, when) in _FORGET_GUARDS.items():
        db.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {event} WHEN {when} "
                   f"BEGIN SELECT RAISE(ABORT, '{FORGET_GUARD_MESSAGE}: {name}'); END")


@migrations()
def m006_snapshots(db: Database) -> None:
    """Verified snapshots of seed-log checkpoints: the trainable tensors at one step (store.snapshots)."""
    db["checkpoint_snapshots"].create(
        {
            "checkpoint_id": int,
            "n_steps": int,  # steps of this checkpoint the tensors include
            "format": str,  # "safetensors"
            "data": bytes,
            "sha256": str,  # TrainableSet.sha256, equal to checkpoint_hashes at (checkpoint_id, n_steps)
            "saved_at": str,
        },
        pk="checkpoint_id",
        foreign_keys=[("checkpoint_id", "checkpoints", "id")],
        not_null={"n_steps", "format", "data", "sha256", "saved_at"},
    )
