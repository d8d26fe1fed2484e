"""Making and checking API keys. Nothing here touches the database."""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "tjk"
KEY_PATTERN = re.compile(r"^tjk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


def new_key() -> tuple[str, str]:
    """(key id, the whole key). The id is public; the key is shown once."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_a_key(value: str) -> bool:
    return KEY_PATTERN.match(value) is not None
