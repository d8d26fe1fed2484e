"""What the API returns for uploaded files."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, computed_field, field_validator

from app.files.formats import FileFormat
from app.jobs.schemas import _TimesInUtc

FileStatus = Literal["validating", "valid", "invalid"]
# OpenAI's purpose of every file here (docs/openai.md): all of them are training data.
PURPOSE: Literal["fine-tune"] = "fine-tune"


class FilePublic(_TimesInUtc):
    id: str
    tenant: str
    filename: str
    format: FileFormat
    kind: str | None = Field(
        description="what the rows hold, found by validation: text, prompt_completion, "
        "labelled_text, classification or regression; null until then"
    )
    size_bytes: int
    sha256: str = Field(description="hex SHA-256 of the file's bytes")
    status: FileStatus
    errors: list[str] = Field(description="what validation found wrong, with line or row numbers")
    stats: dict[str, Any] | None = Field(description="rows, tokens, classes, ...; once valid")
    created_at: datetime
    validated_at: datetime | None

    # Read by the OpenAI client (FileObject) beside the native fields, which stay as they are.
    object: Literal["file"] = "file"
    purpose: Literal["fine-tune"] = PURPOSE

    @computed_field(description="the file's size: size_bytes, as OpenAI names it")  # type: ignore[prop-decorator]
    @property
    def bytes(self) -> int:
        return self.size_bytes

    @field_validator("errors", mode="before")
    @classmethod
    def _none_is_no_errors(cls, errors: list[str] | None) -> list[str]:
        return errors or []


class FileList(BaseModel):
    data: list[FilePublic]
    has_more: bool
