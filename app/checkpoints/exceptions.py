"""Errors of the checkpoints API; each renders as the error envelope."""

from __future__ import annotations

from app.errors import NotFound


class NoCheckpoint(NotFound):
    type = "no_checkpoint"
