"""The dashboard in a real headless Chromium against a real API and worker.

A job trains (paced by TRAINJOB_TEST_FAULTS=slow); the browser finds it in the jobs
table, opens its page, watches the loss curve grow from the live event stream, cancels
it through the confirm dialog and sees it end `cancelled`. Screenshots of both pages
are saved as test artifacts (TRAINJOB_TEST_ARTIFACTS, else the test's tmp_path).

With API keys on (two tenants' keys on a database of its own, no worker: the job stays
queued), the page asks for a key, shows nothing of one tenant's job under another
tenant's key, shows it once its own tenant's key is entered through the page's "API key"
control, and drops it again when that key is forgotten.

Chromium and chromedriver come from the system (`apt-get install chromium
chromium-driver`); selenium is told where they are, so it never tries to download a
browser. Without them the test is skipped, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from app.auth.service import create_key
from app.db import Database, upgrade
from tests.conftest import REDIS_URL, wait_for
from tests.processes import running, service_env, serving

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SPEC: dict[str, Any] = {
    "name": "digits mlp (browser test)",
    "model": {"type": "mlp", "hidden_sizes": [32]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 8,
    "accumulation_steps": 2,
    "max_steps": 400,
    "checkpoint_every": 25,
    "eval_every": 25,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "lr_schedule": {"type": "cosine", "warmup_steps": 20},
    "device": "cpu",
}

pytestmark = pytest.mark.slow


def _require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if not missing:
        return
    reason = (
        f"the browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (in CI the browser test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    make_postgres_database: Callable[[], str],
    queue_name: str,
) -> Iterator[str]:
    _require_browser()
    database_url = make_postgres_database()
    upgrade(database_url)
    logs = tmp_path_factory.mktemp("browser")
    env = service_env(
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-browser",
        home=str(logs / "home"),
        progress_flush_seconds="0.2",
    )
    with (
        running(["worker"], env | {"TRAINJOB_TEST_FAULTS": "slow=0.03"}, logs / "worker.log"),
        serving(env, logs / "api.log") as api,
    ):
        yield api.url


class KeyedService(NamedTuple):
    url: str
    acme: str
    bravo: str


@pytest.fixture
def keyed_service(
    tmp_path: Path, make_postgres_database: Callable[[], str], queue_name: str
) -> Iterator[KeyedService]:
    """The API alone (no worker) on a database of its own with a key for each of two
    tenants: auth is on from the first key."""
    _require_browser()
    database_url = make_postgres_database()
    upgrade(database_url)
    database = Database(database_url)
    try:
        with database.session() as session:
            _, acme = create_key(session, tenant="acme", admin=False)
            _, bravo = create_key(session, tenant="bravo", admin=False)
            session.commit()
    finally:
        database.dispose()
    env = service_env(
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-browser-keys",
        home=str(tmp_path / "home"),
    )
    with serving(env, tmp_path / "api.log") as api:
        yield KeyedService(api.url, acme, bravo)


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("TRAINJOB_TEST_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_a_job_is_followed_live_in_the_browser_and_cancelled_from_its_page(
    service: str, browser: Any, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    job_id = httpx.post(f"{service}/v1/jobs", json=SPEC, timeout=10).json()["id"]

    def one(selector: str) -> Any:
        found = browser.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found else None

    # The overview: the job's row shows up and starts running (polled every 2 s).
    browser.get(f"{service}/")
    assert browser.current_url == f"{service}/dashboard"
    row = f'tr[data-job-id="{job_id}"]'
    wait_for(lambda: one(f'{row}[data-status="running"]'), 30, "the job's row to run")
    wait_for(lambda: one(".worker[data-worker]"), 10, "the worker in the list")
    assert one(f"{row} .job-name").text == SPEC["name"]
    assert one(f"{row} .batch").text == "16 = 8 × 2"
    assert one(f"{row} .col-priority").text == "500"
    # Pause and resume are another test's (they POST the job's /pause and /resume).
    assert one(f'{row} button[data-action="pause"]').is_displayed()
    wait_for(lambda: one('#tenants tr[data-tenant="default"]'), 10, "the tenant's usage")
    overview = artifacts / "dashboard-overview.png"
    browser.save_screenshot(str(overview))

    # Its page: the loss curve fills from the stream and keeps growing.
    one(f"{row} .job-name").click()
    wait_for(lambda: browser.current_url.endswith(f"#/jobs/{job_id}"), 5, "the job page")
    wait_for(lambda: one("#job-status").text == "running", 10, "the job's status")
    assert one("#pause").is_displayed() and not one("#resume").is_displayed()

    def points() -> int:
        return int(one("#loss-chart").get_attribute("data-points") or 0)

    first = wait_for(lambda: points() >= 10 and points(), 30, "the first loss points")
    wait_for(lambda: points() >= first + 10, 30, "the loss curve to grow")
    assert int(one("#lr-chart").get_attribute("data-points")) > 0
    assert one("#loss-chart path.series-loss") is not None
    # eval_every 25: the evaluations are a second series of points on the loss chart.
    wait_for(lambda: one("#loss-chart circle.series-eval"), 30, "an eval loss point")
    wait_for(lambda: one("#checkpoints tr[data-step]"), 30, "a checkpoint in the table")
    download = one("#checkpoints tr[data-step] a.download").get_attribute("href")
    assert f"/v1/jobs/{job_id}/weights?step=" in download
    job_page = artifacts / "dashboard-job.png"
    browser.save_screenshot(str(job_page))

    # Cancel: confirm in the dialog, then the status ends `cancelled`.
    one("#cancel").click()
    alert = browser.switch_to.alert
    assert "Cancel" in alert.text
    alert.accept()
    wait_for(lambda: one("#job-status").text == "cancelled", 30, "the job to be cancelled")
    assert not one("#cancel").is_displayed()
    wait_for(
        lambda: one('#events li[data-type="status"] .event-text').text.startswith("cancelled"),
        10,
        "the cancelled status in the events list",
    )
    assert one('#attempts tr[data-attempt="1"]') is not None
    browser.save_screenshot(str(artifacts / "dashboard-job-cancelled.png"))
    print(f"\nscreenshots: {overview}, {job_page}, {artifacts / 'dashboard-job-cancelled.png'}")

    # Nothing the page did broke the CSP or threw: the console has no errors.
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_the_page_asks_for_a_key_and_shows_only_that_key_s_tenant_s_jobs(
    keyed_service: KeyedService, browser: Any, artifacts: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    url = keyed_service.url
    response = httpx.post(
        f"{url}/v1/jobs",
        json=SPEC | {"name": "acme's job (browser test)"},
        headers={"Authorization": f"Bearer {keyed_service.acme}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    row = f'tr[data-job-id="{job_id}"]'

    def one(selector: str) -> Any:
        found = browser.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found else None

    # A new key may reload the page: an element found just before is then stale.
    def shown(selector: str) -> bool:
        try:
            element = one(selector)
            return element is not None and element.is_displayed()
        except StaleElementReferenceException:
            return False

    def text(selector: str) -> str | None:
        try:
            element = one(selector)
            return None if element is None else str(element.text)
        except StaleElementReferenceException:
            return None

    def rows() -> int:
        return len(browser.find_elements(By.CSS_SELECTOR, "tr[data-job-id]"))

    def enter_key(key: str) -> None:
        one("#key-input").clear()
        one("#key-input").send_keys(key)
        one('#key-form button[type="submit"]').click()
        wait_for(lambda: not shown("#key-form"), 10, "the key form to close")

    # No key yet: the API answers 401, the page asks for one and lists nothing.
    browser.get(f"{url}/dashboard")
    wait_for(lambda: shown("#key-form"), 10, "the page to ask for an API key")
    wait_for(lambda: text("#connection-text") == "API key needed", 10, "the 401 state")
    assert shown("#key-input")
    assert not shown("#key-button")
    assert rows() == 0
    assert not shown("#jobs-empty")  # nothing was listed, not even "no jobs"
    prompt = artifacts / "dashboard-key-prompt.png"
    browser.save_screenshot(str(prompt))
    print(f"\nscreenshot: {prompt}")

    # Tenant bravo's key: the list loads (empty), and acme's job is not in it.
    enter_key(keyed_service.bravo)
    wait_for(lambda: shown("#jobs-empty"), 10, "bravo's (empty) job list")
    assert one("#connection").get_attribute("data-state") == "live"
    assert one(row) is None
    assert rows() == 0
    wait_for(lambda: text("#stat-queued") == "0", 10, "bravo's counts")
    stored = browser.execute_script("return sessionStorage.getItem('trainjob.apiKey')")
    assert stored == keyed_service.bravo
    assert browser.execute_script("return localStorage.length") == 0

    # Change the key with the page's own control: acme's key shows acme's queued job.
    assert shown("#key-button")
    one("#key-button").click()
    wait_for(lambda: shown("#key-form"), 5, "the key form to open again")
    enter_key(keyed_service.acme)
    wait_for(lambda: shown(f'{row}[data-status="queued"]'), 10, "acme's job in the list")
    assert text(f"{row} .job-name") == "acme's job (browser test)"
    assert not shown("#jobs-empty")
    assert rows() == 1
    wait_for(lambda: text("#stat-queued") == "1", 10, "acme's counts")

    # Forget the key: the page asks again, and what acme's key showed is gone with it.
    one("#key-button").click()
    wait_for(lambda: shown("#key-forget"), 5, "the key form's Forget button")
    one("#key-forget").click()
    wait_for(
        lambda: text("#connection-text") == "API key needed" and rows() == 0,
        10,
        "the page to ask again, with acme's job no longer listed",
    )
    assert shown("#key-form")
    assert text("#stat-queued") == "–"
    assert browser.execute_script("return sessionStorage.getItem('trainjob.apiKey')") is None

    # The only console errors are the refused (401) requests made without a key.
    errors = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]
    ]
    assert errors == []
