"""`tracking` at submit: a strict section, refused (422 naming `tracking`) while the
service has no TRAINJOB_MLFLOW_TRACKING_URI, stored as given once it has one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.jobs.spec import JobSpec, validation_messages
from app.main import create_app
from app.settings import Settings

SPEC: dict[str, Any] = {"model": {"type": "mlp"}, "dataset": {"type": "digits"},
                        "micro_batch_size": 8, "accumulation_steps": 1, "max_steps": 1}  # fmt: skip
TRACKED = SPEC | {"tracking": {"mlflow": {"experiment": "digits", "run_name": "first"}}}


@pytest.fixture
def tracked_client(settings: Settings) -> Iterator[TestClient]:
    configured = settings.model_copy(
        update={"reaper_interval_seconds": 0, "mlflow_tracking_uri": "http://mlflow:5000"}
    )
    with TestClient(create_app(configured)) as test_client:
        yield test_client


def test_tracking_is_refused_naming_the_setting_while_the_service_has_none(
    client: TestClient,
) -> None:
    response = client.post("/v1/jobs", json=TRACKED)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert [field["path"] for field in error["fields"]] == ["tracking"]
    assert "TRAINJOB_MLFLOW_TRACKING_URI" in error["message"]
    assert client.post("/v1/jobs", json=SPEC).status_code == 201


def test_tracking_is_stored_as_given_on_a_service_with_a_tracking_server(
    tracked_client: TestClient,
) -> None:
    response = tracked_client.post("/v1/jobs", json=TRACKED)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["tracking"] == {
        "mlflow": {"experiment": "digits", "run_name": "first"}
    }


@pytest.mark.parametrize(
    ("tracking", "field"),
    [
        ({}, "tracking.mlflow"),
        ({"mlflow": {}}, "tracking.mlflow.experiment"),
        ({"mlflow": {"experiment": ""}}, "tracking.mlflow.experiment"),
        ({"mlflow": {"experiment": "e" * 257}}, "tracking.mlflow.experiment"),
        ({"mlflow": {"experiment": "e", "run_name": "r" * 251}}, "tracking.mlflow.run_name"),
        ({"mlflow": {"experiment": "e", "uri": "http://elsewhere"}}, "tracking.mlflow.uri"),
        ({"wandb": {"project": "p"}}, "tracking.wandb"),
    ],
)
def test_a_malformed_tracking_section_is_refused_naming_its_field(
    tracking: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        JobSpec.model_validate(SPEC | {"tracking": tracking})
    assert any(line.startswith(f"{field}: ") for line in validation_messages(refused.value))
