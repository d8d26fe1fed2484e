"""Errors the engine reports to whoever drives it, each with a stable `type`."""

from __future__ import annotations


class TrainingError(Exception):
    """A run that cannot go on. `type` is what the job's `error.type` shows.

    Types: `invalid_spec`, `invalid_device`, `invalid_data`, `inexact_accumulation`,
    `incompatible_checkpoint`, `nan_loss`, `out_of_memory`.
    """

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type
        self.message = message

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"
