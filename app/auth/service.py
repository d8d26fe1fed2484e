"""API keys and who a request is: create, list, revoke, authenticate. Only a key's hash
is stored; the key itself is shown once, when it is created."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from app.auth.models import ApiKey
from app.db import utcnow
from app.errors import InvalidRequest, NotFound
from app.reads import Reads

DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_PATTERN = re.compile(r"^tjk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is asking. Admins see every tenant's jobs."""

    tenant: str
    admin: bool
    key_id: str | None = None
    # The key's cap on job priority (app/tenants/service.py check_submit).
    max_priority: int | None = None

    @property
    def scope(self) -> str | None:
        """The tenant whose jobs this principal may see; None: all of them."""
        return None if self.admin else self.tenant


# Auth is off (no key exists): everyone is an admin of the one default tenant.
OPEN = Principal(tenant=DEFAULT_TENANT, admin=True)


def create_key(
    session: Session,
    *,
    tenant: str,
    admin: bool,
    name: str | None = None,
    max_priority: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key for `tenant`; returns the row and the key, which is not stored."""
    if not TENANT_PATTERN.match(tenant):
        raise InvalidRequest(
            "a tenant is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            fields=[{"path": "tenant", "message": "invalid tenant name"}],
        )
    key_id = secrets.token_hex(6)  # public; the whole key is shown once
    key = f"tjk_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        id=key_id,
        tenant=tenant,
        admin=admin,
        name=name,
        key_hash=key_hash(key),
        max_priority=max_priority,
    )
    session.add(row)
    session.flush()
    return row, key


def list_keys(session: Session, *, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query))


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    """Revoke a key; requests with it are refused from now on."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    if row.revoked_at is None:
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        session.refresh(row)
    return row


KEY_BY_HASH = (
    select(ApiKey.id, ApiKey.tenant, ApiKey.admin, ApiKey.max_priority)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
    .limit(1)
)


async def authenticate(reads: Reads, *, key: str) -> Principal | None:
    """The principal of a presented key; None when unknown, malformed or revoked."""
    if not KEY_PATTERN.match(key):
        return None
    rows = await reads.all(KEY_BY_HASH, {"key_hash": key_hash(key)})
    if not rows:
        return None
    row = rows[0]
    return Principal(row.tenant, row.admin, key_id=row.id, max_priority=row.max_priority)
