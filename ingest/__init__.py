"""Turning user text into clean, deduplicated documents and training examples.

Entry points: `ingest_paths` (files, folders, stdin), `ingest_text` (one string),
`forget` (delete documents). Errors are `ingest.errors.IngestError` subclasses.
"""

from .config import IngestConfig
from .errors import IngestError
from .forget import ForgetResult, forget
from .normalize import normalize
from .pipeline import ingest_paths, ingest_text, prepare
from .report import Added, Duplicate, IngestReport, Rejected, Skipped
from .split import split_examples

__all__ = [
    "Added", "Duplicate", "ForgetResult", "IngestConfig", "IngestError", "IngestReport", "Rejected",
    "Skipped", "forget", "ingest_paths", "ingest_text", "normalize", "prepare", "split_examples",
]
