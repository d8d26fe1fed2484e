"""Fail closed: `trainjob serve` does not listen beyond this machine while anyone who
reaches it would be an admin.

Authentication is off with TRAINJOB_AUTH=off, and with `auto` (the default) while no API
key exists. On a loopback address that is the embedded default's convenience; on any
other address it takes TRAINJOB_AUTH=off, said explicitly (the API then logs a warning
at every start).
"""

from __future__ import annotations

import ipaddress
import socket

from app.auth.deps import AuthGate
from app.db import Database
from app.settings import Settings

FIRST_KEY = "trainjob keys create --tenant NAME --admin"


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is on this machine only. An empty host, a
    wildcard (0.0.0.0, ::) and a name that does not resolve are not."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback for info in infos
    )


def authentication_is_on(settings: Settings) -> bool:
    """What the API will decide at its first request: the same gate."""
    if settings.auth != "auto":
        return settings.auth == "required"
    database = Database(settings.effective_database_url)
    try:
        return AuthGate(database, settings.auth).required()
    finally:
        database.dispose()


def refusal(host: str, *, auth: str, auth_on: bool) -> str | None:
    """Why serving on `host` would be refused, or None when it may start."""
    if auth_on or auth == "off" or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host or 'every address'} with authentication off: no API key "
        "exists, so anyone who can reach this port would be an admin. Create the first key "
        f"(`{FIRST_KEY}`) and start again, or set TRAINJOB_AUTH=required (every request then "
        "needs a key). To serve open on purpose, set TRAINJOB_AUTH=off."
    )
