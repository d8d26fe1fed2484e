"""Which checkpoints `keep_checkpoints: {"last": N, "best": M}` keeps: a pure rule.

Kept: the N newest by step, the M best, and always the latest (a resumed run starts
there, and the final weights are its weights) and the single best.

Best means the lowest `eval_loss`. Checkpoints saved before the job's first evaluation
have none and are not ranked once any checkpoint has one; a job that never evaluates
ranks by train loss instead. Ties go to the newer step. A missing or non-finite value
(an fp16 overflow) ranks nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    step: int
    loss: float | None
    eval_loss: float | None


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def ranking(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The ranked checkpoints, best first; those without a ranking value are left out."""
    evaluated = any(finite_or_none(candidate.eval_loss) is not None for candidate in candidates)
    ranked: list[tuple[float, int, Candidate]] = []
    for candidate in candidates:
        value = finite_or_none(candidate.eval_loss if evaluated else candidate.loss)
        if value is not None:
            ranked.append((value, -candidate.step, candidate))
    ranked.sort(key=lambda entry: entry[:2])
    return [candidate for _, _, candidate in ranked]


def steps_to_keep(candidates: Sequence[Candidate], *, last: int, best: int) -> set[int]:
    """The steps of the checkpoints that the policy keeps; the others may be deleted."""
    newest = sorted((candidate.step for candidate in candidates), reverse=True)
    kept = set(newest[: max(last, 1)])
    kept.update(candidate.step for candidate in ranking(candidates)[: max(best, 1)])
    return kept
