"""The dashboard in a real headless Chromium against a real API and worker.

A job trains (paced by TRAINJOB_TEST_FAULTS=slow); the browser finds it in the jobs
table, opens its page, watches the loss curve grow from the live event stream, cancels
it through the confirm dialog and sees it end `cancelled`. Screenshots of both pages
are saved as test artifacts (TRAINJOB_TEST_ARTIFACTS, else the test's tmp_path).

Chromium and chromedriver come from the system (`apt-get install chromium
chromium-driver`); selenium is told where they are, so it never tries to download a
browser. Without them the test is skipped, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import upgrade
from tests.conftest import REDIS_URL, wait_for
from tests.processes import free_port, running, service_env, wait_until_ready

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
    port = free_port()
    with (
        running(["serve", "--no-worker", "--port", str(port)], env, logs / "api.log") as api,
        running(["worker"], env | {"TRAINJOB_TEST_FAULTS": "slow=0.03"}, logs / "worker.log"),
    ):
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, api, logs / "api.log")
        yield url


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
    overview = artifacts / "dashboard-overview.png"
    browser.save_screenshot(str(overview))

    # Its page: the loss curve fills from the stream and keeps growing.
    one(f"{row} .job-name").click()
    wait_for(lambda: browser.current_url.endswith(f"#/jobs/{job_id}"), 5, "the job page")
    wait_for(lambda: one("#job-status").text == "running", 10, "the job's status")

    def points() -> int:
        return int(one("#loss-chart").get_attribute("data-points") or 0)

    first = wait_for(lambda: points() >= 10 and points(), 30, "the first loss points")
    wait_for(lambda: points() >= first + 10, 30, "the loss curve to grow")
    assert int(one("#lr-chart").get_attribute("data-points")) > 0
    assert one("#loss-chart path.series-loss") is not None
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
