"""Ids of jobs and files: `job_` or `file_`, 12 hex digits of Unix milliseconds, 12 random
hex digits.

They sort by creation time, so the newest-first lists page by primary key alone.
"""

from __future__ import annotations

import re
import secrets
import time

JOB_ID_PATTERN = re.compile(r"^job_[0-9a-f]{24}$")
FILE_ID_PATTERN = re.compile(r"^file_[0-9a-f]{24}$")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def new_job_id() -> str:
    return _new_id("job")


def new_file_id() -> str:
    return _new_id("file")


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_PATTERN.match(value))


def is_file_id(value: str) -> bool:
    return bool(FILE_ID_PATTERN.match(value))
