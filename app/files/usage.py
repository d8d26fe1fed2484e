"""Jobs and the files they train on: the checks at submit, and what a file's validation
means for the jobs waiting for it.

A job whose file is still `validating` is stored `queued` but unsent: it is not
`sendable` (app/jobs/runs.py) until the file's validation is recorded. Then each such
job is either failed (`invalid_data`: the file is invalid or does not fit the model) or
marked sent, and the caller publishes it after the commit; the reaper sends it if that
message is lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import InvalidRequest
from app.files.kinds import describe_kind, model_fit_error
from app.files.models import DataFile, JobFile
from app.jobs.models import Job
from app.jobs.runs import append_events, mark_sent, sendable
from app.jobs.spec import FileDatasetSpec

INVALID_DATA = "invalid_data"


@dataclass(frozen=True)
class DatasetFile:
    """One file of a file dataset: its role in job_files and the spec field naming it."""

    role: str
    field: str
    file_id: str


def dataset_files(dataset: FileDatasetSpec) -> list[DatasetFile]:
    files = [DatasetFile("train", "dataset.file_id", dataset.file_id)]
    if dataset.validation_file_id is not None:
        files.append(
            DatasetFile("validation", "dataset.validation_file_id", dataset.validation_file_id)
        )
    return files


def invalid_file_message(data_file: DataFile) -> str:
    """The file and its first error, e.g. for a job's error message."""
    errors = data_file.errors or ["no reason recorded"]
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"file {data_file.id} ({data_file.filename}) is invalid: {errors[0]}{more}"


def file_problems(
    dataset: FileDatasetSpec, model_type: str, files: Mapping[str, DataFile]
) -> list[tuple[str, str]]:
    """(spec field, message) for each reason a job of `model_type` cannot train on the
    dataset's files. `files` maps file id to row; an id missing from it is unknown. Files
    still validating are checked as far as their row allows: fully once valid."""
    problems: list[tuple[str, str]] = []
    fitting: list[tuple[DatasetFile, DataFile]] = []
    for wanted in dataset_files(dataset):
        data_file = files.get(wanted.file_id)
        if data_file is None:
            problems.append((wanted.field, f"no file {wanted.file_id!r}"))
            continue
        if dataset.format is not None and dataset.format != data_file.format:
            problems.append(
                (
                    "dataset.format",
                    f"is {dataset.format!r}, but file {data_file.id} was uploaded and "
                    f"validated as {data_file.format!r}",
                )
            )
        if data_file.status == "invalid":
            problems.append((wanted.field, invalid_file_message(data_file)))
        elif data_file.status == "valid" and data_file.kind is not None:
            misfit = model_fit_error(
                model_type, data_file.kind, data_file.stats or {}, dataset.tokenizer
            )
            if misfit is not None:
                problems.append((wanted.field, f"file {data_file.id}: {misfit}"))
            else:
                fitting.append((wanted, data_file))
    if len(fitting) == 2:  # the validation file must hold what the training file holds
        (_, train), (validation, held_out) = fitting
        shapes = [(train.stats or {}).get("input_shape"), (held_out.stats or {}).get("input_shape")]
        if train.kind != held_out.kind:
            problems.append(
                (
                    validation.field,
                    f"file {held_out.id} holds {describe_kind(held_out.kind or '')}, "
                    f"the training file {train.id} {describe_kind(train.kind or '')}",
                )
            )
        elif shapes[0] != shapes[1]:
            problems.append(
                (
                    validation.field,
                    f"file {held_out.id} has samples of shape {shapes[1]}, "
                    f"the training file {train.id} {shapes[0]}",
                )
            )
    return problems


def check_dataset_files(
    session: Session, *, dataset: FileDatasetSpec, model_type: str, tenant: str
) -> None:
    """Raise InvalidRequest (422, naming the spec field) unless the tenant's files can
    train this model (those still validating, as far as their rows allow)."""
    # FOR SHARE: a validation recording its result waits for this submit's commit, and
    # then sees the new job among those waiting for the file (Postgres; on SQLite the
    # reaper sends a job that this race leaves unsent).
    rows = session.scalars(
        select(DataFile)
        .where(DataFile.id.in_(dataset.file_ids), DataFile.tenant == tenant)
        .with_for_update(read=True)
    )
    problems = file_problems(dataset, model_type, {row.id: row for row in rows})
    if problems:
        summary = "; ".join(f"{path}: {message}" for path, message in problems)
        fields = [{"path": path, "message": message} for path, message in problems]
        raise InvalidRequest(summary, fields=fields)


def link_job_files(session: Session, *, job_id: str, dataset: FileDatasetSpec) -> None:
    """Record which files the job uses: they cannot be deleted while it is queued or
    running, and their validation finds the job."""
    for wanted in dataset_files(dataset):
        session.add(JobFile(job_id=job_id, file_id=wanted.file_id, role=wanted.role))
    session.flush()


def blocking_file(session: Session, *, job_id: str) -> DataFile | None:
    """A file of the job that is not valid (an invalid one first), or None: the job can run."""
    rows = session.scalars(
        select(DataFile)
        .join(JobFile, JobFile.file_id == DataFile.id)
        .where(JobFile.job_id == job_id, DataFile.status != "valid")
    ).all()
    return min(rows, key=lambda row: row.status != "invalid", default=None)


def fail_queued_jobs(session: Session, *, messages: Mapping[str, str]) -> list[str]:
    """Fail queued jobs `invalid_data`, each with its message; the ids actually failed
    (a job cancelled or claimed meanwhile is left alone)."""
    now = utcnow()
    failed = []
    for job_id, message in messages.items():
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(
                status="failed",
                finished_at=now,
                error_type=INVALID_DATA,
                error_message=message,
            )
        ).rowcount  # type: ignore[attr-defined]
        if changed:
            error = {"type": INVALID_DATA, "message": message}
            append_events(
                session,
                job_id,
                [("error", error), ("status", {"status": "failed", "error": error})],
            )
            failed.append(job_id)
    return failed


@dataclass(frozen=True)
class Recorded:
    """What recording a validation did. The caller commits, then sends `to_send`."""

    recorded: bool  # False: the file is gone, or another delivery recorded it first
    to_send: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def record_validation(
    session: Session,
    *,
    file_id: str,
    status: str,
    kind: str | None,
    errors: Sequence[str],
    stats: Mapping[str, Any],
) -> Recorded:
    """Store a file's validation result, once, and settle the jobs waiting for it: fail
    them when it is invalid or does not fit their model; otherwise mark sent those that
    wait for no other file."""
    changed = session.execute(
        update(DataFile)
        .where(DataFile.id == file_id, DataFile.status == "validating")
        .values(
            status=status, kind=kind, errors=list(errors), stats=dict(stats), validated_at=utcnow()
        )
    ).rowcount  # type: ignore[attr-defined]
    if not changed:  # a duplicate delivery: the first one settled the jobs
        return Recorded(recorded=False)
    data_file = session.get(DataFile, file_id, populate_existing=True)
    assert data_file is not None
    if status != "valid":
        users = session.scalars(
            select(JobFile.job_id)
            .join(Job, Job.id == JobFile.job_id)
            .where(JobFile.file_id == file_id, Job.status == "queued")
        ).all()
        message = invalid_file_message(data_file)
        return Recorded(
            recorded=True, failed=fail_queued_jobs(session, messages=dict.fromkeys(users, message))
        )
    waiting = session.execute(
        select(Job.id, Job.spec)
        .join(JobFile, JobFile.job_id == Job.id)
        .where(JobFile.file_id == file_id, sendable())
    ).all()
    misfits, ready = _fit_waiting_jobs(session, waiting)
    failed = fail_queued_jobs(session, messages=misfits)
    to_send = mark_sent(session, job_ids=ready)
    return Recorded(recorded=True, to_send=to_send, failed=failed)


def _fit_waiting_jobs(session: Session, waiting: Sequence[Any]) -> tuple[dict[str, str], list[str]]:
    """Split jobs whose files are all valid now into (job id → why its files do not fit
    its model, the ids of those that fit). Their kinds were unknown at submit."""
    if not waiting:
        return {}, []
    rows = session.scalars(
        select(DataFile)
        .join(JobFile, JobFile.file_id == DataFile.id)
        .where(JobFile.job_id.in_([job.id for job in waiting]))
    ).all()
    files = {row.id: row for row in rows}
    misfits: dict[str, str] = {}
    ready: list[str] = []
    for job in waiting:
        dataset = FileDatasetSpec.model_validate(job.spec["dataset"])
        problems = file_problems(dataset, str(job.spec["model"]["type"]), files)
        if problems:
            misfits[job.id] = "; ".join(f"{path}: {message}" for path, message in problems)
        else:
            ready.append(job.id)
    return misfits, ready
