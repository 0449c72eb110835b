"""The `[ingest]` config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class IngestConfig(BaseModel):
    """How user text becomes documents and training examples."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    max_document_bytes: int = Field(
        10_000_000, ge=1, le=1 << 30, description="Largest accepted document (bytes); larger inputs are rejected whole."
    )
    example_max_chars: int = Field(
        2000, ge=64, le=1_000_000, description="Examples are cut along paragraph boundaries up to this many characters."
    )
    validation_percent: int = Field(
        10, ge=0, le=50, description="Share of documents (by content hash) held out for validation."
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".jsonl", ".json"],
        description="File extensions read when ingesting a folder; other files are skipped with a message.",
    )

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, v: list[str]) -> list[str]:
        out = []
        for ext in v:
            ext = ext.strip().lower()
            if not ext:
                raise ValueError("empty extension")
            out.append(ext if ext.startswith(".") else "." + ext)
        return out
