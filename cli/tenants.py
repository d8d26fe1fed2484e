"""`trainjob tenants set|list|show`: tenants' fair-share weight, priority cap and quotas,
through the HTTP API (setting and listing need an admin key)."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from cli import output
from cli.client import EXIT_OK, Api, UsageError, print_json, show
from cli.main import TENANT_SETTINGS as SETTINGS


def tenant_path(name: str) -> str:
    return f"/v1/tenants/{quote(name, safe='')}"


def tenant_text(tenant: dict[str, Any]) -> str:
    usage = tenant["usage"]

    def cap(value: Any) -> str:
        return "none" if value is None else f"{value:g}"

    return "\n".join(
        [
            f"tenant {tenant['name']}: share {tenant['share']:g}, "
            f"max_priority {cap(tenant['max_priority'])}",
            f"  running devices {usage['running_devices']} of {cap(tenant['max_running_devices'])}",
            f"  queued jobs {usage['queued_jobs']} of {cap(tenant['max_queued_jobs'])}",
            f"  device-hours (30 days) {usage['device_hours_30d']:.2f} of "
            f"{cap(tenant['max_device_hours'])}",
        ]
    )


def set_tenant(api: Api, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for name in SETTINGS:
        value = getattr(args, name)
        if value is not None:
            # "none" clears a cap or quota (JSON null).
            body[name] = None if value == "none" else value
    if args.clear:
        body |= dict.fromkeys(args.clear)
    if not body:
        raise UsageError("nothing to set: give at least one option (see --help)")
    tenant = api.put(tenant_path(args.name), body)
    show(tenant, tenant_text(tenant), as_json=args.as_json)
    return EXIT_OK


def show_tenant(api: Api, args: argparse.Namespace) -> int:
    tenant = api.get(tenant_path(args.name))
    show(tenant, tenant_text(tenant), as_json=args.as_json)
    return EXIT_OK


def list_tenants(api: Api, args: argparse.Namespace) -> int:
    page = api.get("/v1/tenants", limit=args.limit, after=args.after)
    if args.as_json:
        print_json(page)
        return EXIT_OK
    header = ("TENANT", "SHARE", "MAX PRIO", "RUNNING DEV", "QUEUED", "DEVICE-H 30D")
    rows = [
        (
            tenant["name"],
            f"{tenant['share']:g}",
            str(tenant["max_priority"] if tenant["max_priority"] is not None else ""),
            _of(tenant["usage"]["running_devices"], tenant["max_running_devices"]),
            _of(tenant["usage"]["queued_jobs"], tenant["max_queued_jobs"]),
            _of(round(tenant["usage"]["device_hours_30d"], 2), tenant["max_device_hours"]),
        )
        for tenant in page["data"]
    ]
    if rows:
        output.print_table(header, rows)
    else:
        print("no tenants")
    if page["has_more"]:
        print(f"more: trainjob tenants list --after {page['data'][-1]['name']}")
    return EXIT_OK


def _of(used: Any, limit: Any) -> str:
    return f"{used:g}" if limit is None else f"{used:g}/{limit:g}"


COMMANDS = {"set": set_tenant, "show": show_tenant, "list": list_tenants}
