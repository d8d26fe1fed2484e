"""Multipart upload bodies built piece by piece, so that a test never holds a large file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

BOUNDARY = "trainjob-test-7f3a9c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(
    filename: str,
    chunks: Iterable[bytes],
    *,
    fields: Mapping[str, str] | None = None,
    closed: bool = True,
) -> Iterator[bytes]:
    """The fields, then a `file` part with the bytes of `chunks`, then (if `closed`) the
    closing boundary: a body of multipart/form-data; boundary=BOUNDARY."""
    for name, value in (fields or {}).items():
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    yield (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield from chunks
    if closed:
        yield f"\r\n--{BOUNDARY}--\r\n".encode()


def multipart_bytes(filename: str, data: bytes, **options: object) -> bytes:
    return b"".join(multipart(filename, [data], **options))  # type: ignore[arg-type]
