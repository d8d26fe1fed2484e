"""A LoRA job's adapter as peft saves it: adapter_model.safetensors + adapter_config.json
in a zip, streamed as its bytes come from the store, with its size known up front.

The adapter config is the JSON the worker wrote into the weights' safetensors metadata
(worker/engine/lora.py): read from the file's header, without torch (an 8-byte
little-endian header length, then a JSON header).

The zip is written by `zipfile` into a sink that cannot seek, so each member is stored
(uncompressed: tensors hardly compress) with its CRC and sizes in a data descriptor after
its bytes; that layout's size follows from the members' names and sizes alone.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import BinaryIO, cast

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# Where the worker puts the adapter config in the weights' metadata.
ADAPTER_CONFIG_KEY = "peft_adapter_config"
# zipfile switches to zip64 records past this; an adapter is far smaller, and the size
# computed below is that of the plain layout.
MAX_MEMBER_BYTES = zipfile.ZIP64_LIMIT // 2
# Bounds a header to read: safetensors itself refuses headers over 100 MB.
MAX_HEADER_BYTES = 100_000_000

# Fixed sizes of the zip records written per member and once (APPNOTE.TXT 4.3).
_LOCAL_HEADER = 30
_DATA_DESCRIPTOR = 16  # with its signature, as zipfile writes it
_CENTRAL_HEADER = 46
_END_OF_CENTRAL_DIRECTORY = 22


class NotAnAdapter(ValueError):
    """The weights carry no adapter config: not a LoRA job's."""


def safetensors_metadata(chunks: Iterable[bytes]) -> dict[str, str]:
    """The `__metadata__` of a safetensors file whose bytes are `chunks`; reads only as
    many chunks as the header spans."""
    head = b""
    length: int | None = None
    for chunk in chunks:
        head += chunk
        if length is None and len(head) >= 8:
            (length,) = struct.unpack("<Q", head[:8])
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a safetensors header of {length} bytes is too large")
        if length is not None and len(head) >= 8 + length:
            header = json.loads(head[8 : 8 + length])
            metadata = header.get("__metadata__") or {}
            return {str(key): str(value) for key, value in metadata.items()}
    raise ValueError("the weights end before their safetensors header does")


def adapter_config(metadata: dict[str, str]) -> bytes:
    """adapter_config.json as peft writes it (indented, keys sorted), from the metadata."""
    text = metadata.get(ADAPTER_CONFIG_KEY)
    if text is None:
        raise NotAnAdapter("the weights carry no peft adapter config")
    return (json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n").encode()


def zip_size(members: Iterable[tuple[str, int]]) -> int:
    """The bytes `stream_zip` writes for members of these (name, size)."""
    total = _END_OF_CENTRAL_DIRECTORY
    for name, size in members:
        _check_member(name, size)
        encoded = len(name.encode())
        total += _LOCAL_HEADER + encoded + size + _DATA_DESCRIPTOR + _CENTRAL_HEADER + encoded
    return total


def stream_zip(
    members: Iterable[tuple[str, int, Iterable[bytes]]], modified: datetime
) -> Iterator[bytes]:
    """A zip of the members (name, size, bytes), yielded as it is written."""
    sink = _Pending()
    with zipfile.ZipFile(cast(BinaryIO, sink), "w", zipfile.ZIP_STORED) as archive:
        for name, size, chunks in members:
            _check_member(name, size)
            info = zipfile.ZipInfo(name, date_time=modified.timetuple()[:6])
            info.file_size = size
            info.external_attr = 0o644 << 16
            with archive.open(info, "w") as member:
                for chunk in chunks:
                    member.write(chunk)
                    yield from sink.take()
            yield from sink.take()
    yield from sink.take()


def _check_member(name: str, size: int) -> None:
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"{name} has {size} bytes, over the {MAX_MEMBER_BYTES} of a plain zip")


class _Pending:
    """A write-only sink (no tell, no seek: zipfile then writes data descriptors) that
    keeps what was written until it is taken."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.written.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> list[bytes]:
        taken, self.written = self.written, []
        return taken
