"""Bringing an uploaded file's stored bytes to a local path, for its validation and for
the runs that train on it. No torch: the validation task imports this."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

from app.db import Database
from app.errors import NotFound
from app.files import service as files_service
from worker.engine.errors import TrainingError


class StoredFileDamaged(Exception):
    """The bytes read back are not the bytes uploaded."""


def fetch_file(
    database: Database, *, file_id: str, files_dir: Path | None, directory: Path
) -> Path:
    """Write file `file_id` to `directory` as `<file id>.<format>` and return its path.

    Streams chunk by chunk (a file may be larger than memory) and checks the upload's
    sha256. Raises FileNotFound when the file is gone, StoredFileDamaged on a mismatch.
    """
    with database.session() as session:
        data_file = files_service.get_file(session, file_id=file_id)
        path = directory / f"{data_file.id}.{data_file.format}"
        partial = path.with_name(path.name + ".partial")
        digest = hashlib.sha256()
        with partial.open("wb") as output:
            for chunk in files_service.read_content(
                session, data_file=data_file, files_dir=files_dir
            ):
                digest.update(chunk)
                output.write(chunk)
        expected = data_file.sha256
    if digest.hexdigest() != expected:
        partial.unlink()
        raise StoredFileDamaged(
            f"the stored bytes of file {file_id} do not match its upload (sha256 "
            f"{digest.hexdigest()}, expected {expected}); upload it again"
        )
    partial.rename(path)  # complete or absent: a crash mid-copy leaves no half file here
    return path


class RunFiles:
    """The files of one training run (the engine's FileSource): each fetched into
    `directory` on first use and read from there after."""

    def __init__(self, database: Database, *, files_dir: Path | None, directory: Path) -> None:
        self._fetch = partial(fetch_file, database, files_dir=files_dir, directory=directory)
        self._paths: dict[str, Path] = {}

    def __call__(self, file_id: str) -> Path:
        if file_id not in self._paths:
            try:
                self._paths[file_id] = self._fetch(file_id=file_id)
            except NotFound as gone:
                raise TrainingError("invalid_data", f"file {file_id} no longer exists") from gone
            except StoredFileDamaged as damaged:
                raise TrainingError("invalid_data", str(damaged)) from damaged
        return self._paths[file_id]
