"""OpenAI fine-tuning shapes ↔ the native job: one pure module, no database, no I/O.

The tables below are the mapping; docs/openai.md is their prose. A create body becomes a
native JobSpec dict (`native_spec`), validated and submitted exactly as a native submit
is; a native job, however it was created, renders as a `fine_tuning.job` (`render_job`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.jobs.schemas import JobPublic, as_utc
from app.jobs.spec import FINE_TUNING_LR
from app.openai_compat.exceptions import Unsupported
from app.openai_compat.schemas import (
    CheckpointMetrics,
    Error,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningStatus,
    Hyperparameters,
    HyperparametersPublic,
    MethodPublic,
    SupervisedPublic,
)

# What "auto" means. Fixed and documented, not guessed from the data: the same request
# always trains the same job (a file's size is not known until it is validated).
AUTO_BATCH_SIZE = 8
AUTO_N_EPOCHS = 3
AUTO_LEARNING_RATE_MULTIPLIER = 1.0
# The learning rate a multiplier of 1 gives: the native default for pretrained weights
# (AdamW at 5e-5, transformers' Trainer default).
BASE_LEARNING_RATE = FINE_TUNING_LR
# With a validation_file, evaluate on it every this many optimizer steps (OpenAI computes
# its validation metrics "periodically"); the native `eval_every` sets any other period.
EVAL_EVERY_STEPS = 10


@dataclass(frozen=True)
class FieldMap:
    """One OpenAI create field and the native JobSpec field it sets (dotted paths)."""

    openai: str
    native: str
    convert: Callable[[Any], Any] = lambda value: value
    auto: Any = None  # the value "auto" stands for, where the field takes "auto"


def _learning_rate(multiplier: float) -> float:
    return multiplier * BASE_LEARNING_RATE


# Hyperparameters come at the top level (deprecated by OpenAI) or, as the current client
# sends them, under method.supervised; their OpenAI paths are relative to either.
HYPERPARAMETER_FIELDS: tuple[FieldMap, ...] = (
    FieldMap("batch_size", "batch_size", auto=AUTO_BATCH_SIZE),
    FieldMap("n_epochs", "epochs", auto=AUTO_N_EPOCHS),
    FieldMap(
        "learning_rate_multiplier",
        "optimizer.lr",
        convert=_learning_rate,
        auto=AUTO_LEARNING_RATE_MULTIPLIER,
    ),
)
FIELDS: tuple[FieldMap, ...] = (
    FieldMap("model", "model.pretrained"),
    FieldMap("training_file", "dataset.file_id"),
    FieldMap("validation_file", "dataset.validation_file_id"),
    FieldMap("seed", "seed"),
    FieldMap("suffix", "name"),
    FieldMap("metadata", "metadata"),
)
# What every OpenAI job is natively, whatever the request says: a causal LM from
# pretrained weights, trained on an uploaded file with the model's own tokenizer, by
# AdamW, with the batch's micro-batch found by out-of-memory backoff.
FIXED: dict[str, Any] = {
    "model.type": "hf-causal-lm",
    "dataset.type": "file",
    "dataset.tokenizer": "model",
    "micro_batch_size": "auto",
    "optimizer.type": "adamw",
}
# Refused, each with why and what to use instead.
UNSUPPORTED_METHODS = {
    "dpo": "DPO is not supported: trainjob trains supervised (prompt/completion, text or "
    "chat `messages` rows); use method.type 'supervised'",
    "reinforcement": "reinforcement fine-tuning is not supported; use method.type 'supervised'",
}
INTEGRATIONS_UNSUPPORTED = (
    "integrations are not supported on this API: submit the job through the native "
    "POST /v1/jobs with its `tracking` field (e.g. MLflow) instead"
)


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        spec = spec.setdefault(name, {})
    spec[leaf] = value


def hyperparameters_of(request: FineTuningJobCreate) -> tuple[str, Hyperparameters]:
    """The request's hyperparameters and the OpenAI path they came under."""
    method = request.method
    supervised = method.supervised if method is not None else None
    nested = supervised.hyperparameters if supervised is not None else None
    if nested is not None and request.hyperparameters is not None:
        raise Unsupported(
            "hyperparameters",
            "give the hyperparameters once: under method.supervised.hyperparameters "
            "(or the deprecated top-level hyperparameters), not both",
        )
    if nested is not None:
        return "method.supervised.hyperparameters", nested
    return "hyperparameters", request.hyperparameters or Hyperparameters()


def refuse_unsupported(request: FineTuningJobCreate) -> None:
    """Unsupported on any field the request sets: what trainjob does not do is never
    silently dropped."""
    method = request.method
    if method is not None:
        if method.type in UNSUPPORTED_METHODS:
            raise Unsupported("method.type", UNSUPPORTED_METHODS[method.type])
        for other in ("dpo", "reinforcement"):
            if getattr(method, other) is not None:
                raise Unsupported(f"method.{other}", f"only with method.type {other!r}, refused")
    if request.integrations:
        raise Unsupported("integrations", INTEGRATIONS_UNSUPPORTED)


def native_spec(request: FineTuningJobCreate) -> dict[str, Any]:
    """The native JobSpec (as a dict, validated by the caller) that `request` asks for."""
    refuse_unsupported(request)
    spec: dict[str, Any] = {}
    for path, value in FIXED.items():
        _set(spec, path, value)
    for field in FIELDS:
        value = getattr(request, field.openai)
        if value is not None:
            _set(spec, field.native, field.convert(value))
    _, hyperparameters = hyperparameters_of(request)
    for field in HYPERPARAMETER_FIELDS:
        value = getattr(hyperparameters, field.openai)
        if value is None or value == "auto":
            value = field.auto
        _set(spec, field.native, field.convert(value))
    # OpenAI trains on the whole training file: hold nothing out of it. A validation file
    # is evaluated on periodically.
    if request.validation_file is None:
        _set(spec, "dataset.eval_fraction", 0.0)
    else:
        spec["eval_every"] = EVAL_EVERY_STEPS
    return spec


def openai_param(native_path: str, *, hyperparameters_at: str = "hyperparameters") -> str | None:
    """The OpenAI field a native spec path (from a validation error) came from; None
    when it came from none (a value the mapping fixed)."""
    for fields, prefix in ((FIELDS, ""), (HYPERPARAMETER_FIELDS, f"{hyperparameters_at}.")):
        for field in fields:
            if native_path == field.native or native_path.startswith(field.native + "."):
                return prefix + field.openai + native_path.removeprefix(field.native)
    return None


# ---------------------------------------------------------------- jobs


# Native status → OpenAI status. A job stopping (pausing, cancelling) still holds its
# device and may write a checkpoint: it reads `running` until it has stopped.
STATUSES: dict[str, FineTuningStatus] = {
    "queued": "queued",  # `validating_files` while a file it trains on validates
    "running": "running",
    "pausing": "running",
    "cancelling": "running",
    "paused": "paused",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


def openai_status(native: str, *, waiting_for_files: bool) -> FineTuningStatus:
    if native == "queued" and waiting_for_files:
        return "validating_files"
    return STATUSES[native]


def unix_seconds(moment: datetime | None) -> int | None:
    utc = as_utc(moment)
    return None if utc is None else int(utc.timestamp())


def model_of(spec: Mapping[str, Any]) -> str:
    """The job's model as OpenAI names it: its pretrained name or path, else its type."""
    model = spec.get("model") or {}
    return str(model.get("pretrained") or model.get("type"))


def fine_tuned_model_name(*, spec: Mapping[str, Any], tenant: str, job_id: str) -> str:
    """`ft:<model>:<tenant>:<suffix>:<job id>`, as OpenAI's `ft:<model>:<org>:<suffix>:<id>`;
    GET /v1/models/{name}/weights downloads it."""
    return f"ft:{model_of(spec)}:{tenant}:{spec.get('name') or ''}:{job_id}"


def checkpoint_model_name(base: str, step: int) -> str:
    return f"{base}:ckpt-step-{step}"


CHECKPOINT_SUFFIX = re.compile(r"^ckpt-step-(\d{1,10})$")


def parse_model_name(name: str) -> tuple[str, int | None]:
    """(job id, checkpoint step or None) of a fine-tuned model name; the caller checks
    that the whole name is the job's. ValueError when it is no such name."""
    if not name.startswith("ft:"):
        raise ValueError("a fine-tuned model name starts with 'ft:'")
    parts = name.rsplit(":", 2)
    if len(parts) == 3 and (step := CHECKPOINT_SUFFIX.match(parts[2])):
        return parts[1], int(step.group(1))
    return name.rsplit(":", 1)[-1], None


def _hyperparameters(job: JobPublic) -> HyperparametersPublic:
    lr = (job.spec.get("optimizer") or {}).get("lr")
    multiplier = None if lr is None else float(f"{lr / BASE_LEARNING_RATE:.12g}")
    return HyperparametersPublic(
        batch_size=job.batch_size,
        n_epochs=job.spec.get("epochs"),
        learning_rate_multiplier=multiplier,
    )


def render_job(job: JobPublic, *, waiting_for_files: bool = False) -> FineTuningJob:
    """A native job as a `fine_tuning.job` (any model or dataset type)."""
    dataset = job.spec.get("dataset") or {}
    on_file = dataset.get("type") == "file"
    hyperparameters = _hyperparameters(job)
    error = job.error and Error(code=job.error.type, message=job.error.message)
    return FineTuningJob(
        id=job.id,
        created_at=unix_seconds(job.created_at) or 0,
        finished_at=unix_seconds(job.finished_at),
        model=model_of(job.spec),
        organization_id=job.tenant,
        status=openai_status(job.status, waiting_for_files=waiting_for_files),
        training_file=dataset.get("file_id") if on_file else None,
        validation_file=dataset.get("validation_file_id") if on_file else None,
        hyperparameters=hyperparameters,
        method=MethodPublic(
            type="supervised", supervised=SupervisedPublic(hyperparameters=hyperparameters)
        ),
        seed=job.spec.get("seed", 0),
        metadata=job.spec.get("metadata"),
        fine_tuned_model=(
            fine_tuned_model_name(spec=job.spec, tenant=job.tenant, job_id=job.id)
            if job.status == "succeeded"
            else None
        ),
        # OpenAI's is null until the job ends; then every token trained on, repeats included.
        trained_tokens=job.progress.tokens_seen if job.status in FINISHED else None,
        estimated_finish=unix_seconds(job.estimated_finish),
        error=error or None,
        result_files=[],
        integrations=None,
    )


# ---------------------------------------------------------------- events


EVENT_ID = re.compile(r"^ftevent-(\d{1,19})$")


def event_id(native_id: int) -> str:
    return f"ftevent-{native_id}"


def _status_message(data: Mapping[str, Any]) -> str:
    details = [f"{key} {value}" for key, value in data.items() if key != "status"]
    return f"Job {data.get('status')}" + (f" ({', '.join(details)})" if details else "")


def _metrics_message(data: Mapping[str, Any]) -> str:
    return f"Step {data.get('step')}: training loss={data.get('loss')}"


def _checkpoint_message(data: Mapping[str, Any]) -> str:
    return f"Checkpoint saved at step {data.get('step')}"


def _message_field(data: Mapping[str, Any]) -> str | None:
    message = data.get("message")
    return None if message is None else str(message)


def _error_message(data: Mapping[str, Any]) -> str:
    return f"{data.get('type')}: {data.get('message')}"


# Native event type → (OpenAI level, how its message reads). Metrics events are OpenAI's
# `metrics` type, with the native step's numbers and `train_loss` as `data`; every other
# event is a `message` with the native data. Types not listed are `info` messages.
EVENTS: dict[str, tuple[str, Callable[[Mapping[str, Any]], str | None]]] = {
    "status": ("info", _status_message),
    "metrics": ("info", _metrics_message),
    "checkpoint": ("info", _checkpoint_message),
    "warning": ("warn", _message_field),
    "oom_backoff": ("warn", _message_field),
    "overflow_skip": ("warn", _message_field),
    "error": ("error", _error_message),
}


def render_event(
    *, native_id: int, type: str, data: dict[str, Any], created_at: datetime
) -> FineTuningJobEvent:
    level, message_of = EVENTS.get(type, ("info", _message_field))
    message = message_of(data) or f"{type}: {json.dumps(data, sort_keys=True)[:500]}"
    openai_data = data
    if type == "metrics":
        openai_data = data | {"train_loss": data.get("loss")}
        if data.get("eval_loss") is not None:
            openai_data["valid_loss"] = data["eval_loss"]
    return FineTuningJobEvent(
        id=event_id(native_id),
        created_at=unix_seconds(created_at) or 0,
        level=level,
        message=message,
        type="metrics" if type == "metrics" else "message",
        data=openai_data,
    )


# ---------------------------------------------------------------- checkpoints


CHECKPOINT_ID = re.compile(r"^ftckpt-(job_[0-9a-f]{24})-step-(\d{1,10})$")


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id}-step-{step}"


def render_checkpoint(
    *,
    job_id: str,
    model_name: str,
    step: int,
    loss: float | None,
    eval_loss: float | None,
    created_at: datetime,
) -> FineTuningJobCheckpoint:
    """A native checkpoint as a `fine_tuning.job.checkpoint`; `model_name` is the job's
    fine-tuned model name, which the checkpoint's name extends."""
    return FineTuningJobCheckpoint(
        id=checkpoint_id(job_id, step),
        created_at=unix_seconds(created_at) or 0,
        fine_tuned_model_checkpoint=checkpoint_model_name(model_name, step),
        fine_tuning_job_id=job_id,
        step_number=step,
        metrics=CheckpointMetrics(step=step, train_loss=loss, valid_loss=eval_loss),
    )
