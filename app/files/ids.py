"""File ids: `file_` + 12 hex digits of Unix milliseconds + 12 random hex digits.

Like job ids they sort by creation time, so the newest-first list pages by primary key.
"""

from __future__ import annotations

import re
import secrets
import time

FILE_ID_PATTERN = re.compile(r"^file_[0-9a-f]{24}$")


def new_file_id() -> str:
    return f"file_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def is_file_id(value: str) -> bool:
    return bool(FILE_ID_PATTERN.match(value))
