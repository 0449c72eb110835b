"""The training methods by `Method` value: the one place that lists them.

Adding a method: one module under trainer/methods/ whose `METHOD` implements
trainer.method.TrainingMethod, a `Method` value in trainer.config, and one line in
METHODS below. Nothing else (session loop, checkpoints, transfer, forget, budget)
changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Method
from .errors import CheckpointFileError, UnknownMethod
from .method import TrainingMethod
from .methods import mezo, side

if TYPE_CHECKING:
    from pocketd.store import Checkpoint

METHODS: dict[Method, TrainingMethod] = {
    Method.MEZO: mezo.METHOD,
    Method.SIDE: side.METHOD,
}

# The file kind a damaged or unknown file is parsed as, so its error names the problem the same way.
FALLBACK_FILE_METHOD = Method.MEZO

_KIND = 7  # b"PKTD" + 3 bytes of kind; the 8th byte is the format version


def method_for(method: Method) -> TrainingMethod:
    """The implementation of a configured method."""
    return METHODS[method]


def method_of(ck: Checkpoint) -> TrainingMethod:
    """The implementation that made a stored checkpoint; UnknownMethod if this build has none."""
    try:
        return METHODS[Method(ck.method)]
    except (ValueError, KeyError):
        raise UnknownMethod(f"checkpoint {ck.id} was made by method {ck.method!r}, which this pocketd "
                            f"does not have (it knows {', '.join(m.value for m in METHODS)})") from None


def method_of_file(data: bytes, name: str) -> TrainingMethod:
    """The method whose checkpoint file kind `data` starts with (any version: its parser names a wrong one).

    Bytes of no known kind go to the fallback method's parser, which reports what is wrong with them.
    """
    for m in METHODS.values():
        if data.startswith(m.file_magic[:_KIND]):
            return m
    fallback = METHODS.get(FALLBACK_FILE_METHOD)
    if fallback is None:
        raise CheckpointFileError(f"{name}: not a pocketd checkpoint file")
    return fallback
