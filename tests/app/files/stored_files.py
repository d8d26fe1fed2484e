"""Uploaded files made as rows (as an upload leaves them) and job specs that use them,
for the tests of validation and of jobs on files."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select

from app.blobs import CHUNK_BYTES
from app.db import Database, utcnow
from app.files.models import DataFile, FileChunk
from app.ids import new_file_id
from app.jobs import service as jobs_service
from app.jobs.models import Job, JobEvent
from app.jobs.spec import JobSpec

TEXT_STATS: dict[str, Any] = {"rows": 3, "tokens": 42, "max_row_bytes": 20}
CLASSIFICATION_STATS: dict[str, Any] = {
    "rows": 8,
    "classes": 2,
    "labels": [0, 1],
    "input_shape": [4],
}
IMAGE_STATS: dict[str, Any] = {
    "rows": 8,
    "classes": 2,
    "labels": [0, 1],
    "input_shape": [1, 8, 8],
}


def add_file(
    database: Database,
    *,
    tenant: str = "default",
    status: str = "validating",
    format: str = "jsonl",
    kind: str | None = None,
    stats: dict[str, Any] | None = None,
    errors: list[str] | None = None,
    content: bytes = b"",
    chunk_bytes: int = CHUNK_BYTES,
) -> str:
    """A stored file: its bytes in database chunks, `validating` unless told."""
    file_id = new_file_id()
    settled = status != "validating"
    with database.session() as session:
        session.add(
            DataFile(
                id=file_id,
                tenant=tenant,
                filename=f"data.{format}",
                format=format,
                kind=kind if settled else None,
                size_bytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                status=status,
                errors=errors if settled else None,
                stats=stats if settled else None,
                storage="database",
                created_at=utcnow(),
                validated_at=utcnow() if settled else None,
            )
        )
        session.flush()
        for seq, start in enumerate(range(0, len(content), chunk_bytes)):
            session.add(
                FileChunk(file_id=file_id, seq=seq, data=content[start : start + chunk_bytes])
            )
        session.commit()
    return file_id


def valid_text_file(database: Database, **changes: Any) -> str:
    return add_file(database, **{"status": "valid", "kind": "text", "stats": TEXT_STATS} | changes)


def text_job_spec(file_id: str, **dataset: Any) -> dict[str, Any]:
    """A tiny-gpt job on a JSONL text file."""
    return {
        "model": {"type": "tiny-gpt", "n_layer": 1, "n_embd": 16, "block_size": 32},
        "dataset": {"type": "file", "file_id": file_id, "max_length": 32, **dataset},
        "micro_batch_size": 2,
        "accumulation_steps": 2,
        "max_steps": 3,
        "device": "cpu",
    }


def create_job(database: Database, spec: dict[str, Any], tenant: str = "default") -> str:
    with database.session() as session:
        job = jobs_service.create_job(session, spec=JobSpec.model_validate(spec), tenant=tenant)
        session.commit()
        return job.id


def load_job(database: Database, job_id: str) -> Job:
    with database.session() as session:
        job = session.get(Job, job_id)
    assert job is not None
    return job


def load_file(database: Database, file_id: str) -> DataFile:
    with database.session() as session:
        data_file = session.get(DataFile, file_id)
    assert data_file is not None
    return data_file


def events(database: Database, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    with database.session() as session:
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
    return [(row.type, row.data) for row in rows]
