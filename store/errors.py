"""Named exceptions of the store. Messages are written for a user; the CLI and socket print them as they are."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error the store raises."""


class DatabaseUnreadable(StoreError):
    """The database file is missing, corrupt or not a pocketd database."""


class NewerSchema(DatabaseUnreadable):
    """The database has migrations this pocketd does not know: a newer pocketd made it."""


class StoreWriteFailed(StoreError):
    """The database refused a write: disk full, read-only file or file system, I/O error."""


class UnsafeLocation(StoreError):
    """A file or folder pocketd would use is not the user's own, or others may write to it (or read a private one)."""


class DataLocked(StoreError):
    """Another pocketd process (a daemon or a foreground `pocketd train`) is training on the same database."""


class DocumentNotFound(StoreError):
    """No document matches the given id or hash."""


class SourceNotFound(StoreError):
    """No source has the given name."""


class CheckpointNotFound(StoreError):
    """No checkpoint has the given id."""


class CheckpointConflict(StoreError):
    """A checkpoint write would break the log's invariants (wrong parent, step out of order, ...)."""


class DocumentsForgotten(StoreError):
    """A training write (a step row, saved tensors and their step documents) names documents that were
    forgotten (no longer stored): nothing of it was written. A session that gets this ends cleanly."""


class CheckpointForgotten(DocumentsForgotten):
    """A write to a checkpoint that `forget` dropped (status forgotten: it held steps of forgotten
    documents, or continued one that did): nothing was written."""


class DocumentsInTraining(StoreError):
    """Documents cannot be deleted on their own while steps of the training log reference them: forgetting
    them must drop those steps in the same transaction (`pocketd.daemon.forgetting.forget`)."""
