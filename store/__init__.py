"""The pocketd database: documents, examples, the seed-replay checkpoint log, history.

Imports nothing from the other pocketd packages.
"""

from .db import Store, make_private_dir, touch_private, utcnow
from .documents import AddResult, Document, Example, Stats, content_hash, split_for
from .errors import (
    CheckpointConflict,
    CheckpointNotFound,
    DatabaseUnreadable,
    DocumentNotFound,
    SourceNotFound,
    StoreError,
)
from .log import Checkpoint, StepRecord, Status

__all__ = [
    "AddResult", "Checkpoint", "CheckpointConflict", "CheckpointNotFound", "DatabaseUnreadable",
    "Document", "DocumentNotFound", "Example", "SourceNotFound", "Stats", "Status", "StepRecord",
    "Store", "StoreError", "content_hash", "make_private_dir", "split_for", "touch_private", "utcnow",
]
