"""The HTTP client of the `trainjob` command: one connection to the API, its errors, and
how a client command prints (`--json` or text) and exits.

The client commands (cli/jobs.py, cli/files.py) talk to the HTTP API only (no torch, no
database), so they run from the API-only install. Exit codes: 0 success, 1 the server
answered an error or a watched job failed or was cancelled, 2 a usage error or an
unreadable spec, 3 no server at the URL (and 141, from cli/main.py, when the reader of
stdout went away).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from app.settings import Settings
from cli.specfile import SpecFileError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

REQUEST_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class ApiError(Exception):
    """The server answered with an error envelope (or some other non-2xx)."""

    def __init__(self, type: str, message: str, fields: list[dict[str, Any]]) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.fields = fields


class Unreachable(Exception):
    """No answer from the server at the URL: refused, timed out, or dropped."""


class UsageError(Exception):
    """The command cannot be sent as given: a bad --url, an unreadable file."""


@dataclass
class Api:
    """One server: its URL and an httpx client carrying the API key, if any. Every
    answer goes through raise_for_error (an httpx response hook), streams included."""

    url: str
    http: httpx.Client = field(repr=False)

    def get(self, path: str, **params: Any) -> Any:
        return _json(self.http.get(path, params={k: v for k, v in params.items() if v is not None}))

    def post(self, path: str, body: Any = None) -> Any:
        return _json(self.http.post(path, json=body))

    def put(self, path: str, body: Any) -> Any:
        return _json(self.http.put(path, json=body))

    def unreachable(self, error: httpx.TransportError) -> Unreachable:
        reason = str(error) or type(error).__name__
        return Unreachable(f"cannot reach the server at {self.url}: {reason}")


def connect(url: str, api_key: str | None) -> Api:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, not {url!r}")
    headers = {"User-Agent": "trainjob-cli"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    http = httpx.Client(
        base_url=url,
        headers=headers,
        timeout=REQUEST_TIMEOUT,
        event_hooks={"response": [raise_for_error]},
    )
    return Api(url=url, http=http)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise _not_trainjob(response) from None


def raise_for_error(response: httpx.Response) -> None:
    """An error answer as ApiError: the server's envelope, or what we can say about it."""
    if response.is_success:
        return
    response.read()  # a streamed answer has not been read yet
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not (isinstance(error, dict) and "type" in error and "message" in error):
        raise _not_trainjob(response)
    fields = error.get("fields")
    raise ApiError(
        str(error["type"]),
        str(error["message"]),
        [item for item in fields if isinstance(item, dict)] if isinstance(fields, list) else [],
    )


def _not_trainjob(response: httpx.Response) -> ApiError:
    # A proxy's error page, or a server that is not trainjob at all.
    return ApiError(
        "http_error",
        f"HTTP {response.status_code} {response.reason_phrase} from {response.url} "
        f"({response.headers.get('content-type', 'no content type')})",
        [],
    )


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def show(document: Any, text: str, *, as_json: bool) -> None:
    """The server's JSON as one document (--json, for scripts), or the text for people."""
    print(json.dumps(document, indent=2) if as_json else text)


def list_page(
    api: Api,
    args: argparse.Namespace,
    noun: str,
    print_table: Callable[[list[dict[str, Any]]], None],
) -> int:
    """A page of a list: the server's JSON, or a table and how to ask for the next page."""
    page = api.get(f"/v1/{noun}", status=args.status, limit=args.limit, after=args.after)
    if args.as_json:
        print_json(page)
        return EXIT_OK
    if page["data"]:
        print_table(page["data"])
    else:
        print(f"no {noun}")
    if page["has_more"]:
        command = "trainjob list" if noun == "jobs" else f"trainjob {noun} list"
        more = f"{command} --after {page['data'][-1]['id']}"
        if args.status:
            more += f" --status {args.status}"
        print(f"more: {more}", file=sys.stderr)
    return EXIT_OK


def client_command(args: argparse.Namespace) -> int:
    """Run one client subcommand; errors become a line on stderr and an exit code."""
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"trainjob: invalid settings: {error}", file=sys.stderr)
        return EXIT_USAGE
    api_key = args.api_key
    if api_key is None and settings.api_key is not None:
        api_key = settings.api_key.get_secret_value()
    try:
        api = connect(args.url or settings.url, api_key)
        with api.http:
            from cli import files, jobs, tenants  # imported here: they build on this module

            if args.command == "files":
                return files.COMMANDS[args.files_action](api, args)
            if args.command == "tenants":
                return tenants.COMMANDS[args.tenants_action](api, args)
            return jobs.COMMANDS[args.command](api, args)
    except (UsageError, SpecFileError) as error:
        print(f"trainjob: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as error:
        print(f"trainjob: {error.type}: {error.message}", file=sys.stderr)
        for item in error.fields:
            print(f"  {item.get('path') or 'body'}: {item.get('message')}", file=sys.stderr)
        return EXIT_FAILED
    except (httpx.TransportError, Unreachable) as error:
        reason = api.unreachable(error) if isinstance(error, httpx.TransportError) else error
        print(f"trainjob: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("trainjob: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
