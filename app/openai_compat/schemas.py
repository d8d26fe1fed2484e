"""The OpenAI fine-tuning shapes: the create body trainjob accepts, and the objects it
returns as the official `openai` client reads them (openai/types/fine_tuning/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]


class _Strict(BaseModel):
    # An unknown field is a 422 naming it, never silently dropped.
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    batch_size: Annotated[int, Field(ge=1)] | Auto | None = None
    n_epochs: Annotated[int, Field(ge=1)] | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Auto | None = None


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    # dpo and reinforcement are named so that their refusal says what is unsupported.
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobCreate(_Strict):
    """`POST /v1/fine_tuning/jobs`, as `client.fine_tuning.jobs.create(...)` sends it."""

    model: str = Field(min_length=1, max_length=512)
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    seed: int | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64)
    metadata: dict[str, str] | None = None
    # Refused with a pointer to the native `tracking` field (see mapping.py).
    integrations: list[Any] | None = None


class Error(BaseModel):
    code: str
    message: str
    param: str | None = None


class HyperparametersPublic(BaseModel):
    batch_size: int | Auto | None
    n_epochs: int | Auto | None
    learning_rate_multiplier: float | Auto | None


class SupervisedPublic(BaseModel):
    hyperparameters: HyperparametersPublic


class MethodPublic(BaseModel):
    type: Literal["supervised"]
    supervised: SupervisedPublic


FineTuningStatus = Literal[
    "validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"
]


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    finished_at: int | None
    model: str
    organization_id: str
    status: FineTuningStatus
    training_file: str | None
    validation_file: str | None
    hyperparameters: HyperparametersPublic
    method: MethodPublic
    seed: int
    metadata: dict[str, str] | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    estimated_finish: int | None
    error: Error | None
    result_files: list[str]
    integrations: list[Any] | None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int
    train_loss: float | None
    valid_loss: float | None


class FineTuningJobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
