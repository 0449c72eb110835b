"""Forgetting: deleting documents (and their examples) by id, hash prefix or source name.

`resolve` is the resolver every forget uses. `forget` here removes the text from the store only,
and refuses (DocumentsInTraining, nothing deleted) documents that steps of the training log used:
the whole use case, which also drops those steps and checkpoints in the same transaction, is
`pocketd.daemon.forgetting.forget` (`pocketd forget`, the socket's `forget`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pocketd.store import Document, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForgetResult:
    """The documents that were deleted, as they were just before."""

    documents: list[Document] = field(default_factory=list)

    @property
    def document_ids(self) -> list[int]:
        return [d.id for d in self.documents]


def resolve(store: Store, documents: Sequence[str | int] = (), sources: Sequence[str] = ()) -> list[Document]:
    """The documents named by ids / hash prefixes and source names, each once, in id order.

    DocumentNotFound or SourceNotFound (from the store) if any name matches nothing.
    """
    found: dict[int, Document] = {}
    for ref in documents:
        doc = store.docs.find(ref)
        found[doc.id] = doc
    for name in sources:
        for doc in store.docs.by_source(name):
            found[doc.id] = doc
    return [found[i] for i in sorted(found)]


def forget(store: Store, *, documents: Sequence[str | int] = (), sources: Sequence[str] = ()) -> ForgetResult:
    """Delete the named documents and their examples in one transaction; what was deleted.

    Every name is resolved before anything is deleted, so an unknown one deletes nothing;
    DocumentsInTraining (nothing deleted) if training steps used any of them.
    """
    if not documents and not sources:
        raise ValueError("forget needs at least one document reference or source name")
    targets = resolve(store, documents, sources)
    store.docs.delete_documents([d.id for d in targets])
    log.info("forgot %d documents", len(targets))
    return ForgetResult(targets)
