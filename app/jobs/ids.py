"""Job ids: `job_` + 12 hex digits of Unix milliseconds + 12 random hex digits.

They sort by creation time, so the newest-first list pages by primary key alone.
"""

from __future__ import annotations

import re
import secrets
import time

JOB_ID_PATTERN = re.compile(r"^job_[0-9a-f]{24}$")


def new_job_id() -> str:
    return f"job_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_PATTERN.match(value))
