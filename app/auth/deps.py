"""Who the request is: `PrincipalDep`, from `Authorization: Bearer KEY`.

Auth is on when TRAINJOB_AUTH=required, or (the default, `auto`) as soon as any key has
been created, revoked ones included: revoking every key must not open the service. With
TRAINJOB_AUTH=off it is never on.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.auth import service as auth_service
from app.auth.exceptions import Forbidden, Unauthorized
from app.auth.models import ApiKey
from app.auth.service import OPEN, Principal
from app.db import Database

RECHECK_SECONDS = 2.0


class AuthGate:
    """Whether keys are required; `auto` looks for a key at most every 2 s until one exists."""

    def __init__(self, database: Database, mode: str) -> None:
        self.database = database
        self.mode = mode
        self._on = mode == "required"
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def known(self) -> bool | None:
        """What required() says when it can say it without a query; None when it is
        time to look in the database again."""
        if self._on or self.mode == "off":
            return self._on
        return False if time.monotonic() - self._checked_at < RECHECK_SECONDS else None

    def required(self) -> bool:
        if (known := self.known()) is not None:
            return known
        with self._lock:
            if time.monotonic() - self._checked_at >= RECHECK_SECONDS:
                with self.database.session() as session:
                    self._on = session.scalar(select(ApiKey.id).limit(1)) is not None
                self._checked_at = time.monotonic()
        return self._on


# Async: the gate's answer is cached for 2 s, and a key's lookup is one of the hot reads
# (app/reads.py), so most requests take no hop to the thread pool here.
async def principal_of(request: Request) -> Principal:
    gate: AuthGate = request.app.state.auth_gate
    required = gate.known()
    if required is None:
        required = await run_in_threadpool(gate.required)
    if not required:
        return OPEN
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("an API key is required: send `Authorization: Bearer KEY`")
    principal = await auth_service.authenticate(request.app.state.reads, key=key.strip())
    if principal is None:
        raise Unauthorized("the API key is unknown or revoked")
    return principal


async def admin_of(request: Request) -> Principal:
    principal = await principal_of(request)
    if not principal.admin:
        raise Forbidden("this needs an admin key")
    return principal


PrincipalDep = Annotated[Principal, Depends(principal_of)]
AdminDep = Annotated[Principal, Depends(admin_of)]
