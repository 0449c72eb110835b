"""The contract between the daemon and a training child process (no torch import).

The daemon writes a TrainingJob as JSON (mode 0600) and runs
`python -m pocketd.trainer --job FILE`. The child writes its progress to `status_file`
(atomically replaced JSON, see SessionStatus) after every step and exits with
one of ExitCode. SIGTERM or SIGINT: the current step finishes and commits,
then the child exits 0 (ExitCode.OK) without running the evaluation gate; the
unevaluated candidate is resumed by the next session.
"""

from __future__ import annotations

import json
import os
from enum import Enum, IntEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pocketd.store.private import atomic_write

from .config import TrainerConfig


class ExitCode(IntEnum):
    OK = 0  # finished: steps/time budget reached, stop signal, or nothing to train
    CRASH = 1  # unexpected error (traceback on stderr)
    BAD_JOB = 2  # the job file or config is invalid, or the model cannot be loaded
    REFUSED_BUDGET = 3  # estimated memory need exceeds memory_budget_mb; nothing was loaded
    OVER_BUDGET = 4  # RSS passed memory_budget_mb mid-session; stopped cleanly after the step
    DIVERGED = 5  # too many non-finite losses in a row; stopped, nothing bad logged
    BAD_LOG = 6  # the checkpoint log does not verify (replay differs from its hashes); nothing was trained


class TrainingJob(BaseModel):
    """One training session for the child process."""

    model_config = ConfigDict(extra="forbid")

    database: Path
    cache_dir: Path
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    memory_budget_mb: int = Field(1536, ge=64)
    max_minutes: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    evaluate: bool = True  # run the evaluation gate at the end (unless stopped by a signal)
    status_file: Path | None = None

    def write(self, path: Path) -> None:
        write_private_json(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path) -> "TrainingJob":
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


class Phase(str, Enum):
    LOADING = "loading"
    REPLAYING = "replaying"
    TRAINING = "training"
    EVALUATING = "evaluating"
    DONE = "done"


class SessionStatus(BaseModel):
    """What the child reports in `status_file` (and what `pocketd status` shows while training)."""

    phase: Phase
    checkpoint_id: int | None = None
    step: int = 0  # steps done in this session
    total_steps: int = 0  # steps in the checkpoint chain including this session
    loss: float | None = None
    loss_first: float | None = None
    s_per_step: float | None = None
    rss_mb: float | None = None
    peak_rss_mb: float | None = None
    eta_s: float | None = None
    skipped_nonfinite: int = 0
    promoted: bool | None = None
    val_loss: float | None = None
    parent_val_loss: float | None = None
    end_reason: str | None = None
    pid: int = Field(default_factory=os.getpid)


def write_private_json(path: Path, data: object) -> None:
    """Write JSON atomically, mode 0600 (`pocketd.store.atomic_write`)."""
    atomic_write(path, json.dumps(data).encode("utf-8"))


def write_private_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically, mode 0600 (`pocketd.store.atomic_write`)."""
    atomic_write(path, data)
