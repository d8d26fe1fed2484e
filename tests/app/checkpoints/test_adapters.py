"""The LoRA adapter zip: its size known before a byte is read, its config from the header."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from datetime import datetime

import pytest

from app.checkpoints.adapters import (
    ADAPTER_CONFIG_KEY,
    NotAnAdapter,
    adapter_config,
    safetensors_metadata,
    stream_zip,
    zip_size,
)

WHEN = datetime(2026, 12, 6, 12, 30, 15)


def safetensors_bytes(metadata: dict[str, str] | None, data: bytes = b"\0" * 16) -> bytes:
    header: dict[str, object] = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


@pytest.mark.parametrize("sizes", [[0], [1, 5], [100_000, 3, 0]])
def test_the_zip_has_the_size_computed_from_names_and_sizes(sizes: list[int]) -> None:
    members = [(f"member-{i}.bin", bytes([i]) * size) for i, size in enumerate(sizes)]
    streamed = b"".join(
        stream_zip([(name, len(data), pieces(data, 7_000)) for name, data in members], WHEN)
    )
    assert len(streamed) == zip_size([(name, len(data)) for name, data in members])
    with zipfile.ZipFile(io.BytesIO(streamed)) as archive:
        assert archive.testzip() is None  # every CRC checks
        assert [(info.filename, archive.read(info)) for info in archive.infolist()] == members
        assert archive.infolist()[0].date_time == (2026, 12, 6, 12, 30, 14)  # 2-second steps


def test_the_zip_streams_as_its_members_are_read() -> None:
    read = []

    def chunks() -> list[bytes]:
        read.append(True)
        return [b"abc"]

    stream = stream_zip([("a", 3, chunks())], WHEN)
    next(stream)
    assert read  # the first bytes come before the whole archive is built


def test_the_adapter_config_is_read_from_a_header_split_across_chunks() -> None:
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    data = safetensors_bytes({"step": "3", ADAPTER_CONFIG_KEY: json.dumps(config)})
    for size in (1, 5, 8, 64, len(data)):
        metadata = safetensors_metadata(iter(pieces(data, size)))
        assert metadata["step"] == "3"
        assert json.loads(adapter_config(metadata)) == config


def test_the_header_is_read_without_reading_the_tensors() -> None:
    data = safetensors_bytes({ADAPTER_CONFIG_KEY: "{}"})
    header_end = 8 + struct.unpack("<Q", data[:8])[0]

    def chunks() -> object:
        yield data[:header_end]
        raise AssertionError("read past the header")

    assert safetensors_metadata(chunks()) == {ADAPTER_CONFIG_KEY: "{}"}  # type: ignore[arg-type]


def test_weights_without_an_adapter_config_are_not_an_adapter() -> None:
    with pytest.raises(NotAnAdapter):
        adapter_config(safetensors_metadata([safetensors_bytes({"step": "1"})]))
    with pytest.raises(NotAnAdapter):
        adapter_config(safetensors_metadata([safetensors_bytes(None)]))


def test_a_truncated_header_is_an_error() -> None:
    with pytest.raises(ValueError, match="end before"):
        safetensors_metadata([safetensors_bytes({"a": "b"})[:20]])
