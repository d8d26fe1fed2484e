"""The streaming multipart reader: the same file whatever way the body is cut into
messages, in pieces of at most CHUNK_BYTES, and a body cut short or over the cap refused."""

from __future__ import annotations

import os

import anyio
import pytest

from app.blobs import CHUNK_BYTES
from app.files.exceptions import BadUpload
from app.files.multipart import FileData, FileStart, FormEvent, FormField, read_form
from app.limits import PayloadTooLarge
from tests.app.files.uploads import BOUNDARY, CONTENT_TYPE, multipart

# Bytes that look like the start of the boundary, inside the file.
TRICKY = f"a,b\r\n--{BOUNDARY[:-1]}\r\n--\r\n".encode() + bytes(range(256))


def read(body: bytes, message_bytes: int, max_file_bytes: int = 2**40) -> list[FormEvent]:
    async def messages():  # type: ignore[no-untyped-def]
        for start in range(0, len(body), message_bytes):
            yield body[start : start + message_bytes]

    async def collect() -> list[FormEvent]:
        events = read_form(
            messages(),
            CONTENT_TYPE,
            file_field="file",
            fields=("format",),
            max_file_bytes=max_file_bytes,
        )
        return [event async for event in events]

    return anyio.run(collect)


@pytest.mark.parametrize("message_bytes", [1, 2, 7, 100, 65536])
def test_the_file_and_fields_come_out_the_same_however_the_body_is_cut(
    message_bytes: int,
) -> None:
    body = b"".join(multipart("data.csv", [TRICKY], fields={"format": "csv"}))
    events = read(body, message_bytes)
    assert events[:2] == [FormField("format", "csv"), FileStart("data.csv")]
    assert all(isinstance(event, FileData) for event in events[2:])
    assert b"".join(event.data for event in events[2:]) == TRICKY  # type: ignore[union-attr]


def test_a_large_file_comes_out_in_pieces_of_chunk_bytes() -> None:
    data = os.urandom(2 * CHUNK_BYTES + 5)
    events = read(b"".join(multipart("big.npz", [data])), 65536)
    pieces = [event.data for event in events if isinstance(event, FileData)]
    assert [len(piece) for piece in pieces] == [CHUNK_BYTES, CHUNK_BYTES, 5]
    assert b"".join(pieces) == data


def test_a_body_without_its_closing_boundary_is_refused_not_stored_short() -> None:
    body = b"".join(multipart("data.csv", [b"1,2\n"], closed=False))
    with pytest.raises(BadUpload, match="ended before the closing multipart boundary"):
        read(body, 100)


def test_the_cap_is_enforced_as_the_bytes_arrive() -> None:
    body = b"".join(multipart("data.csv", [b"x" * 1000]))
    at_the_cap = read(body, 10, max_file_bytes=1000)
    assert sum(len(e.data) for e in at_the_cap if isinstance(e, FileData)) == 1000
    with pytest.raises(PayloadTooLarge, match="the file is larger than 999 bytes"):
        read(body, 10, max_file_bytes=999)
