"""`trainjob keys create|list|revoke`: API keys, managed on the server's database.

Run where TRAINJOB_DATABASE_URL (or the embedded SQLite under TRAINJOB_HOME) is the
service's. The key is printed once, on create; only its hash is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.auth.models import ApiKey
from app.db import Database, DatabaseNotMigrated, require_migrated
from app.errors import InvalidRequest, NotFound
from app.settings import get_settings
from cli.output import print_table


def _described(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "tenant": row.tenant,
        "admin": row.admin,
        "name": row.name,
        "max_priority": row.max_priority,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


def _create(session: Session, args: argparse.Namespace) -> None:
    row, key = auth_service.create_key(
        session,
        tenant=args.tenant,
        admin=args.admin,
        name=args.name,
        max_priority=args.max_priority,
    )
    session.commit()
    if args.json:
        print(json.dumps(_described(row) | {"key": key}))
        return
    role = "admin key" if row.admin else "key"
    print(f"{role} {row.id} for tenant {row.tenant!r} (shown once, store it now):")
    print(key)


def _list(session: Session, args: argparse.Namespace) -> None:
    listed = [_described(row) for row in auth_service.list_keys(session, tenant=args.tenant)]
    if args.json:
        print(json.dumps({"data": listed}))
        return
    rows = [
        (
            item["id"],
            item["tenant"],
            "admin" if item["admin"] else "user",
            "yes" if item["revoked_at"] else "no",
            item["name"] or "",
        )
        for item in listed
    ]
    print_table(("ID", "TENANT", "ROLE", "REVOKED", "NAME"), rows)


def _revoke(session: Session, args: argparse.Namespace) -> None:
    row = auth_service.revoke_key(session, key_id=args.key_id)
    session.commit()
    print(f"key {row.id} of tenant {row.tenant!r} is revoked")


ACTIONS = {"create": _create, "list": _list, "revoke": _revoke}


def keys_command(args: argparse.Namespace) -> int:
    database = Database(get_settings().effective_database_url)
    try:
        require_migrated(database)
        with database.session() as session:
            ACTIONS[args.key_action](session, args)
    except DatabaseNotMigrated as error:
        print(f"trainjob keys: {error}", file=sys.stderr)
        return 2
    except (NotFound, InvalidRequest) as error:
        print(f"trainjob keys: {error.message}", file=sys.stderr)
        return 1
    finally:
        database.dispose()
    return 0
