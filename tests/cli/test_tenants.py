"""`trainjob tenants set|show|list` against a real API process (auth off: everyone is an
admin of the default tenant), and `keys create --max-priority`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.db import upgrade
from cli.main import main
from tests.cli.test_client import Result
from tests.conftest import REDIS_URL
from tests.processes import api_and_worker


@pytest.fixture(scope="module")
def api(
    make_postgres_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    database_url = make_postgres_database()
    upgrade(database_url)
    logs = tmp_path_factory.mktemp("tenants-cli")
    with api_and_worker(
        logs,
        with_worker=False,
        database_url=database_url,
        redis_url=REDIS_URL,
        queue="tenants-cli",
        home=str(logs / "home"),
    ) as client:
        yield client


@pytest.fixture
def trainjob(api: httpx.Client, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def run(*args: str) -> Result:
        code = main([*args, "--url", str(api.base_url)])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def test_set_show_and_list_a_tenant(trainjob: Callable[..., Result]) -> None:
    done = trainjob("tenants", "set", "acme", "--share", "2", "--max-queued-jobs", "3")
    assert done.code == 0, done.err
    assert "tenant acme: share 2" in done.out and "queued jobs 0 of 3" in done.out
    shown = trainjob("tenants", "show", "acme", "--json")
    body = json.loads(shown.out)
    assert (body["share"], body["max_queued_jobs"], body["max_priority"]) == (2, 3, None)
    cleared = trainjob("tenants", "set", "acme", "--clear", "max_queued_jobs", "--json")
    assert json.loads(cleared.out)["max_queued_jobs"] is None
    listed = trainjob("tenants", "list")
    assert listed.code == 0 and "acme" in listed.out and "SHARE" in listed.out


def test_set_with_nothing_to_set_or_a_bad_value_is_refused(trainjob: Callable[..., Result]) -> None:
    assert trainjob("tenants", "set", "acme").code == 2
    refused = trainjob("tenants", "set", "acme", "--share", "0")
    assert refused.code == 1 and "validation_error" in refused.err and "share" in refused.err


def test_a_key_created_with_a_max_priority_shows_it(
    tmp_path: Path, own_postgres_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # A database of its own: a key turns auth on for every later test of a shared one.
    monkeypatch.setenv("TRAINJOB_DATABASE_URL", own_postgres_url)
    from app.settings import get_settings

    get_settings.cache_clear()
    try:
        code = main(["keys", "create", "--tenant", "capped", "--max-priority", "300", "--json"])
    finally:
        get_settings.cache_clear()
    assert code == 0
    assert json.loads(capsys.readouterr().out)["max_priority"] == 300
