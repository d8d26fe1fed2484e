"""Errors of the checkpoints API; each renders as the error envelope."""

from __future__ import annotations

from app.errors import Conflict, NotFound


class NoCheckpoint(NotFound):
    type = "no_checkpoint"


class NoAdapter(Conflict):
    type = "no_adapter"


class NoMergedWeights(Conflict):
    type = "no_merged_weights"
