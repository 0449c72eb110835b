"""The pocketd database: documents, examples, the seed-replay checkpoint log, history.

Imports nothing from the other pocketd packages.
"""

from .clock import utcnow
from .datalock import DataLock
from .db import Store
from .documents import AddResult, DataCounts, Document, Example, Stats, content_hash, split_for
from .errors import (
    CheckpointConflict,
    CheckpointForgotten,
    CheckpointNotFound,
    DatabaseUnreadable,
    DataLocked,
    DocumentNotFound,
    DocumentsForgotten,
    DocumentsInTraining,
    SourceNotFound,
    StoreError,
    UnsafeLocation,
)
from .log import Checkpoint, StepRecord, Status, f32
from .snapshots import Snapshot
from .private import atomic_write, make_private_dir, tighten_dir, touch_private

__all__ = [
    "DataLock", "DataLocked", "UnsafeLocation",
    "AddResult", "Checkpoint", "CheckpointConflict", "CheckpointForgotten", "CheckpointNotFound", "DataCounts",
    "DatabaseUnreadable", "Document", "DocumentNotFound", "DocumentsForgotten", "DocumentsInTraining", "Example",
    "Snapshot", "SourceNotFound", "Stats", "Status", "StepRecord",
    "Store", "StoreError", "atomic_write", "content_hash", "f32", "make_private_dir", "split_for",
    "tighten_dir", "touch_private", "utcnow",
]
