"""Named exceptions of the trainer. No torch import here: the CLI catches these."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class for every error the trainer raises."""


class ModelNotFound(TrainerError):
    """The configured base model does not exist or cannot be loaded."""


class BaseMismatch(TrainerError):
    """A checkpoint was made on a different base model than the one loaded."""


class OverBudget(TrainerError):
    """The session would need, or already uses, more memory than policy.memory_budget_mb."""


class ReplayMismatch(TrainerError):
    """Replaying a checkpoint's log did not reproduce its stored hashes."""


class NonFiniteWeights(ReplayMismatch):
    """Replaying or loading a checkpoint gave trainable tensors with NaN or infinite values."""


class Stopped(TrainerError):
    """A stop request (SIGTERM/SIGINT) arrived while preparing or running a session phase.

    `phase` names what was interrupted ("converting the model", "tokenizing", ...).
    """

    def __init__(self, phase: str) -> None:
        super().__init__(f"stopped while {phase}")
        self.phase = phase


class NoTrainingData(TrainerError):
    """The store holds no examples of the split a command needs."""


class SpecError(TrainerError):
    """A stored trainable-part spec is not one the checkpoint's method can build."""


class UnknownMethod(TrainerError):
    """A checkpoint names a training method this build does not have."""


class CheckpointFileError(TrainerError):
    """A checkpoint export file is truncated, corrupt or of an unknown version."""


class GenerationError(TrainerError):
    """Text cannot be generated from this prompt."""


class PromptTooLong(GenerationError):
    """A generation prompt plus the requested new tokens exceed the model's context length."""


class ExportError(TrainerError):
    """An export cannot be written."""


class OutputNotEmpty(ExportError):
    """The export's output directory exists and is not empty, and overwriting was not asked for."""


class OutputExists(ExportError):
    """The export's output file exists, and replacing it was not asked for (or it is not a previous export)."""
