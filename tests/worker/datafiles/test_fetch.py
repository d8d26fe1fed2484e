"""An uploaded file's bytes brought to a local path: for its validation, and once per run
for the jobs that train on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.db import Database
from app.files import service as files_service
from app.files.exceptions import FileNotFound
from app.files.models import DataFile
from tests.app.files.stored_files import add_file
from worker.datafiles.fetch import RunFiles, StoredFileDamaged, fetch_file
from worker.engine.errors import TrainingError


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """A run's own directory (tmp_path also holds the SQLite database)."""
    path = tmp_path / "run"
    path.mkdir()
    return path


CONTENT = b"label,x\n" + b"".join(f"{i % 2},{i}.5\n".encode() for i in range(1000))


def test_a_file_is_written_whole_as_id_dot_format(database: Database, directory: Path) -> None:
    file_id = add_file(database, format="csv", content=CONTENT, chunk_bytes=1000)
    path = fetch_file(database, file_id=file_id, files_dir=None, directory=directory)
    assert path == directory / f"{file_id}.csv"
    assert path.read_bytes() == CONTENT
    assert [p.name for p in directory.iterdir()] == [path.name]  # no partial file left


def test_bytes_other_than_the_uploaded_ones_are_refused(
    database: Database, directory: Path
) -> None:
    file_id = add_file(database, content=CONTENT)
    with database.session() as session:
        session.execute(update(DataFile).where(DataFile.id == file_id).values(sha256="f" * 64))
        session.commit()
    with pytest.raises(StoredFileDamaged, match="upload it again"):
        fetch_file(database, file_id=file_id, files_dir=None, directory=directory)
    assert list(directory.iterdir()) == []
    with pytest.raises(FileNotFound):
        fetch_file(
            database, file_id="file_000000000000000000000000", files_dir=None, directory=directory
        )


def test_a_run_reads_each_file_from_storage_once(
    database: Database, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    read_content = files_service.read_content

    def counted(session: Any, *, data_file: DataFile, files_dir: Path | None) -> Iterator[bytes]:
        reads.append(data_file.id)
        return read_content(session, data_file=data_file, files_dir=files_dir)

    monkeypatch.setattr(files_service, "read_content", counted)
    train = add_file(database, format="csv", content=CONTENT)
    held_out = add_file(database, format="csv", content=CONTENT[:100])
    files = RunFiles(database, files_dir=None, directory=directory)

    paths = [files(train), files(held_out), files(train), files(held_out)]

    assert reads == [train, held_out]
    assert paths[0] == paths[2] and paths[0].read_bytes() == CONTENT
    assert paths[1].read_bytes() == CONTENT[:100]


def test_a_run_whose_file_is_gone_or_damaged_fails_invalid_data(
    database: Database, directory: Path
) -> None:
    files = RunFiles(database, files_dir=None, directory=directory)
    with pytest.raises(TrainingError) as gone:
        files("file_000000000000000000000000")
    assert gone.value.type == "invalid_data" and "no longer exists" in gone.value.message

    damaged = add_file(database, content=CONTENT)
    with database.session() as session:
        session.execute(update(DataFile).where(DataFile.id == damaged).values(sha256="0" * 64))
        session.commit()
    with pytest.raises(TrainingError) as refused:
        files(damaged)
    assert refused.value.type == "invalid_data" and damaged in refused.value.message
