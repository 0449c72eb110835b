"""Named exceptions of the store. Messages are written for a user; the CLI and socket print them as they are."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error the store raises."""


class DatabaseUnreadable(StoreError):
    """The database file is missing, corrupt or not a pocketd database."""


class DocumentNotFound(StoreError):
    """No document matches the given id or hash."""


class SourceNotFound(StoreError):
    """No source has the given name."""


class CheckpointNotFound(StoreError):
    """No checkpoint has the given id."""


class CheckpointConflict(StoreError):
    """A checkpoint write would break the log's invariants (wrong parent, step out of order, ...)."""
