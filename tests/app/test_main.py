"""The application as a whole: health, readiness, docs, error envelope, no torch."""

from __future__ import annotations

import subprocess
import sys

from fastapi.testclient import TestClient


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/pause", "/v1/jobs/{job_id}/resume",
                 "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/checkpoints", "/v1/jobs/{job_id}/weights"]:  # fmt: skip
        assert path in paths


def test_unknown_route_and_wrong_method_use_the_envelope(client: TestClient) -> None:
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found"
    response = client.delete("/v1/jobs")
    assert response.status_code == 405 and response.json()["error"]["type"] == "method_not_allowed"


def test_the_api_never_imports_torch() -> None:
    code = "import sys, app.main; app.main.create_app(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
