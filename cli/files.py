"""`trainjob files upload|list|rm`: the service's data files, through its HTTP API.

The upload streams the file from disk (httpx reads it 64 KiB at a time), so a file of
a GiB needs no more memory here than a small one. Exit codes as for the other client
commands; `upload --wait` exits 1 when validation finds the file invalid.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cli import output
from cli.client import EXIT_FAILED, EXIT_OK, Api, UsageError, list_page, show

# Writing a large file takes as long as it takes; each read or write may stall this long.
UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
POLL_SECONDS = 0.5


def file_path(file_id: str) -> str:
    return f"/v1/files/{quote(file_id, safe='')}"


def upload(api: Api, args: argparse.Namespace) -> int:
    path: Path = args.path
    try:
        handle = path.open("rb")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from error
    with handle:
        response = api.http.post(
            "/v1/files",
            files={"file": (path.name, handle, "application/octet-stream")},
            data={"format": args.format} if args.format else None,
            timeout=UPLOAD_TIMEOUT,
        )
    data_file: dict[str, Any] = response.json()
    if args.wait:
        if not args.as_json:
            print(file_line(data_file), flush=True)
        # Until a worker has checked it (Ctrl-C stops waiting, not the check).
        while (data_file := api.get(file_path(data_file["id"])))["status"] == "validating":
            time.sleep(POLL_SECONDS)
    show(data_file, file_line(data_file), as_json=args.as_json)
    if data_file["status"] == "invalid":
        print(f"trainjob: {data_file['id']} is invalid:", file=sys.stderr)
        for problem in data_file["errors"]:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def remove(api: Api, args: argparse.Namespace) -> int:
    api.http.delete(file_path(args.file_id))
    show({"id": args.file_id, "deleted": True}, f"{args.file_id} deleted", as_json=args.as_json)
    return EXIT_OK


COMMANDS = {
    "upload": upload,
    "list": lambda api, args: list_page(api, args, "files", print_file_table),
    "rm": remove,
}


def file_line(data_file: dict[str, Any]) -> str:
    """One line: id, name, format, size, status, and what validation found."""
    line = (
        f"{data_file['id']}  {data_file['filename']}  {data_file['format']}  "
        f"{data_file['size_bytes']:,} bytes  {data_file['status']}"
    )
    rows = (data_file.get("stats") or {}).get("rows")
    if data_file["status"] == "valid" and isinstance(rows, int):
        line += f": {data_file.get('kind')}, {rows:,} rows"
    return line


def print_file_table(files: list[dict[str, Any]]) -> None:
    """The `trainjob files list` table: one row per file."""
    header = ("ID", "STATUS", "FORMAT", "KIND", "SIZE", "ROWS", "CREATED", "FILENAME")
    rows = [
        (
            data_file["id"],
            data_file["status"],
            data_file["format"],
            data_file.get("kind") or "",
            f"{data_file['size_bytes']:,}",
            str((data_file.get("stats") or {}).get("rows", "")),
            output.format_time(data_file.get("created_at")),
            data_file["filename"],
        )
        for data_file in files
    ]
    output.print_table(header, rows)
