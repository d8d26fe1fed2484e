"""Reading a multipart/form-data upload as it arrives, without holding the file.

Starlette's `request.form()` spools the whole file before the route sees it; here the
body goes through python-multipart's streaming parser message by message, and the
file's bytes come out in pieces of at most CHUNK_BYTES for the route to store while the
rest is still on the wire. The small fields beside the file are kept (a few KiB at most).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.blobs import CHUNK_BYTES
from app.files.exceptions import BadUpload
from app.limits import PayloadTooLarge

# Part headers and small fields together; the body-size cap allows this much beside the file.
MAX_FORM_OVERHEAD_BYTES = 16 * 1024


@dataclass(frozen=True)
class FileStart:
    """The file part begins; `filename` as the client sent it (may be empty)."""

    filename: str


@dataclass(frozen=True)
class FileData:
    data: bytes


@dataclass(frozen=True)
class FormField:
    name: str
    value: str


FormEvent = FileStart | FileData | FormField


class _Collector:
    """python-multipart's callbacks: turns what the parser finds into FormEvents."""

    def __init__(self, file_field: str, fields: Collection[str], max_file_bytes: int) -> None:
        self.file_field = file_field
        self.fields = fields
        self.max_file_bytes = max_file_bytes
        self.file_bytes = 0
        self.events: list[FormEvent] = []
        self.overhead = 0
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.disposition = b""
        self.part: str | None = None  # the field name of the part being read
        self.value = bytearray()  # a small field's value, or the file's next piece
        self.saw_file = False
        self.ended = False

    def _count(self, size: int) -> None:
        self.overhead += size
        if self.overhead > MAX_FORM_OVERHEAD_BYTES:
            raise BadUpload(
                "body",
                f"the fields and part headers beside the file exceed {MAX_FORM_OVERHEAD_BYTES} "
                "bytes",
            )

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.strip().lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        kind, options = parse_options_header(self.disposition)
        self.disposition = b""
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if kind != b"form-data" or not name:
            raise BadUpload("body", "every part needs `Content-Disposition: form-data; name=…`")
        if name == self.file_field:
            if self.saw_file:
                raise BadUpload(name, "one file per upload")
            self.saw_file = True
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.events.append(FileStart(filename))
        elif name not in self.fields:
            known = ", ".join(f"`{field}`" for field in (self.file_field, *self.fields))
            raise BadUpload(name, f"unknown field; an upload has {known}")
        self.part = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part != self.file_field:
            self._count(end - start)
        else:  # refused as soon as it passes the cap, not a whole chunk later
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise PayloadTooLarge("the file", self.max_file_bytes)
        self.value += data[start:end]
        if self.part == self.file_field:
            while len(self.value) >= CHUNK_BYTES:
                self.events.append(FileData(bytes(self.value[:CHUNK_BYTES])))
                del self.value[:CHUNK_BYTES]

    def on_part_end(self) -> None:
        if self.part == self.file_field:
            if self.value:
                self.events.append(FileData(bytes(self.value)))
        elif self.part is not None:
            self.events.append(FormField(self.part, self.value.decode("utf-8", "replace")))
        self.value.clear()
        self.part = None

    def on_end(self) -> None:
        self.ended = True


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a Content-Type header; BadUpload when it is no form upload."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise BadUpload("file", "send the file as multipart/form-data, in a part named `file`")
    return boundary


async def read_form(
    body: AsyncIterator[bytes],
    content_type: str,
    *,
    file_field: str,
    fields: Collection[str],
    max_file_bytes: int,
) -> AsyncGenerator[FormEvent, None]:
    """The events of a multipart body in order, as its bytes arrive. The body is checked
    to its closing boundary: a body cut short is a BadUpload, never a shorter file; a
    file over `max_file_bytes` is PayloadTooLarge once that many bytes have come."""
    collector = _Collector(file_field, fields, max_file_bytes)
    try:
        # Each of python-multipart's callbacks is the collector's method of that name.
        callbacks = {
            name: getattr(collector, name) for name in dir(_Collector) if name[:3] == "on_"
        }
        parser = MultipartParser(boundary_of(content_type), callbacks)  # type: ignore[arg-type]
        async for message in body:
            parser.write(message)
            for event in collector.events:
                yield event
            collector.events.clear()
    except FormParserError as error:
        raise BadUpload("body", f"not a valid multipart/form-data body: {error}") from None
    if not collector.ended:
        raise BadUpload("body", "the body ended before the closing multipart boundary")
    if not collector.saw_file:
        raise BadUpload(file_field, "missing: send the file in a part named `file`")
